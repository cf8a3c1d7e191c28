"""Appends no longer NOTIFY inside their own transaction when their writer wakes the
relay after commit (issue 19, ADR 0014).

A NOTIFY queued by a transaction takes a database-wide lock when that transaction
commits and holds it until the commit is flushed: every appending transaction
then commits after the previous one, never in a group. Sixteen concurrent
appenders ran 2.0–2.4k appends/s with the trigger's NOTIFY and 4.3–4.5k/s
without it, on the same server.

The trigger still notifies by default, so every writer wakes the relay as
before. A connection that sets `ringiflow.outbox_wakeup` to `after_commit` for
its session (the command API's, `commands.bell.OutboxBell.configure`) promises
to send the NOTIFY itself once the append has committed, from a connection of
its own and in a transaction with nothing to flush.

Revision ID: 0011
"""

from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    op.execute("""
        CREATE OR REPLACE FUNCTION event_store.notify_outbox() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF current_setting('ringiflow.outbox_wakeup', true)
                    IS DISTINCT FROM 'after_commit' THEN
                PERFORM pg_notify('ringiflow_outbox', '');
            END IF;
            RETURN NULL;
        END $$;
    """)


def downgrade() -> None:
    op.execute("""
        CREATE OR REPLACE FUNCTION event_store.notify_outbox() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('ringiflow_outbox', '');
            RETURN NULL;
        END $$;
    """)
