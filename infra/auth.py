"""Credentials shared by both APIs: JWT bearer tokens (HS256 with a dev
secret, or RS256 through a JWKS URL) and API keys for service callers. The
tenant comes only from the credential, never from the request."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from uuid import UUID, uuid5

import jwt
from pydantic import BaseModel, ConfigDict

from infra.settings import Settings

ISSUER = "ringiflow"
AUDIENCE = "ringiflow"
TOKEN_CACHE_SIZE = 10_000
SERVICE_NAMESPACE = UUID("7b0c3c1e-4b7e-4c3a-9a57-1f2f0a6d8e11")
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class AuthError(Exception):
    """401: the message says what was wrong with the credential."""


@dataclass(frozen=True)
class Principal:
    tenant_id: UUID
    user_id: UUID
    name: str
    roles: tuple[str, ...]
    kind: str = "user"  # user | service
    expires_at: float | None = None  # epoch seconds; None for API keys


class ApiKey(BaseModel):
    """One service credential; configured as RINGIFLOW_API_KEYS, a JSON list."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str  # hex digest of the key: the key itself is never stored
    tenant_id: UUID
    service: str
    roles: tuple[str, ...] = ("service",)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def mint_token(
    secret: str, *, tenant_id: UUID, user_id: UUID, name: str, roles: list[str],
    ttl: timedelta = timedelta(hours=12),
) -> str:
    now = datetime.now(UTC)
    claims = {
        "sub": str(user_id), "tenant_id": str(tenant_id), "name": name, "roles": roles,
        "iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + ttl,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


@dataclass
class Authenticator:
    hs256_secret: str | None = None
    jwks_url: str | None = None
    audience: str | None = AUDIENCE
    issuer: str | None = ISSUER
    api_keys: tuple[ApiKey, ...] = ()
    _verified: dict[str, tuple[Principal, float]] = field(default_factory=dict, repr=False)

    @cached_property
    def _jwks(self) -> jwt.PyJWKClient | None:
        return jwt.PyJWKClient(self.jwks_url, cache_keys=True) if self.jwks_url else None

    def authenticate(self, authorization: str | None, api_key: str | None) -> Principal:
        # A bearer token, when sent, decides: an extra X-API-Key header (say, one a
        # proxy adds) must not turn a request into another principal's.
        if api_key and not authorization:
            return self._from_api_key(api_key)
        if not authorization:
            raise AuthError("missing credentials: send 'Authorization: Bearer <token>' "
                            "(mint one with `ringiflow token`) or 'X-API-Key'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Authorization header must be 'Bearer <token>'")
        return self.verify_token(token.strip())

    def verify_token(self, token: str) -> Principal:
        # Verifying a signature costs more than the rest of a request's auth; a
        # verified token is remembered until it expires.
        cached = self._verified.get(token)
        if cached is not None and cached[1] > time.time():
            return cached[0]
        principal, expires = self._verify(token)
        if len(self._verified) >= TOKEN_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (principal, expires)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if algorithm == "HS256" and self.hs256_secret:
                key: object = self.hs256_secret
            elif algorithm == "RS256" and self._jwks is not None:
                key = self._jwks.get_signing_key_from_jwt(token).key
            else:
                raise AuthError(f"token algorithm {algorithm!r} is not accepted here")
            claims = jwt.decode(
                token, key, algorithms=[algorithm], audience=self.audience, issuer=self.issuer,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
                leeway=30,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired: mint a new one") from None
        except (jwt.PyJWTError, jwt.PyJWKClientError) as exc:
            raise AuthError(f"invalid token: {exc}") from None
        try:
            roles = claims.get("roles") or []
            return Principal(
                tenant_id=UUID(str(claims["tenant_id"])), user_id=UUID(str(claims["sub"])),
                # The name lands in event payloads: no control characters there.
                name=CONTROL.sub("", str(claims.get("name") or claims["sub"]))[:255] or "?",
                roles=tuple(str(r) for r in roles), expires_at=float(claims["exp"]),
            ), float(claims["exp"])
        except (KeyError, ValueError, TypeError):
            raise AuthError("token claims must include 'sub' and 'tenant_id' as UUIDs") from None

    def _from_api_key(self, key: str) -> Principal:
        digest = hash_api_key(key)
        for candidate in self.api_keys:
            if hmac.compare_digest(candidate.sha256, digest):
                return Principal(
                    tenant_id=candidate.tenant_id,
                    user_id=uuid5(SERVICE_NAMESPACE, f"{candidate.tenant_id}:{candidate.service}"),
                    name=candidate.service, roles=candidate.roles, kind="service",
                )
        raise AuthError("unknown API key")


def authenticator(settings: Settings) -> Authenticator:
    return Authenticator(
        hs256_secret=settings.dev_jwt_secret, jwks_url=settings.jwt_jwks_url,
        audience=settings.jwt_audience, issuer=settings.jwt_issuer,
        api_keys=tuple(ApiKey.model_validate(k) for k in settings.api_keys),
    )
