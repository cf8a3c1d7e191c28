"""Credential verification: HS256 dev tokens, RS256 through a JWKS URL, API keys."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from uuid import uuid4

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from infra.auth import ApiKey, Authenticator, AuthError, hash_api_key, mint_token

SECRET = "unit-test-secret-0123456789abcdef0123456789"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def jwks_url(rsa_key: rsa.RSAPrivateKey) -> Iterator[str]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/jwks.json"
    server.shutdown()


def claims(**extra: object) -> dict[str, object]:
    now = datetime.now(UTC)
    return {"sub": str(uuid4()), "tenant_id": str(uuid4()), "name": "n", "roles": ["user"],
            "iss": "ringiflow", "aud": "ringiflow", "exp": now + timedelta(minutes=5), **extra}


def test_dev_tokens_round_trip() -> None:
    tenant, user = uuid4(), uuid4()
    token = mint_token(SECRET, tenant_id=tenant, user_id=user, name="太郎", roles=["admin"])
    principal = Authenticator(hs256_secret=SECRET).authenticate(f"Bearer {token}", None)
    assert (principal.tenant_id, principal.user_id, principal.name) == (tenant, user, "太郎")
    assert principal.roles == ("admin",)


def test_rs256_tokens_are_verified_against_the_jwks(rsa_key: rsa.RSAPrivateKey,
                                                    jwks_url: str) -> None:
    auth = Authenticator(hs256_secret=SECRET, jwks_url=jwks_url)
    good = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    assert auth.verify_token(good).roles == ("user",)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims(), other_key, algorithm="RS256", headers={"kid": "k1"})
    with pytest.raises(AuthError, match="invalid token"):
        auth.verify_token(forged)


def test_rs256_is_refused_when_no_jwks_is_configured(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    with pytest.raises(AuthError, match="not accepted"):
        Authenticator(hs256_secret=SECRET).verify_token(token)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"aud": "someone-else"}, "invalid token"),
    ({"iss": "evil"}, "invalid token"),
    ({"exp": timedelta(minutes=-5)}, "expired"),
    ({"tenant_id": "not-a-uuid"}, "UUIDs"),
])
def test_bad_claims_are_refused(overrides: dict, message: str) -> None:
    # Claims are built when the test runs: built at collection, they expired in
    # a suite that took longer than their lifetime.
    if isinstance(overrides.get("exp"), timedelta):
        overrides = {**overrides, "exp": datetime.now(UTC) + overrides["exp"]}
    token = jwt.encode(claims(**overrides), SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match=message):
        Authenticator(hs256_secret=SECRET).verify_token(token)


def test_api_keys_are_matched_by_hash_and_name_the_service() -> None:
    tenant = uuid4()
    auth = Authenticator(api_keys=(ApiKey(sha256=hash_api_key("k-123"), tenant_id=tenant,
                                          service="billing"),))
    principal = auth.authenticate(None, "k-123")
    assert (principal.tenant_id, principal.name, principal.kind) == (tenant, "billing", "service")
    assert principal.user_id == auth.authenticate(None, "k-123").user_id  # stable identity
    with pytest.raises(AuthError, match="unknown API key"):
        auth.authenticate(None, "k-124")


def test_missing_credentials_say_how_to_get_one() -> None:
    with pytest.raises(AuthError, match="ringiflow token"):
        Authenticator(hs256_secret=SECRET).authenticate(None, None)
