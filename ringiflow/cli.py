"""The `ringiflow` operator CLI (SPEC §7)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated
from uuid import UUID

import typer

from infra.settings import ConfigError, Settings, load_settings

app = typer.Typer(
    name="ringiflow", no_args_is_help=True, add_completion=False,
    help="Run and operate RingiFlow, the event-sourced approval-workflow service.",
)
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics of the catalogue.")
app.add_typer(topics_app, name="topics")
outbox_app = typer.Typer(no_args_is_help=True, help="The transactional outbox and its relay.")
app.add_typer(outbox_app, name="outbox")
dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters and parked aggregates.")
app.add_typer(dlq_app, name="dlq")

Group = Annotated[str | None, typer.Option("--group", help="Consumer group, e.g. "
                                           "workflow-projector.")]
BULK_CONFIRM_ABOVE = 10

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="State directory (default ~/.ringiflow, or "
                 "RINGIFLOW_DATA_DIR)."),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _settings(data_dir: Path | None, **overrides: object) -> Settings:
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    return load_settings(**overrides)


def _configure_logging(settings: Settings) -> None:
    from infra import logsafe

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logsafe.install()  # no bearer token, API key or password reaches a log line


@app.command()
def up(
    data_dir: DataDir = None,
    command_port: Annotated[int | None, typer.Option(help="Command API port (8000).")] = None,
    query_port: Annotated[int | None, typer.Option(help="Query API port (8001).")] = None,
) -> None:
    """Run the whole system: embedded servers for every URL not set, then the
    command API, relay, workers and query API, supervised."""
    from ringiflow.supervisor import up as run_up

    overrides: dict[str, object] = {}
    if command_port is not None:
        overrides["command_api_port"] = command_port
    if query_port is not None:
        overrides["query_api_port"] = query_port
    settings = _settings(data_dir, **overrides)
    _configure_logging(settings)
    raise typer.Exit(run_up(settings))


@app.command()
def run(component: Annotated[str, typer.Argument(help="command-api | query-api | relay | "
                                                  "workers")]) -> None:
    """Run one application process (what `up` supervises; used by containers)."""
    from ringiflow.components import COMPONENTS, run_component

    if component not in COMPONENTS:
        raise ConfigError(f"unknown component {component!r}; choose one of "
                          f"{', '.join(COMPONENTS)}")
    settings = load_settings().with_runtime()
    _configure_logging(settings)
    run_component(component, settings)


@app.command()
def projector(
    group: Annotated[str, typer.Argument(help="Consumer group, e.g. workflow-projector.")],
    port: Annotated[int, typer.Option(help="Health and metrics port.")] = 0,
) -> None:
    """Run one projection's Faust worker (what `run workers` starts for each)."""
    from infra.embedded import free_port
    from projectors.catalogue import CATALOGUE
    from streams.worker import run_projector

    if group not in CATALOGUE:
        raise ConfigError(f"unknown projection {group!r}; choose one of {', '.join(CATALOGUE)}")
    settings = load_settings().with_runtime()
    _configure_logging(settings)
    run_projector(group, settings, port or free_port())


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Apply database migrations (idempotent)."""
    from infra import db

    settings = _settings(data_dir).with_runtime()
    url = settings.require("database_url")
    db.migrate(url, settings.role_password)
    typer.echo(f"database at revision {db.current_revision(url)}")


@topics_app.command("ensure")
def topics_ensure(data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """Create every topic of the catalogue that is missing."""
    from infra import kafka

    settings = _settings(data_dir).with_runtime()
    reports = kafka.ensure_topics(settings.require("kafka_bootstrap"))
    if json_out:
        typer.echo(json.dumps([r.__dict__ for r in reports], indent=2))
    else:
        for r in reports:
            typer.echo(f"{r.state:>18}  {r.name}  ({r.partitions} partitions)")
    if any(r.state == "partition_mismatch" for r in reports):
        typer.echo("some topics differ from the catalogue's partition count; they were left "
                   "as they are (repartitioning would break per-aggregate order)", err=True)
        raise typer.Exit(1)


@app.command()
def token(
    tenant: Annotated[UUID, typer.Option(help="Tenant id (UUID).")],
    user: Annotated[UUID, typer.Option(help="User id (UUID), the token's subject.")],
    name: Annotated[str, typer.Option(help="Display name.")] = "dev user",
    role: Annotated[list[str] | None, typer.Option(help="Role; repeatable.")] = None,
    ttl_hours: Annotated[float, typer.Option(help="Lifetime in hours.")] = 12.0,
    data_dir: DataDir = None,
) -> None:
    """Print a dev bearer token accepted by both APIs of the running system (the
    `ringiflow up` on the same --data-dir; or signed with RINGIFLOW_JWT_SECRET)."""
    from datetime import timedelta

    from infra.auth import mint_token
    from infra.settings import JWT_SECRET_FILE, secret_file
    from ringiflow.supervisor import _running_supervisor

    if ttl_hours <= 0:
        raise ConfigError(f"--ttl-hours must be positive, not {ttl_hours:g}")
    settings = _settings(data_dir)
    if settings.jwt_secret is not None:
        secret = settings.jwt_secret.get_secret_value()
    else:
        # Never a fresh secret: a token the running system would answer with 401.
        secret = secret_file(settings.data_path / JWT_SECRET_FILE, create=False) \
            if _running_supervisor(settings) else None
        if secret is None:
            raise ConfigError(
                f"no running `ringiflow up` found in data dir {settings.data_path}, so no "
                "token it would accept: start it first (`./dev up`), pass the --data-dir "
                "it runs on, or set RINGIFLOW_JWT_SECRET to the secret the APIs use")
    typer.echo(mint_token(secret, tenant_id=tenant, user_id=user, name=name,
                          roles=role or ["user"], ttl=timedelta(hours=ttl_hours)))


def _owner_url(data_dir: Path | None) -> str:
    from infra.settings import libpq_url

    return libpq_url(_settings(data_dir).with_runtime().require("database_url"))


def _echo_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


@outbox_app.command("status")
def outbox_status(data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """Backlog, oldest pending age and failed rows. Exits 1 when rows have failed."""
    import asyncio

    import psycopg

    from relay import outbox

    async def read() -> outbox.Status:
        async with await psycopg.AsyncConnection.connect(_owner_url(data_dir),
                                                         autocommit=True) as conn:
            return await outbox.status(conn)

    status = asyncio.run(read())
    if json_out:
        _echo_json(status.as_dict())
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
        async with await psycopg.AsyncConnection.connect(_owner_url(data_dir),
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
        _settings(data_dir).outbox_retention_days
    if not 0 <= days <= 36_500:  # also NaN and infinity
        raise ConfigError(f"--older-than-days must be a number of days from 0 to 36500, not "
                          f"{days:g}: nothing deleted")

    async def run_cleanup() -> int:
        async with await psycopg.AsyncConnection.connect(_owner_url(data_dir),
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

    settings = _settings(data_dir).with_runtime()
    since = datetime.now(UTC) - timedelta(days=days)
    reports = asyncio.run(reconcile(
        _owner_url(data_dir), settings.require("kafka_bootstrap"), since, dry_run,
        progress=(lambda _m: None) if json_out else (lambda m: typer.echo(f"· {m}", err=True))))
    if json_out:
        _echo_json([r.as_dict() for r in reports])
        return
    for r in reports:
        action = "would queue" if dry_run else "queued"
        typer.echo(f"{r.topic}: {r.events} events in window, {r.in_kafka} in Kafka, "
                   f"{r.missing} missing; {action} "
                   f"{r.requeued if not dry_run else 'the tails of'} {len(r.aggregates)} "
                   "aggregates")


def _filters(group: str | None, error_class: str | None, aggregate: UUID | None,
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


@dlq_app.command("list")
def dlq_list(group: Group = None, error_class: ErrorClass = None,
             aggregate: AggregateOpt = None, since: Since = None, until: Since = None,
             data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """Parked aggregates: which event they wait behind and why."""
    from operations.dlq import parked

    rows = parked(_settings(data_dir).with_runtime(),
                  _filters(group, error_class, aggregate, None, since, until))  # type: ignore[arg-type]
    if json_out:
        _echo_json(rows)
        return
    if not rows:
        typer.echo("no parked aggregates")
    for r in rows:
        typer.echo(f"{r['consumer_group']:<24} {r['aggregate_type']} {r['aggregate_id']} "
                   f"v{r['first_version']}..v{r['last_version']} ({r['parked_events']} events) "
                   f"{r['error_class']}: {r['error_message'][:120]}  since {r['parked_at']}")


@dlq_app.command("show")
def dlq_show(aggregate: Annotated[UUID, typer.Argument(help="The parked aggregate.")],
             group: Group = None, data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """An aggregate's dead letters, in order, with their error context."""
    from operations.dlq import records

    rows = records(_settings(data_dir).with_runtime(),
                   _filters(group, None, aggregate, None, None, None))  # type: ignore[arg-type]
    if json_out:
        _echo_json(rows)
    else:
        for r in rows:
            typer.echo(f"[{r['group']}] {r['reason']} {r['event_type']} v{r['version']} "
                       f"(event {r['event_id']}) from {r['original']['topic']}"
                       f"[{r['original']['partition']}]@{r['original']['offset']}")
            typer.echo(f"    {r['error_class']}: {r['error_message']}")
            typer.echo(f"    attempts {r['attempts']}, first {r['first_failure']}, last "
                       f"{r['last_failure']}")
            if r["parked_behind"]:
                typer.echo(f"    parked behind {r['parked_behind']}")
    if not rows:
        typer.echo(f"no dead letters for {aggregate}", err=True)
        raise typer.Exit(1)


@dlq_app.command("export")
def dlq_export(group: Group = None, error_class: ErrorClass = None,
               aggregate: AggregateOpt = None,
               event_type: Annotated[str | None, typer.Option(help="Event type.")] = None,
               since: Since = None, until: Since = None, data_dir: DataDir = None) -> None:
    """Every matching DLQ record as one JSON object per line (stdout)."""
    from operations.dlq import records

    rows = records(_settings(data_dir).with_runtime(),
                   _filters(group, error_class, aggregate, event_type, since, until))  # type: ignore[arg-type]
    for r in rows:
        typer.echo(json.dumps(r, default=str, ensure_ascii=False))
    typer.echo(f"exported {len(rows)} records", err=True)


@dlq_app.command("retry")
def dlq_retry(
    aggregate: Annotated[UUID | None, typer.Argument(help="One parked aggregate.")] = None,
    group: Group = None,
    all_parked: Annotated[bool, typer.Option("--all", help="Every matching parked "
                                             "aggregate.")] = False,
    error_class: ErrorClass = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would happen.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help=f"Confirm a bulk retry of more than "
                                      f"{BULK_CONFIRM_ABOVE}.")] = False,
    data_dir: DataDir = None, json_out: JsonOut = False,
) -> None:
    """Re-drive parked aggregates in order through their projection; release each
    whose dead letters now apply."""
    from operations.dlq import parked, retry

    settings = _settings(data_dir).with_runtime()
    if (aggregate is None) == (not all_parked):
        raise ConfigError("name one AGGREGATE, or pass --all (with --group/--error-class to "
                          "narrow it)")
    targets = parked(settings, _filters(group, error_class, aggregate, None, None, None))  # type: ignore[arg-type]
    if not targets:
        typer.echo("nothing parked matches", err=True)
        raise typer.Exit(1)
    if dry_run:
        for t in targets:
            typer.echo(f"would re-drive {t['consumer_group']} {t['aggregate_id']}: "
                       f"{t['parked_events']} events from v{t['first_version']}")
        typer.echo(f"{len(targets)} aggregates, "
                   f"{sum(t['parked_events'] for t in targets)} events (dry run)")
        return
    if len(targets) > BULK_CONFIRM_ABOVE and not yes:
        raise ConfigError(f"{len(targets)} aggregates would be re-driven; run with --dry-run "
                          "to review them, then again with --yes")
    results = []
    for t in targets:
        outcome = retry(settings, t["consumer_group"], t["aggregate_id"], t["tenant_id"])
        results.append(outcome)
        if not json_out:
            state = "released" if outcome["released"] else f"still parked: {outcome['error']}"
            typer.echo(f"{t['consumer_group']} {t['aggregate_id']}: applied "
                       f"{outcome['applied']}, {state}")
    if json_out:
        _echo_json(results)
    raise typer.Exit(0 if all(r["released"] for r in results) else 1)


@dlq_app.command("discard")
def dlq_discard(
    aggregate: Annotated[UUID, typer.Argument(help="The parked aggregate.")],
    group: Annotated[str, typer.Option("--group", help="Consumer group.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit trail).")],
    data_dir: DataDir = None,
) -> None:
    """Release an aggregate without applying its dead letters."""
    from operations.dlq import check_group, discard

    check_group(group)
    if len(reason.strip()) < 5:
        raise ConfigError("--reason must say why (at least a few words): it is kept in the "
                          "audit trail")
    if not discard(_settings(data_dir).with_runtime(), group, aggregate, reason.strip()):
        typer.echo(f"{aggregate} is not parked in {group}", err=True)
        raise typer.Exit(1)
    typer.echo(f"released {aggregate} in {group}; its dead letters stay in {group}.dlq")


def _scope(tenant: UUID | None, aggregate: UUID | None, since: str | None,
           until: str | None) -> object:
    from operations.scope import Scope

    f = _filters(None, None, None, None, since, until)
    return Scope(tenant, (aggregate,) if aggregate else None, f.since,  # type: ignore[attr-defined]
                 f.until)


Projector = Annotated[str, typer.Argument(help="workflow-projector, cache-projector, "
                                          "search-indexer, audit-processor, "
                                          "notification-processor")]
TenantOpt = Annotated[UUID | None, typer.Option("--tenant", help="One tenant.")]


@app.command()
def replay(
    projector: Projector, tenant: TenantOpt = None, aggregate: AggregateOpt = None,
    since: Since = None, until: Since = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count, change nothing.")] = False,
    notify: Annotated[bool, typer.Option("--notify", help="Send notifications for replayed "
                                         "events too.")] = False,
    data_dir: DataDir = None, json_out: JsonOut = False,
) -> None:
    """Re-project a scope in place from the events table (tenant, aggregate, time
    window; the aggregates it touches are replayed whole, in order)."""
    from operations.replay import replay as run_replay
    from projectors.catalogue import CATALOGUE

    if projector not in CATALOGUE:
        raise ConfigError(f"unknown projector {projector!r}; choose one of "
                          f"{', '.join(CATALOGUE)}")
    settings = _settings(data_dir, replay_notifications=notify).with_runtime()
    scope = _scope(tenant, aggregate, since, until)
    report = run_replay(settings, projector, scope, dry_run,  # type: ignore[arg-type]
                        progress=(lambda _m: None) if json_out
                        else (lambda m: typer.echo(f"· {m}", err=True)))
    if not dry_run:
        from operations.audit import record_action

        record_action(settings, "replay", projector, aggregate, "done",
                      details={"scope": scope.__dict__, "events": report.events,
                               "aggregates": report.aggregates})
    if json_out:
        _echo_json(report.__dict__)
        return
    verb = "would replay" if dry_run else f"replayed in {report.seconds:.1f} s"
    typer.echo(f"{verb}: {report.events} events of {report.aggregates} aggregates "
               f"({', '.join(f'{k} {v}' for k, v in sorted(report.by_type.items()))})")


@app.command()
def rebuild(
    projector: Projector,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would happen and how "
                                          "many events it reads; change nothing.")] = False,
    drop_old: Annotated[bool, typer.Option("--drop-old", help="Delete the previous "
                                           "versions after the cut-over.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=10_000,
                                            help="Events per store write.")] = 1000,
    max_rate: Annotated[float | None, typer.Option(
        "--max-rate", min=1, help="Throttle to this many events/s.")] = None,
    abandon: Annotated[bool, typer.Option("--abandon", help="Discard an interrupted "
                                          "rebuild and its half-built version.")] = False,
    data_dir: DataDir = None, json_out: JsonOut = False,
) -> None:
    """Blue/green: build a new version of the read model from the events table,
    cut over atomically (views / namespace pointer / alias), keep the old one.
    Resumes an interrupted rebuild."""
    from operations.audit import record_action
    from operations.rebuild import RebuildFailed, RefusedCutOver
    from operations.rebuild import rebuild as run_rebuild

    settings = _settings(data_dir).with_runtime()
    try:
        result = run_rebuild(settings, projector, dry_run, drop_old,
                             (lambda _m: None) if json_out
                             else (lambda m: typer.echo(f"· {m}", err=True)), batch_size,
                             max_rate, abandon)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except KeyboardInterrupt:
        typer.echo(f"interrupted: run `ringiflow rebuild {projector}` again to resume, or "
                   "add --abandon to discard the half-built version", err=True)
        raise typer.Exit(130) from None
    except (RefusedCutOver, RebuildFailed) as exc:
        record_action(settings, "rebuild", projector, None, "failed", details={
            "error": str(exc)})
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if not dry_run:
        record_action(settings, "rebuild.abandon" if abandon else "rebuild", projector, None,
                      "done", details=result)
    if json_out:
        _echo_json(result)
    elif abandon:
        typer.echo(f"{'would abandon' if dry_run else 'abandoned'} {result['target']}; "
                   f"{result['live'] or 'nothing'} stays live")
    elif dry_run:
        typer.echo(f"would {'resume' if result['resume'] else 'build'} {result['target']} "
                   f"from {result['events']:,} events ({result['workflows']:,} workflows) "
                   f"and then switch from {result['live'] or 'nothing'}")
    else:
        typer.echo(f"{projector}: {result['target']} is live (was "
                   f"{result['swapped_from'] or 'none'}), {result['events_done']:,} events in "
                   f"{result['seconds']} s; kept: {', '.join(result['kept']) or 'none'}; "
                   f"dropped: {', '.join(result['dropped']) or 'none'}")


def _tenant_has_events(settings: Settings, tenant: UUID) -> bool:
    import psycopg

    from infra.settings import libpq_url

    with psycopg.connect(libpq_url(settings.require("database_url"))) as conn:
        return conn.execute("SELECT EXISTS (SELECT 1 FROM event_store.events "
                            "WHERE tenant_id = %s)", (tenant,)).fetchone()[0]  # type: ignore[index]


@app.command()
def verify(
    projector: Projector, tenant: TenantOpt = None,
    repair: Annotated[bool, typer.Option("--repair", help="Replay exactly the aggregates "
                                         "that differ.")] = False,
    data_dir: DataDir = None, json_out: JsonOut = False,
) -> None:
    """Compare a read model with the events table; exit 1 on any difference
    (after --repair: on any difference left)."""
    from operations.audit import record_action
    from operations.verify import repair as run_repair
    from operations.verify import verify as run_verify

    settings = _settings(data_dir).with_runtime()
    if tenant is not None and not _tenant_has_events(settings, tenant):
        # Nothing to compare is not a match: most likely a mistyped id.
        raise ConfigError(f"tenant {tenant} has no events in the events table: nothing to "
                          "verify (check the id; without --tenant every tenant is compared)")
    try:
        differences = run_verify(settings, projector, tenant)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    repaired: list[str] = []
    if repair and differences:
        repaired = [str(a) for a in run_repair(settings, projector, tenant, differences)]
        record_action(settings, "verify.repair", projector, None, "done",
                      details={"aggregates": repaired, "differences": len(differences)})
        differences = run_verify(settings, projector, tenant)
    if json_out:
        _echo_json({"differences": [d.__dict__ for d in differences], "repaired": repaired})
    else:
        for d in differences:
            typer.echo(f"DIFF {d.aggregate_id} {d.field}: expected {d.expected!r}, "
                       f"read model has {d.actual!r}")
        if repaired:
            typer.echo(f"repaired {len(repaired)} aggregates")
        typer.echo("read model matches the events" if not differences
                   else f"{len(differences)} differences")
        if repaired and differences:
            typer.echo(f"hint: what --repair could not fix holds a version newer than the "
                       f"event store; `ringiflow rebuild {projector}` builds it anew", err=True)
    raise typer.Exit(1 if differences else 0)


@app.command()
def lag(
    data_dir: DataDir = None, json_out: JsonOut = False,
    max_lag: Annotated[int | None, typer.Option(help="Alert above this many records "
                                                "behind, in any partition.")] = None,
    max_outbox_age: Annotated[float | None, typer.Option(help="Alert when the oldest "
                                                         "unpublished event is older (s).")]
    = None,
    max_parked: Annotated[int | None, typer.Option(help="Alert above this many parked "
                                                   "aggregates in a group.")] = None,
    max_event_age: Annotated[float | None, typer.Option(
        help="Alert when a partition's oldest unprocessed event is older (s).")] = None,
) -> None:
    """Lag per consumer group and partition, parked aggregates, outbox backlog.
    Exits 1 when a threshold is crossed (or outbox rows failed)."""
    from operations.lag import report

    result = report(_settings(data_dir).with_runtime())
    breaches = result.breaches(max_lag, max_outbox_age, max_parked, max_event_age)
    if json_out:
        _echo_json({**result.as_dict(), "breaches": breaches})
    else:
        typer.echo(f"{'group':<24} {'topic':<30} {'part':>4} {'committed':>10} {'end':>10} "
                   f"{'lag':>8} {'age (s)':>8}")
        for p in result.partitions:
            typer.echo(f"{p.group:<24} {p.topic:<30} {p.partition:>4} "
                       f"{'-' if p.committed is None else p.committed:>10} {p.end:>10} "
                       f"{p.lag:>8} {'-' if p.event_age_s is None else p.event_age_s:>8}")
        totals: dict[str, int] = {}
        for p in result.partitions:
            totals[p.group] = totals.get(p.group, 0) + p.lag
        delays = result.apply_delays or {}
        for group, total in totals.items():
            delay = delays.get(group) or {}
            applied = (f", applied in p50 {delay['p50_ms']} ms / p99 {delay['p99_ms']} ms "
                       f"(last {delay['events']} events)" if delay.get("events") else "")
            typer.echo(f"{group}: lag {total}, parked aggregates "
                       f"{result.parked.get(group, 0)}{applied}")
        if result.apply_delays is None:
            typer.echo("apply delays: unknown (the workers' endpoint did not answer; is "
                       "`ringiflow up` running on this data dir?)")
        age = f"{result.oldest_pending_s:.1f} s" if result.oldest_pending_s else "-"
        typer.echo(f"outbox: {result.outbox_pending} pending (oldest {age}), "
                   f"{result.outbox_failed} failed")
        for breach in breaches:
            typer.secho(f"ALERT {breach}", fg="red", err=True)
    raise typer.Exit(1 if breaches else 0)


def main() -> None:
    try:
        app()
    except (ConfigError, RuntimeError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
