"""Versioned read models behind views; rebuild bookkeeping (ADR 0005).

The tables move to schema read_model_v1 and `read_model` becomes a schema of
views over the live version, so a rebuild can fill read_model_v2 beside it and
cut over by replacing the views in one transaction. The views are
security_invoker, so row-level security of the tables applies to whoever reads
or writes through them. streams.rebuilds makes rebuilds resumable.

Revision ID: 0005
"""

from alembic import op

revision = "0005"
down_revision = "0004"

TABLES = ("workflow_read_models", "workflow_steps", "workflow_history", "my_tasks", "users",
          "definitions")


def _views(schema: str) -> None:
    for table in TABLES:
        op.execute(f"CREATE OR REPLACE VIEW read_model.{table} WITH (security_invoker = true) "
                   f"AS SELECT * FROM {schema}.{table}")


def upgrade() -> None:
    op.execute("ALTER SCHEMA read_model RENAME TO read_model_v1")
    op.execute("CREATE SCHEMA read_model")
    _views("read_model_v1")
    op.execute("""
        GRANT USAGE ON SCHEMA read_model TO ringiflow_projector, ringiflow_query;
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA read_model
            TO ringiflow_projector;
        GRANT SELECT ON ALL TABLES IN SCHEMA read_model TO ringiflow_query;

        CREATE TABLE streams.rebuilds (
            projector     text        NOT NULL,
            target        text        NOT NULL,
            replaces      text,       -- the version live when the rebuild started
            status        text        NOT NULL CHECK (status IN ('building', 'live',
                                                                 'retired', 'dropped')),
            events_total  bigint      NOT NULL DEFAULT 0,
            events_done   bigint      NOT NULL DEFAULT 0,
            -- Resume point: every event at or below `position` is applied, except
            -- those of transactions at or after `open_xmin`, which a later pass re-reads.
            position      bigint      NOT NULL DEFAULT 0,
            open_xmin     bigint,
            started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
            updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
            live_at       timestamptz,
            PRIMARY KEY (projector, target)
        );
        GRANT SELECT ON streams.rebuilds TO ringiflow_query;
    """)


def downgrade() -> None:
    op.execute("DROP TABLE streams.rebuilds")
    op.execute("DROP SCHEMA read_model CASCADE")
    op.execute("ALTER SCHEMA read_model_v1 RENAME TO read_model")
