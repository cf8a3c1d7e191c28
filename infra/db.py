"""PostgreSQL schema management: migrations and their current revision."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from infra.settings import ROLES, libpq_url, sqlalchemy_url

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database_url: str, role_password: str | None = None, revision: str = "head") -> None:
    """Apply migrations; then give the login roles their password (the embedded
    server's is generated in its data dir, see Settings.role_password)."""
    command.upgrade(alembic_config(database_url), revision)
    if role_password:
        import psycopg
        from psycopg import sql

        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            for role in ROLES:
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(f"ringiflow_{role}"), sql.Literal(role_password)))


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_current_head()
    assert head is not None
    return head


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, pool

    engine = create_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
