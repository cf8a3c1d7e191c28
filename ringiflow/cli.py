"""The `ringiflow` operator CLI: parse the arguments, call `operations` (or start a
component), print the outcome; non-zero exit on failure."""

from __future__ import annotations

import json
import sys
from typing import Annotated
from uuid import UUID

import typer

from infra.settings import ConfigError, load_settings
from ringiflow.dlq_cli import dlq_app
from ringiflow.options import DataDir, JsonOut, configure_logging, settings_of
from ringiflow.outbox_cli import outbox_app
from ringiflow.readmodels_cli import register as register_readmodel_verbs
from ringiflow.saga_cli import notifications_app, saga_app

app = typer.Typer(
    name="ringiflow", no_args_is_help=True, add_completion=False,
    help="Run and operate RingiFlow, the event-sourced approval-workflow service.",
)
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics of the catalogue.")
app.add_typer(topics_app, name="topics")
app.add_typer(outbox_app, name="outbox")
app.add_typer(dlq_app, name="dlq")
app.add_typer(saga_app, name="saga")
app.add_typer(notifications_app, name="notifications")


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
    settings = settings_of(data_dir, **overrides)
    configure_logging(settings)
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
    configure_logging(settings)
    run_component(component, settings)


@app.command()
def projector(
    group: Annotated[str, typer.Argument(help="Consumer group, e.g. workflow-projector.")],
    port: Annotated[int, typer.Option(help="Health and metrics port.")] = 0,
) -> None:
    """Run one projection's (or service's) Faust worker (what `run workers` starts for
    each)."""
    from infra.servers import free_port
    from projectors.catalogue import CATALOGUE
    from streams.services import SERVICES
    from streams.worker import run_projector

    if group not in CATALOGUE and group not in SERVICES:
        raise ConfigError(f"unknown projection {group!r}; choose one of "
                          f"{', '.join([*CATALOGUE, *SERVICES])}")
    settings = load_settings().with_runtime()
    configure_logging(settings)
    run_projector(group, settings, port or free_port())


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Apply database migrations (idempotent)."""
    from infra import db

    settings = settings_of(data_dir).with_runtime()
    url = settings.require("database_url")
    db.migrate(url, settings.role_password)
    typer.echo(f"database at revision {db.current_revision(url)}")


@topics_app.command("ensure")
def topics_ensure(data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """Create every topic of the catalogue that is missing."""
    from infra import kafka

    settings = settings_of(data_dir).with_runtime()
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
    settings = settings_of(data_dir)
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



register_readmodel_verbs(app)  # replay, rebuild, verify, lag


def main() -> None:
    try:
        app()
    except (ConfigError, RuntimeError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
