"""Delivering one notification command: to whom (the recipients read model), on which
channels (the recipient's preferences), saying what (the templates, in the recipient's
locale), how often (the per-recipient rate limit), and what happened (the ledger)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from infra.retry import Backoff
from notifications.channels import Message, Permanent, Transient
from notifications.ledger import Ledger, Recipient
from notifications.ratelimit import RateLimit
from notifications.templates import render

log = logging.getLogger("ringiflow.notifications")


class Channel(Protocol):
    name: str

    async def send(self, message: Message) -> None: ...


class UnknownRecipient(Permanent):
    """The recipient is not a user of the tenant (the event store has no such user)."""


@dataclass
class Outcome:
    sent: list[str]  # channels
    failed: dict[str, str]  # channel -> why (permanent, or out of retries)


class Dispatcher:
    def __init__(self, ledger: Ledger, channels: dict[str, Channel], limit: RateLimit,
                 backoff: Backoff | None = None, attempts: int = 5) -> None:
        self.ledger, self.channels, self.limit = ledger, channels, limit
        self.backoff, self.attempts = backoff or Backoff(0.2, 5.0), attempts

    async def dispatch(self, command: dict[str, Any]) -> Outcome:
        """Deliver on every channel the recipient chose that has not had it yet.
        Retries a transient failure within the budget; a permanent failure (or one out
        of retries) is recorded and returned, for the dead-letter queue."""
        recipient = await self._recipient(command)
        outcome = Outcome([], {})
        throttled: bool | None = None  # decided once per notification, when one is due
        for channel_name in recipient.channels:
            channel = self.channels.get(channel_name)
            notification_id = UUID(command["notification_id"])
            address = recipient.email if channel_name == "email" else recipient.chat_webhook_url
            if channel is None or not address:
                await self.ledger.record(command, channel_name, "skipped", address, None, 0,
                                         "no such channel configured" if channel is None
                                         else f"no {channel_name} address")
                continue
            if await self.ledger.status(recipient_tenant(command), notification_id,
                                        channel_name) == "sent":
                continue  # redelivered: it went out already
            if throttled is None:
                throttled = await self._throttled(recipient)
            if throttled:
                await self.ledger.record(
                    command, channel_name, "skipped", address, None, 0,
                    f"rate limited: over {self.limit.per_minute:g} a minute for this recipient")
                continue
            subject, body = render(command["type"], recipient.locale, command)
            message = Message(str(notification_id), address, recipient.display_name, subject,
                              body)
            error, attempts = await self._send(channel, message)
            if error is None:
                await self.ledger.record(command, channel_name, "sent", address, subject,
                                         attempts)
                outcome.sent.append(channel_name)
            else:
                await self.ledger.record(command, channel_name, "failed", address, subject,
                                         attempts, error)
                outcome.failed[channel_name] = error
        return outcome

    async def _recipient(self, command: dict[str, Any]) -> Recipient:
        tenant, user = recipient_tenant(command), UUID(command["user_id"])
        recipient = await self.ledger.recipient(tenant, user)
        if recipient is None:
            raise UnknownRecipient(f"user {user} is not registered in tenant {tenant}")
        return recipient

    async def _throttled(self, recipient: Recipient) -> bool:
        wait = self.limit.wait_s(str(recipient.user_id))
        if wait is None:
            log.warning("rate limit: notification to %s not sent (over %g a minute)",
                        recipient.user_id, self.limit.per_minute)
            return True
        if wait:
            await asyncio.sleep(wait)
        return False

    async def _send(self, channel: Channel, message: Message) -> tuple[str | None, int]:
        """(None once sent, else why not; the attempts it took)."""
        delays = self.backoff.start()
        while True:
            try:
                await channel.send(message)
                return None, delays.attempts + 1
            except Permanent as exc:
                return f"{type(exc).__name__}: {exc}", delays.attempts + 1
            except Transient as exc:
                if delays.attempts + 1 >= self.attempts:
                    return (f"{type(exc).__name__} after {self.attempts} attempts: {exc}",
                            self.attempts)
                delay = delays.next()
                log.warning("%s to %s failed for now (%s); retrying in %.1f s", channel.name,
                            message.to_address, exc, delay)
                await asyncio.sleep(delay)


def recipient_tenant(command: dict[str, Any]) -> UUID:
    return UUID(command["tenant_id"])
