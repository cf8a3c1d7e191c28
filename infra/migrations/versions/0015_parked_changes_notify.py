"""Every change to streams.parked_aggregates is announced (issue 14).

A worker asked PostgreSQL for its group's parked aggregates before every batch: on
Apache Kafka at 50 events/s a fetch holds one event, so that read came once per
event and group, and was a quarter of the cache projector's CPU. A worker now keeps
the set between batches while it LISTENs on `ringiflow_parked`, and reads it again
after any change. This trigger sends that NOTIFY for every statement that changes
the table, whoever runs it: a worker parking an event, `ringiflow dlq retry` or
`discard`, or an operator's own SQL. Changes are rare (failures only), so the NOTIFY's
lock at commit costs nothing on the hot path.

Revision ID: 0015
"""

from alembic import op

revision = "0015"
down_revision = "0014"


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION streams.notify_parked() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('ringiflow_parked', '');
            RETURN NULL;
        END $$;
        CREATE TRIGGER parked_aggregates_changed
            AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON streams.parked_aggregates
            FOR EACH STATEMENT EXECUTE FUNCTION streams.notify_parked();
    """)


def downgrade() -> None:
    op.execute("""
        DROP TRIGGER parked_aggregates_changed ON streams.parked_aggregates;
        DROP FUNCTION streams.notify_parked();
    """)
