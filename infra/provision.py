"""Bringing servers to what RingiFlow needs: schema, roles and topics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from infra import db, kafka
from infra.embedded import EmbeddedStack
from infra.settings import Settings


def provision(settings: Settings) -> list[kafka.TopicReport]:
    """Apply migrations (and role passwords) and create missing topics; idempotent."""
    db.migrate(settings.require("database_url"), settings.role_password)
    return kafka.ensure_topics(settings.require("kafka_bootstrap"))


@contextmanager
def embedded_system(settings: Settings) -> Iterator[Settings]:
    """Embedded servers for every URL not set, provisioned; stopped on exit
    however the block ends. Yields the settings with every URL filled in."""
    stack = EmbeddedStack(settings.data_path, settings.startup_timeout_s)
    try:
        ready = settings.model_copy(update=stack.start(settings))
        provision(ready)
        yield ready
    finally:
        stack.stop()
