"""Signing in to the console with the same JWTs as the APIs: the token is kept in an
HttpOnly, SameSite=Strict cookie (scripts cannot read it; other sites cannot send it),
and every action also carries a CSRF token derived from it (double submit), so a
forged request fails twice over. Role `operator` sees every tenant; `admin` only its
own."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from uuid import UUID

from fastapi import HTTPException, Request

from infra.auth import Authenticator, AuthError, Principal

COOKIE = "ringiflow_console"
CSRF_HEADER = "X-CSRF-Token"
ROLES = ("operator", "admin")


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str

    @property
    def everything(self) -> bool:
        """An operator: every tenant and the whole system's controls."""
        return "operator" in self.principal.roles

    @property
    def who(self) -> str:
        """How the audit trail names the signed-in user (tenant included)."""
        p = self.principal
        return f"{p.name} <{p.user_id}@{p.tenant_id}> (console)"

    def may_see(self, tenant: UUID | str | None) -> bool:
        return self.everything or (tenant is not None and str(tenant) ==
                                   str(self.principal.tenant_id))

    def require_operator(self, action: str) -> None:
        if not self.everything:
            raise HTTPException(403, f"{action} needs the 'operator' role; a tenant admin "
                                "sees and acts on its own tenant only")


def csrf_of(secret: str, token: str) -> str:
    return hmac.new(secret.encode(), b"csrf:" + token.encode(), hashlib.sha256).hexdigest()


def sign_in(auth: Authenticator, token: str) -> Principal:
    """The principal of a token that may use the console; AuthError says why not."""
    principal = auth.verify_token(token)
    if not set(ROLES) & set(principal.roles):
        raise AuthError("the console needs the 'operator' or 'admin' role: mint a token "
                        "with `ringiflow token --role operator`")
    return principal


def session_of(request: Request, auth: Authenticator, secret: str,
               action: bool = False) -> Session:
    """The signed-in session; 401 without one. `action`: a state-changing request,
    which must also carry the CSRF token."""
    token = request.cookies.get(COOKIE)
    if not token:
        raise HTTPException(401, "not signed in: sign in at /login with a token")
    try:
        principal = sign_in(auth, token)
    except AuthError as exc:
        raise HTTPException(401, f"{exc}; sign in again at /login") from None
    csrf = csrf_of(secret, token)
    if action and not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), csrf):
        raise HTTPException(403, "missing or wrong CSRF token: reload the console and retry")
    return Session(principal, csrf)
