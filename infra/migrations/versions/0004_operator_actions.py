"""Audit trail of operator actions (DLQ retries and discards, rebuilds, replays).

Revision ID: 0004
"""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.execute("""
        CREATE TABLE streams.operator_actions (
            id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at             timestamptz NOT NULL DEFAULT clock_timestamp(),
            operator       text        NOT NULL,
            action         text        NOT NULL,
            consumer_group text,
            aggregate_id   uuid,
            reason         text,
            outcome        text        NOT NULL,
            details        jsonb       NOT NULL DEFAULT '{}'
        );
        CREATE INDEX operator_actions_at ON streams.operator_actions (at);
        -- Append-only, like the events: the trail must not be edited afterwards.
        CREATE TRIGGER operator_actions_append_only
            BEFORE UPDATE OR DELETE ON streams.operator_actions
            FOR EACH ROW EXECUTE FUNCTION event_store.refuse_change();
    """)


def downgrade() -> None:
    op.execute("DROP TABLE streams.operator_actions")
