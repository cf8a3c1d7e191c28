"""The channels a notification goes out on, and how their failures are classed:
`Transient` (the receiver may take it later: SMTP 4xx, HTTP 5xx or 429, a timeout, a
refused connection) is retried with backoff; `Permanent` (SMTP 5xx, HTTP 4xx) goes to
the dead-letter queue with the receiver's answer."""

from __future__ import annotations

import asyncio
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import httpx


class DeliveryError(Exception):
    """A channel could not deliver; `str(error)` is the receiver's answer."""


class Transient(DeliveryError):
    pass


class Permanent(DeliveryError):
    pass


@dataclass(frozen=True)
class Message:
    notification_id: str
    to_address: str  # an email address or a chat webhook URL
    to_name: str
    subject: str
    body: str


class Email:
    """SMTP, one connection per message (notifications are few; no pool to go stale)."""

    name = "email"

    def __init__(self, host: str, port: int, sender: str, timeout_s: float = 10.0,
                 username: str | None = None, password: str | None = None,
                 starttls: bool = False) -> None:
        self.host, self.port, self.sender, self.timeout_s = host, port, sender, timeout_s
        self.username, self.password, self.starttls = username, password, starttls

    async def send(self, message: Message) -> None:
        await asyncio.to_thread(self._send, message)

    def _send(self, message: Message) -> None:
        mail = EmailMessage()
        mail["From"] = self.sender
        mail["To"] = f"{message.to_name} <{message.to_address}>"
        mail["Subject"] = message.subject
        mail["Date"] = formatdate(localtime=False)
        # The notification id, so a receiver (or an operator) can tell one from another.
        mail["Message-ID"] = make_msgid(idstring=message.notification_id.replace("-", ""))
        mail["X-RingiFlow-Notification-Id"] = message.notification_id
        mail.set_content(message.body, charset="utf-8")
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout_s) as smtp:
                if self.starttls:
                    smtp.starttls()
                if self.username:
                    smtp.login(self.username, self.password or "")
                smtp.send_message(mail)
        except smtplib.SMTPResponseException as exc:  # includes refused recipients/data
            answer = f"SMTP {exc.smtp_code} {exc.smtp_error!r}"
            raise (Permanent if 500 <= exc.smtp_code < 600 else Transient)(answer) from exc
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            error = Permanent if codes and all(500 <= c < 600 for c in codes) else Transient
            raise error(f"SMTP refused the recipient: {exc.recipients}") from exc
        except (OSError, smtplib.SMTPException) as exc:  # unreachable, timed out, dropped
            raise Transient(f"SMTP {self.host}:{self.port}: {type(exc).__name__}: {exc}") \
                from exc


class Chat:
    """A Slack/Teams-compatible incoming webhook: a JSON `text`, plus a title and the
    notification id for receivers that show them."""

    name = "chat"

    def __init__(self, client: httpx.AsyncClient, timeout_s: float = 10.0) -> None:
        self.client, self.timeout_s = client, timeout_s

    async def send(self, message: Message) -> None:
        body = {"text": f"*{message.subject}*\n{message.body}", "title": message.subject,
                "notification_id": message.notification_id}
        try:
            response = await self.client.post(
                message.to_address, json=body, timeout=self.timeout_s,
                headers={"X-RingiFlow-Notification-Id": message.notification_id})
        except httpx.HTTPError as exc:
            raise Transient(f"chat webhook: {type(exc).__name__}: {exc}") from exc
        if response.status_code < 300:
            return
        answer = f"chat webhook answered {response.status_code}: {response.text[:300]}"
        if response.status_code == 429 or response.status_code >= 500:
            raise Transient(answer)
        raise Permanent(answer)
