"""The FastAPI side of authentication, shared by both APIs.

No `from __future__ import annotations`: FastAPI reads this signature."""

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Header

from infra.auth import Authenticator, AuthError, Principal
from infra.problems import Problem


def principal_dependency(auth: Authenticator) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency: the caller, or a 401 problem."""

    async def authenticate(
        authorization: Annotated[str | None, Header()] = None,
        x_api_key: Annotated[str | None, Header()] = None,
    ) -> Principal:
        try:
            return auth.authenticate(authorization, x_api_key)
        except AuthError as exc:
            raise Problem(401, "unauthenticated", "Authentication required", str(exc),
                          headers={"WWW-Authenticate": 'Bearer realm="ringiflow"'}) from None

    return authenticate
