"""Relay marks: how far each lane has been acknowledged in each partition, so a
relay notices a broker that lost history before it publishes into it (ADR 0003).

Revision ID: 0006
"""

from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.execute("""
        CREATE TABLE event_store.relay_marks (
            lane         smallint    NOT NULL,
            topic        text        NOT NULL,
            partition    integer     NOT NULL,
            -- one past the highest offset the broker acknowledged for this lane
            next_offset  bigint      NOT NULL,
            updated_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (lane, topic, partition)
        );
        GRANT SELECT, INSERT, UPDATE, DELETE ON event_store.relay_marks TO ringiflow_relay;
        -- A relay that finds history lost re-queues it itself (relay/reconcile.py).
        GRANT INSERT ON event_store.outbox TO ringiflow_relay;
    """)


def downgrade() -> None:
    op.execute("REVOKE INSERT ON event_store.outbox FROM ringiflow_relay")
    op.execute("DROP TABLE event_store.relay_marks")
