"""What the dispatcher knows and remembers, in PostgreSQL (schema `notifications`):

* `recipients`: who gets notified and how: display name, email, locale, channels and
  chat webhook, projected from the user events (version-guarded, so a redelivered or
  older event changes nothing);
* `deliveries`: one row per notification and channel: sent, failed, skipped, with its
  attempts and the receiver's last answer. A notification whose row says `sent` is
  never sent again, whatever Kafka redelivers (the row is written right after the
  receiver accepted it; only a crash between the two can send twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from contract import EventEnvelope, user_of

UPSERT_RECIPIENT = """
INSERT INTO notifications.recipients AS r (tenant_id, user_id, display_name, email, locale,
    channels, chat_webhook_url, version)
VALUES (%(tenant)s, %(user)s, %(name)s, %(email)s, %(locale)s, %(channels)s, %(chat)s,
    %(version)s)
ON CONFLICT (tenant_id, user_id) DO UPDATE SET display_name = EXCLUDED.display_name,
    email = EXCLUDED.email, locale = EXCLUDED.locale, channels = EXCLUDED.channels,
    chat_webhook_url = EXCLUDED.chat_webhook_url, version = EXCLUDED.version
WHERE r.version < EXCLUDED.version
"""


@dataclass(frozen=True)
class Recipient:
    user_id: UUID
    display_name: str
    email: str
    locale: str
    channels: tuple[str, ...]
    chat_webhook_url: str | None


class Ledger:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def project_users(self, envelopes: Sequence[EventEnvelope]) -> None:
        if not envelopes:
            return
        async with self.pool.connection() as conn, conn.transaction():
            for e in envelopes:
                user = user_of(e)
                await conn.execute(UPSERT_RECIPIENT, {
                    "tenant": e.tenant_id, "user": e.aggregate_id,
                    "name": user["display_name"], "email": user["email"],
                    "locale": user.get("locale") or "ja",
                    "channels": list(user.get("channels") or ["email"]),
                    "chat": user.get("chat_webhook_url"), "version": e.version})

    async def recipient(self, tenant: UUID, user: UUID) -> Recipient | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT user_id, display_name, email, locale, channels, chat_webhook_url "
                "FROM notifications.recipients WHERE tenant_id = %s AND user_id = %s",
                (tenant, user))
            row = await cur.fetchone()
        return Recipient(row[0], row[1], row[2], row[3], tuple(row[4]), row[5]) if row else None

    async def status(self, notification_id: UUID, channel: str) -> str | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT status FROM notifications.deliveries WHERE notification_id = %s "
                "AND channel = %s", (notification_id, channel))
            row = await cur.fetchone()
        return row[0] if row else None

    async def record(self, command: dict[str, Any], channel: str, status: str,
                     address: str | None, subject: str | None, attempts: int,
                     error: str | None = None) -> None:
        """The outcome of one notification on one channel (attempts accumulate)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO notifications.deliveries AS d (tenant_id, notification_id, "
                "channel, recipient_id, workflow_id, kind, address, subject, status, attempts, "
                "last_error, sent_at, updated_at) VALUES (%(tenant)s, %(id)s, %(channel)s, "
                "%(user)s, %(workflow)s, %(kind)s, %(address)s, %(subject)s, %(status)s, "
                "%(attempts)s, %(error)s, CASE WHEN %(status)s = 'sent' THEN clock_timestamp() "
                "END, clock_timestamp()) ON CONFLICT (notification_id, channel) DO UPDATE SET "
                "status = EXCLUDED.status, attempts = d.attempts + EXCLUDED.attempts, "
                "last_error = coalesce(EXCLUDED.last_error, d.last_error), "
                "sent_at = coalesce(EXCLUDED.sent_at, d.sent_at), updated_at = clock_timestamp()",
                {"tenant": command["tenant_id"], "id": command["notification_id"],
                 "channel": channel, "user": command["user_id"],
                 "workflow": command.get("workflow_id"), "kind": command["type"],
                 "address": address, "subject": subject, "status": status,
                 "attempts": attempts, "error": error})


async def deliveries_of(pool: AsyncConnectionPool, tenant: UUID,
                        workflow: UUID | None = None) -> list[dict[str, Any]]:
    """A tenant's delivery statuses (the query API's and the CLI's reads)."""
    where, params = "tenant_id = %s", [tenant]
    if workflow is not None:
        where, params = where + " AND workflow_id = %s", [tenant, workflow]
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            "SELECT notification_id, channel, recipient_id, workflow_id, kind, address, "
            f"subject, status, attempts, last_error, first_attempt_at, sent_at FROM "
            f"notifications.deliveries WHERE {where} ORDER BY first_attempt_at", params)
        return await cur.fetchall()
