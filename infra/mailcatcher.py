"""A developer's mail catcher: a real SMTP server (aiosmtpd) that keeps every message it
accepts in a folder, one `.eml` file each plus a line in `received.jsonl` (sender,
recipients, subject, the notification id), so on a fresh machine the whole notification
path is real and what was "sent" can be read back. `ringiflow up` runs it when no SMTP
server is configured; tests run it in-process (`MailCatcher`).

    python -m infra.mailcatcher --port 2525 --dir DATA/mail
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import itertools
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from infra.servers import free_port

INDEX = "received.jsonl"


@dataclass
class Keeper:
    """The aiosmtpd handler: writes each message down before answering 250, so an
    accepted message is never only in memory."""

    folder: Path
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.keep(envelope)  # a local disk write: not worth a thread
        return "250 Message accepted for delivery"

    def keep(self, envelope: Envelope) -> None:
        raw = envelope.original_content or b""
        message = email.message_from_bytes(raw, policy=email.policy.default)
        name = f"{time.time_ns()}-{next(self.counter)}.eml"
        (self.folder / name).write_bytes(raw)
        entry = {"file": name, "from": envelope.mail_from, "to": envelope.rcpt_tos,
                 "subject": str(message.get("Subject", "")),
                 "notification_id": message.get("X-RingiFlow-Notification-Id"),
                 "received_at": time.time()}
        with open(self.folder / INDEX, "a", encoding="utf-8") as index:
            index.write(json.dumps(entry, ensure_ascii=False) + "\n")


def received(folder: Path) -> list[dict[str, Any]]:
    """Every message the catcher in `folder` accepted, oldest first."""
    try:
        lines = (folder / INDEX).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def body_of(folder: Path, entry: dict[str, Any]) -> str:
    message = email.message_from_bytes((folder / entry["file"]).read_bytes(),
                                       policy=email.policy.default)
    part = message.get_body(("plain",))
    return part.get_content() if part is not None else ""


class MailCatcher:
    """In-process (a thread of its own): `with MailCatcher(folder) as catcher: ...`."""

    def __init__(self, folder: Path, port: int = 0, handler: Any = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.controller = Controller(handler or Keeper(folder), hostname="127.0.0.1",
                                     port=port or free_port())

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.controller.port}"

    def received(self) -> list[dict[str, Any]]:
        return received(self.folder)

    def __enter__(self) -> MailCatcher:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    catcher = MailCatcher(args.dir, args.port)
    catcher.controller.start()
    print(f"mail catcher listening on {catcher.url}, keeping mail in {args.dir}", flush=True)
    stopped = asyncio.Event()
    loop = asyncio.new_event_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    try:
        loop.run_until_complete(stopped.wait())
    finally:
        catcher.controller.stop()


if __name__ == "__main__":
    main()
