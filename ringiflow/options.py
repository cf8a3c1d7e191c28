"""What every `ringiflow` verb shares: its options and how it reads settings, logs and
prints."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated
from uuid import UUID

import typer

from infra.settings import ConfigError, Settings, load_settings

Group = Annotated[str | None, typer.Option("--group", help="Consumer group, e.g. "
                                           "workflow-projector.")]
DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="State directory (default ~/.ringiflow, or "
                 "RINGIFLOW_DATA_DIR)."),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def settings_of(data_dir: Path | None, **overrides: object) -> Settings:
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    return load_settings(**overrides)


def configure_logging(settings: Settings) -> None:
    from infra import logsafe

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logsafe.install()  # no bearer token, API key or password reaches a log line


def owner_url(data_dir: Path | None) -> str:
    from infra.settings import libpq_url

    return libpq_url(settings_of(data_dir).with_runtime().require("database_url"))


def echo_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def filters_of(group: str | None, error_class: str | None, aggregate: UUID | None,
               event_type: str | None, since: str | None, until: str | None) -> object:
    from datetime import datetime

    from operations.dlq import Filters

    def when(value: str | None, name: str) -> datetime | None:
        if value is None:
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(f"--{name} {value!r} is not an ISO 8601 time, e.g. "
                              "2026-11-23T09:00:00+00:00") from None
        if parsed.tzinfo is None:
            raise ConfigError(f"--{name} needs a time zone, e.g. 2026-11-23T09:00:00Z")
        return parsed

    if group is not None:
        from operations.dlq import check_group

        check_group(group)
    return Filters(group, error_class, aggregate, event_type, when(since, "since"),
                   when(until, "until"))


ErrorClass = Annotated[str | None, typer.Option(help="e.g. NonRetryable, UndecodableRecord.")]
AggregateOpt = Annotated[UUID | None, typer.Option("--aggregate", help="One aggregate.")]
Since = Annotated[str | None, typer.Option(help="ISO 8601, with a time zone.")]
