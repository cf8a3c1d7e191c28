"""Projectors: dead-letter bookkeeping for sequenced parking.

Revision ID: 0003
"""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.execute("""
        -- Operational state of the stream processors: ids and error context only,
        -- never event payloads (those stay in the events table and the DLQ topics).
        CREATE SCHEMA streams;

        -- An aggregate with a dead letter in a consumer group: its later events are
        -- parked behind it (sent to the group's DLQ too) until an operator retries.
        CREATE TABLE streams.parked_aggregates (
            consumer_group  text        NOT NULL,
            aggregate_id    uuid        NOT NULL,
            tenant_id       uuid        NOT NULL,
            aggregate_type  text        NOT NULL,
            first_event_id  uuid        NOT NULL,
            first_version   integer     NOT NULL,
            last_version    integer     NOT NULL,
            parked_events   integer     NOT NULL DEFAULT 1,
            error_class     text        NOT NULL,
            error_message   text        NOT NULL,
            parked_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
            updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (consumer_group, aggregate_id)
        );

        GRANT USAGE ON SCHEMA streams TO ringiflow_projector, ringiflow_query;
        GRANT SELECT, INSERT, UPDATE, DELETE ON streams.parked_aggregates TO ringiflow_projector;
        GRANT SELECT ON streams.parked_aggregates TO ringiflow_query;
    """)


def downgrade() -> None:
    op.execute("DROP SCHEMA streams CASCADE")
