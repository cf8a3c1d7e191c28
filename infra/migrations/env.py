"""Alembic environment: plain SQL migrations run with the owner role."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from infra.settings import load_settings, sqlalchemy_url

config = context.config
url = config.get_main_option("sqlalchemy.url") or load_settings().with_runtime().require(
    "database_url"
)

engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
