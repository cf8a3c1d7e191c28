"""Logs that keep secrets out: every log record is redacted before any handler
sees it, and the log files the system writes are private to its user.

`redact` removes bearer credentials and passwords from a line of text: JWTs
(three base64url segments starting `eyJ`), `token=` (and `access_token=` ...)
query values, `Authorization` header values, `X-API-Key` values, and the
password of a URL (`postgresql://user:pw@host`). `install()` makes every record
of the process pass through it, whichever handler writes it and whenever that
handler was configured (uvicorn, Faust and basicConfig configure their own),
by wrapping the log record factory and adding a filter to the handlers that
exist. `open_log` creates a log file 0600 in a directory 0700.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

REDACTED = "<redacted>"
LOG_DIR_MODE = 0o700
LOG_FILE_MODE = 0o600

# Header names quoted or not, with `:`, `=` or `', b'` between name and value
# (text, key=value, dict and ASGI header-tuple reprs).
_SEP = r"""['"]?\s*(?:[:=]|,)\s*(?:b?['"])?"""
_PATTERNS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    # A JWT (JWS: three segments; the signature may be empty for alg=none).
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # The password of a URL's userinfo: scheme://user:password@host.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@'\"]*:)[^\s@/'\"]+@"), rf"\1{REDACTED}@"),
    # token=..., access_token=..., consistency_token=... in a query string or text.
    (re.compile(r"(?i)\b([a-z_]*token=)[^&\s'\"#;,)]+"), rf"\1{REDACTED}"),
    (re.compile(r"(?i)\b((?:password|passwd|pwd|secret|api_key|apikey)=)[^&\s'\"#;,)]+"),
     rf"\1{REDACTED}"),
    # Authorization: <scheme> <credentials> (or just the credentials).
    (re.compile(rf"(?i)(\b(?:proxy-)?authorization{_SEP})"
                r"(?:(bearer|basic|token|digest)\s+)?[^\s'\",;)}\]]+"),
     lambda m: f"{m.group(1)}{m.group(2) + ' ' if m.group(2) else ''}{REDACTED}"),
    (re.compile(r"(?i)\b(bearer\s+)(?!<redacted>)[A-Za-z0-9._~+/=-]+"), rf"\1{REDACTED}"),
    # X-API-Key: <key>
    (re.compile(rf"(?i)(\bx[-_]api[-_]key{_SEP})[^\s'\",;)}}\]]+"), rf"\1{REDACTED}"),
)


def redact(text: str) -> str:
    """`text` without bearer tokens, API keys or URL passwords."""
    if not text:
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    if getattr(record, "_ringiflow_redacted", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it at emit time
        return record
    safe = redact(message)
    if safe != message:
        record.msg, record.args = safe, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._ringiflow_redacted = True  # type: ignore[attr-defined]
    return record


class RedactingFilter(logging.Filter):
    """A handler filter that redacts a record (it never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


_installed = False


def install() -> None:
    """Redact every log record of this process (idempotent): records are made
    redacted by the record factory, and every handler configured so far gets a
    RedactingFilter as well (for records made elsewhere, e.g. makeLogRecord)."""
    global _installed
    if not _installed:
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return _redact_record(previous(*args, **kwargs))

        logging.setLogRecordFactory(factory)
        _installed = True
    filter_handlers()


def filter_handlers() -> None:
    """Add a RedactingFilter to every handler of every logger that has none."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values()
                if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in lg.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging configuration with the redacting filter on its handlers."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact"] = {"()": "infra.logsafe.RedactingFilter"}
    for handler in config.get("handlers", {}).values():
        handler["filters"] = [*handler.get("filters", []), "redact"]
    return config


def private_dir(path: Path) -> Path:
    """A directory only its owner can enter (made, or tightened if it exists)."""
    path.mkdir(parents=True, exist_ok=True, mode=LOG_DIR_MODE)
    with contextlib.suppress(PermissionError):
        path.chmod(LOG_DIR_MODE)
    return path


def open_log(path: Path) -> BinaryIO:
    """Open a log file for appending, 0600 (also when it existed with looser
    permissions), in a 0700 directory."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, LOG_FILE_MODE)
    try:
        os.fchmod(fd, LOG_FILE_MODE)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def tighten(logs: Path) -> None:
    """Make the log files an older version left readable private (0600)."""
    if not logs.is_dir():
        return
    private_dir(logs)
    for path in logs.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                path.chmod(LOG_FILE_MODE)
