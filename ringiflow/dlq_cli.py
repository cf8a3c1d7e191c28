"""`ringiflow dlq`: dead letters and parked aggregates (list, show, export, retry,
discard); the work is `operations.dlq`'s."""

from __future__ import annotations

import json
from typing import Annotated
from uuid import UUID

import typer

from infra.settings import ConfigError
from ringiflow.options import (
    AggregateOpt,
    DataDir,
    ErrorClass,
    Group,
    JsonOut,
    Since,
    echo_json,
    filters_of,
    settings_of,
)

dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters and parked aggregates.")
BULK_CONFIRM_ABOVE = 10


@dlq_app.command("list")
def dlq_list(group: Group = None, error_class: ErrorClass = None,
             aggregate: AggregateOpt = None, since: Since = None, until: Since = None,
             data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """Every group's dead letters, counted (records of no aggregate too), then the
    parked aggregates: which event they wait behind and why."""
    from operations.dlq import parked, summary

    settings = settings_of(data_dir).with_runtime()
    filters = filters_of(group, error_class, aggregate, None, since, until)  # type: ignore[arg-type]
    groups, rows = summary(settings, filters), parked(settings, filters)
    if json_out:
        echo_json({"dead_letters": groups, "parked": rows})
        return
    if not groups:
        typer.echo("no dead letters")
    for g in groups:
        classes = ", ".join(f"{k} ×{n}" for k, n in sorted(g["error_classes"].items()))
        typer.echo(f"{g['group']:<26} {g['records']} dead letters ({g['parked']} parked "
                   f"behind another, {g['without_aggregate']} of no aggregate)  oldest "
                   f"{g['oldest']}  newest {g['newest']}  {classes}")
    typer.echo("")
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

    rows = records(settings_of(data_dir).with_runtime(),
                   filters_of(group, None, aggregate, None, None, None))  # type: ignore[arg-type]
    if json_out:
        echo_json(rows)
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

    rows = records(settings_of(data_dir).with_runtime(),
                   filters_of(group, error_class, aggregate, event_type, since, until))  # type: ignore[arg-type]
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

    settings = settings_of(data_dir).with_runtime()
    if (aggregate is None) == (not all_parked):
        raise ConfigError("name one AGGREGATE, or pass --all (with --group/--error-class to "
                          "narrow it)")
    targets = parked(settings, filters_of(group, error_class, aggregate, None, None, None))  # type: ignore[arg-type]
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
        echo_json(results)
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
    if not discard(settings_of(data_dir).with_runtime(), group, aggregate, reason.strip()):
        typer.echo(f"{aggregate} is not parked in {group}", err=True)
        raise typer.Exit(1)
    typer.echo(f"released {aggregate} in {group}; its dead letters stay in {group}.dlq")
