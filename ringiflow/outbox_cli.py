"""`ringiflow outbox`: the transactional outbox and its relay (status, retry, cleanup,
reconcile)."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

import typer

from infra.settings import ConfigError
from ringiflow.options import (
    DataDir,
    JsonOut,
    echo_json,
    owner_url,
    settings_of,
)

outbox_app = typer.Typer(no_args_is_help=True, help="The transactional outbox and its relay.")


@outbox_app.command("status")
def outbox_status(data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """Backlog, oldest pending age and failed rows. Exits 1 when rows have failed."""
    import asyncio

    import psycopg

    from relay import outbox

    async def read() -> outbox.Status:
        async with await psycopg.AsyncConnection.connect(owner_url(data_dir),
                                                         autocommit=True) as conn:
            return await outbox.status(conn)

    status = asyncio.run(read())
    if json_out:
        echo_json(status.as_dict())
    else:
        age = f"{status.oldest_pending_age_s:.1f} s" if status.oldest_pending_age_s else "-"
        typer.echo(f"pending {status.pending}   oldest pending {age}   published "
                   f"{status.published}   failed {status.failed} "
                   f"({status.blocked_aggregates} aggregates held back)")
        for row in status.failed_rows:
            typer.echo(f"  FAILED {row['aggregate_type']} {row['aggregate_id']} "
                       f"v{row['version']} {row['event_type']} after {row['retry_count']} "
                       f"attempts: {row['last_error']}")
        if status.failed:
            typer.echo("fix the cause, then `ringiflow outbox retry [--aggregate ID]`", err=True)
    raise typer.Exit(1 if status.failed else 0)


@outbox_app.command("retry")
def outbox_retry(
    aggregate: Annotated[UUID | None, typer.Option(help="Only this aggregate.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Return failed rows to pending so the relay tries them again, in order."""
    import asyncio

    import psycopg

    from relay import outbox

    async def run_retry() -> int:
        async with await psycopg.AsyncConnection.connect(owner_url(data_dir),
                                                         autocommit=True) as conn:
            return await outbox.retry_failed(conn, aggregate)

    typer.echo(f"{asyncio.run(run_retry())} failed rows returned to pending")


@outbox_app.command("cleanup")
def outbox_cleanup(
    older_than_days: Annotated[float | None, typer.Option(
        help="Retention (default RINGIFLOW_OUTBOX_RETENTION_DAYS, 7).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Delete published rows older than the retention, in small batches."""
    import asyncio
    from datetime import timedelta

    import psycopg

    from relay import outbox

    days = older_than_days if older_than_days is not None else \
        settings_of(data_dir).outbox_retention_days
    if not 0 <= days <= 36_500:  # also NaN and infinity
        raise ConfigError(f"--older-than-days must be a number of days from 0 to 36500, not "
                          f"{days:g}: nothing deleted")

    async def run_cleanup() -> int:
        async with await psycopg.AsyncConnection.connect(owner_url(data_dir),
                                                         autocommit=True) as conn:
            return await outbox.cleanup(conn, timedelta(days=days))

    typer.echo(f"deleted {asyncio.run(run_cleanup())} published rows older than {days:g} days")


@outbox_app.command("reconcile")
def outbox_reconcile(
    days: Annotated[float, typer.Option(help="Look this far back (Kafka keeps 7 days).")] = 7.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report only.")] = False,
    data_dir: DataDir = None, json_out: JsonOut = False,
) -> None:
    """Re-publish from the events table every event the Kafka topics lack."""
    import asyncio
    from datetime import UTC, datetime, timedelta

    from relay.reconcile import reconcile

    settings = settings_of(data_dir).with_runtime()
    since = datetime.now(UTC) - timedelta(days=days)
    reports = asyncio.run(reconcile(
        owner_url(data_dir), settings.require("kafka_bootstrap"), since, dry_run,
        progress=(lambda _m: None) if json_out else (lambda m: typer.echo(f"· {m}", err=True))))
    if json_out:
        echo_json([r.as_dict() for r in reports])
        return
    for r in reports:
        action = "would queue" if dry_run else "queued"
        typer.echo(f"{r.topic}: {r.events} events in window, {r.in_kafka} in Kafka, "
                   f"{r.missing} missing; {action} "
                   f"{r.requeued if not dry_run else 'the tails of'} {len(r.aggregates)} "
                   "aggregates")
