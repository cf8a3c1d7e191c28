"""The `notification-dispatcher` worker's runner: each notification command of a batch
delivered (streams.worker acknowledges the batch only after), one recipient's commands in
order, different recipients side by side. A command that cannot be delivered for good
(an unreadable record, an unknown recipient, a receiver's permanent refusal, retries
used up) goes to the group's dead-letter queue with the receiver's answer; the ledger
keeps what was sent, so a redelivered batch sends nothing twice."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import UUID

import httpx
import orjson
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from contract import NOTIFICATION_COMMANDS
from infra.settings import Settings
from notifications.channels import Chat, Email, Permanent
from notifications.dispatcher import Channel, Dispatcher
from notifications.ledger import Ledger
from notifications.ratelimit import RateLimit
from notifications.templates import TEMPLATES
from projectors.projection import NonRetryable
from streams.deadletters import AnyRecord, DeadLetters, Failure

log = logging.getLogger("ringiflow.notifications")

DELIVERED = Counter("ringiflow_notifications_total", "Notification deliveries by outcome",
                    ["channel", "outcome"])
REQUIRED = ("notification_id", "type", "user_id", "tenant_id")


class Undeliverable(NonRetryable):
    """Not delivered on at least one channel, for good; the message says why."""


def email_channel(settings: Settings) -> Email | None:
    """The SMTP server of `smtp_url` (None when there is none: email is then skipped)."""
    if not settings.smtp_url:
        return None
    url = urlsplit(settings.smtp_url)
    query = parse_qs(url.query)
    return Email(url.hostname or "localhost", url.port or (465 if url.scheme == "smtps" else 25),
                 settings.smtp_sender, settings.notification_timeout_s,
                 unquote(url.username) if url.username else None,
                 unquote(url.password) if url.password else None,
                 starttls=query.get("starttls", ["false"])[0].lower() == "true")


class DispatchRunner:
    def __init__(self, settings: Settings, dead_letters: DeadLetters,
                 pool: AsyncConnectionPool) -> None:
        self.settings, self.dead_letters = settings, dead_letters
        self.ledger = Ledger(pool)
        self.http = httpx.AsyncClient(follow_redirects=False)
        channels: dict[str, Channel] = {"chat": Chat(self.http, settings.notification_timeout_s)}
        if (email := email_channel(settings)) is not None:
            channels["email"] = email
        self.dispatcher = Dispatcher(
            self.ledger, channels,
            RateLimit(settings.notification_rate_per_minute, settings.notification_burst),
            attempts=settings.notification_attempts)
        self.stop = asyncio.Event()

    @property
    def topics(self) -> tuple[str, ...]:
        return (NOTIFICATION_COMMANDS.name,)

    async def start(self) -> None:
        if "email" not in self.dispatcher.channels:
            log.warning("no SMTP server configured (RINGIFLOW_SMTP_URL): email notifications "
                        "are recorded as skipped")

    async def process(self, records: Sequence[AnyRecord]) -> None:
        by_recipient: dict[bytes, list[AnyRecord]] = {}
        for record in records:
            by_recipient.setdefault(record.key or b"", []).append(record)
        failures: list[Failure] = []

        async def one_recipient(queue: list[AnyRecord]) -> None:
            for record in queue:
                failure = await self._deliver(record)
                if failure is not None:
                    failures.append(failure)

        await asyncio.gather(*(one_recipient(q) for q in by_recipient.values()))
        if failures:
            await self.dead_letters.send(failures)

    async def _deliver(self, record: AnyRecord) -> Failure | None:
        first = datetime.now(UTC)
        try:
            command = read_command(record.value)
        except ValueError as exc:
            return Failure(record, Undeliverable(str(exc)), 1, first, first)
        tenant = UUID(command["tenant_id"])
        try:
            outcome = await self.dispatcher.dispatch(command)
        except Permanent as exc:
            DELIVERED.labels("any", "failed").inc()
            return Failure(record, Undeliverable(str(exc)), 1, first, datetime.now(UTC),
                           tenant_id=tenant)
        for channel in outcome.sent:
            DELIVERED.labels(channel, "sent").inc()
        if not outcome.failed:
            return None
        for channel in outcome.failed:
            DELIVERED.labels(channel, "failed").inc()
        why = "; ".join(f"{channel}: {error}" for channel, error in outcome.failed.items())
        log.error("notification %s to %s not delivered: %s", command["notification_id"],
                  command["user_id"], why)
        return Failure(record, Undeliverable(why), self.dispatcher.attempts, first,
                       datetime.now(UTC), tenant_id=tenant)


def read_command(value: bytes | None) -> dict[str, Any]:
    """The notification command of a record; ValueError says what is wrong with it."""
    try:
        command = orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not a JSON notification command: {exc}") from None
    if not isinstance(command, dict):
        raise ValueError("a notification command is a JSON object")
    missing = [field for field in REQUIRED if not command.get(field)]
    if missing:
        raise ValueError(f"notification command without {', '.join(missing)}")
    if command["type"] not in TEMPLATES:
        raise ValueError(f"no template for notification type {command['type']!r}; known: "
                         f"{', '.join(TEMPLATES)}")
    try:
        UUID(command["tenant_id"]), UUID(command["user_id"]), UUID(command["notification_id"])
    except (ValueError, TypeError, AttributeError):
        raise ValueError("tenant_id, user_id and notification_id must be UUIDs") from None
    return command


def build(settings: Settings, dead_letters: DeadLetters, pool: AsyncConnectionPool) -> Any:
    return DispatchRunner(settings, dead_letters, pool)
