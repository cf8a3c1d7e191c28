"""Read-your-writes: the consistency token a command returns, and the notifications a
projector sends naming what it made visible."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar
from uuid import UUID

import orjson

from contract.envelope import AggregateType

# PostgreSQL NOTIFY channel: a projector names what each batch it committed made
# visible, so the query API wakes only the waits those versions satisfy (one read
# each) instead of every wait of the tenant (a re-read per wait per batch).
APPLIED_NOTIFY_CHANNEL = "ringiflow_applied"
NOTIFY_PAYLOAD_MAX = 7900  # PostgreSQL's limit is 8000 bytes

Applied = tuple[UUID, UUID, int]  # (tenant_id, aggregate_id, version now visible)


def applied_payloads(read_model: str, applied: Iterable[Applied]) -> list[str]:
    """`read_model;tenant:aggregate:version,...` payloads, each within NOTIFY's limit;
    one entry per aggregate (its newest version)."""
    newest: dict[tuple[UUID, UUID], int] = {}
    for tenant, aggregate, version in applied:
        newest[(tenant, aggregate)] = max(version, newest.get((tenant, aggregate), 0))
    payloads, entries, size = [], [], len(read_model) + 1
    for (tenant, aggregate), version in newest.items():
        entry = f"{tenant}:{aggregate}:{version}"
        if entries and size + len(entry) + 1 > NOTIFY_PAYLOAD_MAX:
            payloads.append(f"{read_model};" + ",".join(entries))
            entries, size = [], len(read_model) + 1
        entries.append(entry)
        size += len(entry) + 1
    if entries:
        payloads.append(f"{read_model};" + ",".join(entries))
    return payloads


def parse_applied(payload: str) -> tuple[str, list[Applied]]:
    """The inverse of applied_payloads; a malformed entry is skipped."""
    read_model, _, rest = payload.partition(";")
    found: list[Applied] = []
    for entry in rest.split(","):
        try:
            tenant, aggregate, version = entry.split(":")
            found.append((UUID(tenant), UUID(aggregate), int(version)))
        except ValueError:
            continue
    return read_model, found


@dataclass(frozen=True)
class ConsistencyToken:
    """Where a command's write landed; a query waits until its read model has
    applied `version` of `aggregate_id`. Opaque to clients.

    It names only the caller's own aggregate and version: no global position,
    which would show other tenants' activity as gaps between two tokens."""

    aggregate_type: AggregateType
    aggregate_id: UUID
    version: int

    MAX_LENGTH: ClassVar[int] = 200
    MAX_VERSION: ClassVar[int] = 2**31 - 1  # the events table's integer column

    def encode(self) -> str:
        # orjson writes what json.dumps with (",", ":") separators does for these values
        # (ASCII strings, an int), at a tenth of its cost: one per command.
        raw = orjson.dumps([self.aggregate_type.value, str(self.aggregate_id), self.version])
        return "ct2." + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> ConsistencyToken:
        """Strictly: three fields of exactly the types encode() writes (ct1 tokens,
        which also carried a position, are still read)."""
        try:
            if len(token) > cls.MAX_LENGTH:
                raise ValueError(f"longer than {cls.MAX_LENGTH} characters")
            prefix, _, body = token.partition(".")
            if prefix not in ("ct1", "ct2"):
                raise ValueError("unknown prefix")
            fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)),
                                parse_constant=_refuse_constant)
            if not isinstance(fields, list) or len(fields) != (4 if prefix == "ct1" else 3):
                raise ValueError("wrong number of fields")
            kind, aggregate_id, version = fields[:3]
            if not (isinstance(kind, str) and isinstance(aggregate_id, str)
                    and type(version) is int and 1 <= version <= cls.MAX_VERSION):
                raise ValueError("a field has the wrong type or range")
            return cls(AggregateType(kind), UUID(aggregate_id), version)
        except (ValueError, TypeError, RecursionError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"malformed consistency token ({exc}): send the value a command response "
                "returned, unchanged"
            ) from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")
