"""Bearer credentials shared by both APIs: HS256 JWTs in development."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

import jwt

ISSUER = "ringiflow"
AUDIENCE = "ringiflow"


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
