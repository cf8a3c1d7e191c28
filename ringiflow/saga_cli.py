"""`ringiflow saga` (completion sagas: list, show, retry) and `ringiflow notifications`
(what was sent); the work is `operations.completion`'s."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

import typer

from ringiflow.options import DataDir, JsonOut, echo_json, settings_of

saga_app = typer.Typer(no_args_is_help=True, help="Workflow completion sagas.")
notifications_app = typer.Typer(no_args_is_help=True, help="Notification deliveries.")
Workflow = Annotated[UUID, typer.Argument(help="The workflow whose completion it is.")]
Limit = Annotated[int, typer.Option(min=1, max=10_000, help="At most this many, newest first.")]


@saga_app.command("list")
def saga_list(status: Annotated[str | None, typer.Option(
                  help="running, compensating, completed or completion_failed.")] = None,
              limit: Limit = 100, data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """Completion sagas: status, the step they are at, attempts and last error."""
    from operations.completion import sagas

    rows = sagas(settings_of(data_dir).with_runtime(), status, limit)
    if json_out:
        echo_json(rows)
        return
    if not rows:
        typer.echo("no completion sagas")
    for r in rows:
        at = f" at {r['current_step']} (attempt {r['attempts']})" if r["current_step"] else ""
        error = f"  {r['last_error'][:120]}" if r["last_error"] else ""
        typer.echo(f"{r['workflow_id']} {r['status']:<17} run {r['run']}{at}  "
                   f"updated {r['updated_at']}{error}")


@saga_app.command("show")
def saga_show(workflow: Workflow, data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """One saga, step by step."""
    from operations.completion import saga

    found = saga(settings_of(data_dir).with_runtime(), workflow)
    if json_out:
        echo_json(found)
        return
    typer.echo(f"workflow {found['workflow_id']} (tenant {found['tenant_id']}): "
               f"{found['status']}, run {found['run']}")
    for step in found["steps"]:
        detail = step.get("error") or step.get("reason") or ""
        typer.echo(f"  {step['step']:<11} {step['status']:<8} attempts {step['attempts']} "
                   f"at {step['at']}  {detail}")
    if found["current_step"]:
        typer.echo(f"  next: {found['current_step']} (attempts so far {found['attempts']})"
                   + (f", last error: {found['last_error']}" if found["last_error"] else ""))


@saga_app.command("retry")
def saga_retry(workflow: Workflow, data_dir: DataDir = None) -> None:
    """Resume a saga out of attempts, or run a failed completion again."""
    from operations.completion import retry

    outcome = retry(settings_of(data_dir).with_runtime(), workflow)
    typer.echo(f"completion of workflow {workflow}: {outcome['outcome']} (was "
               f"{outcome['was']}); the saga worker picks it up within a second")


@notifications_app.command("list")
def notifications_list(
        workflow: Annotated[UUID | None, typer.Option(help="One workflow's.")] = None,
        status: Annotated[str | None, typer.Option(help="sent, failed or skipped.")] = None,
        limit: Limit = 100, data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """Sent mail and chat webhooks (and what failed or was skipped), newest first."""
    from operations.completion import deliveries

    rows = deliveries(settings_of(data_dir).with_runtime(), workflow, status, limit)
    if json_out:
        echo_json(rows)
        return
    if not rows:
        typer.echo("no notifications")
    for r in rows:
        error = f"  {r['last_error'][:100]}" if r["last_error"] else ""
        typer.echo(f"{r['first_attempt_at']:%Y-%m-%d %H:%M:%S} {r['status']:<7} {r['channel']:<5} "
                   f"{r['kind']:<20} to {r['address'] or r['recipient_id']}: "
                   f"{r['subject'] or ''}{error}")
