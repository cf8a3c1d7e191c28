"""`ringiflow replay | rebuild | verify | lag`: the read models' operations (the work is
`operations`'): registered on the main app by `register`."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

import typer

from infra.settings import ConfigError, Settings
from ringiflow.options import (
    AggregateOpt,
    DataDir,
    JsonOut,
    Since,
    echo_json,
    filters_of,
    settings_of,
)


def register(app: typer.Typer) -> None:
    for verb in (replay, rebuild, verify, lag):
        app.command()(verb)


def _scope(tenant: UUID | None, aggregate: UUID | None, since: str | None,
           until: str | None) -> object:
    from operations.scope import Scope

    f = filters_of(None, None, None, None, since, until)
    return Scope(tenant, (aggregate,) if aggregate else None, f.since,  # type: ignore[attr-defined]
                 f.until)


Projector = Annotated[str, typer.Argument(help="workflow-projector, cache-projector, "
                                          "search-indexer, audit-processor, "
                                          "notification-processor")]
TenantOpt = Annotated[UUID | None, typer.Option("--tenant", help="One tenant.")]


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
    settings = settings_of(data_dir, replay_notifications=notify).with_runtime()
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
        echo_json(report.__dict__)
        return
    verb = "would replay" if dry_run else f"replayed in {report.seconds:.1f} s"
    typer.echo(f"{verb}: {report.events} events of {report.aggregates} aggregates "
               f"({', '.join(f'{k} {v}' for k, v in sorted(report.by_type.items()))})")


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

    settings = settings_of(data_dir).with_runtime()
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
        echo_json(result)
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

    settings = settings_of(data_dir).with_runtime()
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
        echo_json({"differences": [d.__dict__ for d in differences], "repaired": repaired})
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

    result = report(settings_of(data_dir).with_runtime())
    breaches = result.breaches(max_lag, max_outbox_age, max_parked, max_event_age)
    if json_out:
        echo_json({**result.as_dict(), "breaches": breaches})
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
