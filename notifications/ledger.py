"""What the dispatcher reads and remembers, in PostgreSQL:

* a recipient (display name, email, locale, channels, chat webhook) is the user's newest
  snapshot in the event store, which is never behind the notification being delivered
  (its command was derived from a later event), so a just-registered user or a
  just-changed preference is honoured without waiting for any projection;
* `notifications.deliveries`: one row per notification and channel: sent, failed,
  skipped, with its attempts and the receiver's last answer. A notification whose row
  says `sent` is never sent again, whatever Kafka redelivers (the row is written right
  after the receiver accepted it; only a crash between the two can send twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from contract import AggregateType
from infra.clients import set_tenant
from streams.deadletters import until_reachable


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

    async def recipient(self, tenant: UUID, user: UUID) -> Recipient | None:
        async def read() -> Any:
            async with self.pool.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "SELECT aggregate FROM event_store.latest_snapshots(%s, %s, %s)",
                    (tenant, AggregateType.USER.value, [user]))
                return await cur.fetchone()

        row = await until_reachable("reading a recipient", read)
        if row is None:
            return None
        snapshot = row[0]
        return Recipient(user, snapshot["display_name"], snapshot["email"],
                         snapshot.get("locale") or "ja",
                         tuple(snapshot.get("channels") or ("email",)),
                         snapshot.get("chat_webhook_url"))

    async def status(self, tenant: UUID, notification_id: UUID, channel: str) -> str | None:
        async def read() -> Any:
            async with self.pool.connection() as conn, conn.transaction():
                await set_tenant(conn, tenant)
                cur = await conn.execute(
                    "SELECT status FROM notifications.deliveries WHERE tenant_id = %s AND "
                    "notification_id = %s AND channel = %s", (tenant, notification_id, channel))
                return await cur.fetchone()

        row = await until_reachable("reading a delivery", read)
        return row[0] if row else None

    async def record(self, command: dict[str, Any], channel: str, status: str,
                     address: str | None, subject: str | None, attempts: int,
                     error: str | None = None) -> None:
        """The outcome of one notification on one channel (attempts accumulate)."""
        await until_reachable("recording a delivery", lambda: self._record(
            command, channel, status, address, subject, attempts, error))

    async def _record(self, command: dict[str, Any], channel: str, status: str,
                      address: str | None, subject: str | None, attempts: int,
                      error: str | None) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            await set_tenant(conn, command["tenant_id"])
            await conn.execute(
                "INSERT INTO notifications.deliveries AS d (tenant_id, notification_id, "
                "channel, recipient_id, workflow_id, kind, address, subject, status, attempts, "
                "last_error, sent_at, updated_at) VALUES (%(tenant)s, %(id)s, %(channel)s, "
                "%(user)s, %(workflow)s, %(kind)s, %(address)s, %(subject)s, %(status)s, "
                "%(attempts)s, %(error)s, CASE WHEN %(status)s = 'sent' THEN clock_timestamp() "
                "END, clock_timestamp()) ON CONFLICT (tenant_id, notification_id, channel) "
                "DO UPDATE SET "
                "status = EXCLUDED.status, attempts = d.attempts + EXCLUDED.attempts, "
                "last_error = coalesce(EXCLUDED.last_error, d.last_error), "
                "sent_at = coalesce(EXCLUDED.sent_at, d.sent_at), updated_at = clock_timestamp()",
                {"tenant": command["tenant_id"], "id": command["notification_id"],
                 "channel": channel, "user": command["user_id"],
                 "workflow": command.get("workflow_id"), "kind": command["type"],
                 "address": address, "subject": subject, "status": status,
                 "attempts": attempts, "error": error})
