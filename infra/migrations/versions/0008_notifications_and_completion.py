"""Notification deliveries and the completion saga's state (issue 17).

`notifications.deliveries`: one row per notification id and channel, written by the
dispatcher right after a receiver accepted (or refused) it: the row is what stops a
redelivered notification command from being sent twice, and what the query API and
`ringiflow notifications list` show.

`saga.completions`: one row per approved workflow, the completion saga's durable state
(ADR 0011): which step it is at, each step's outcome and attempts, the last error.

Both are tenant rows under row-level security like every other; the dispatcher and the
saga (projector role) set the tenant per transaction, the query API reads its own.

Revision ID: 0008
"""

from alembic import op

revision = "0008"
down_revision = "0007"

TABLES = ("notifications.deliveries", "saga.completions")


def upgrade() -> None:
    op.execute("""
        CREATE SCHEMA notifications;
        CREATE TABLE notifications.deliveries (
            tenant_id        uuid        NOT NULL,
            notification_id  uuid        NOT NULL,
            channel          text        NOT NULL,
            recipient_id     uuid        NOT NULL,
            workflow_id      uuid,
            kind             text        NOT NULL,
            address          text,
            subject          text,
            status           text        NOT NULL CHECK (status IN ('sent', 'failed', 'skipped')),
            attempts         integer     NOT NULL DEFAULT 0,
            last_error       text,
            first_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            sent_at          timestamptz,
            updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (tenant_id, notification_id, channel)
        );
        CREATE INDEX deliveries_by_workflow ON notifications.deliveries
            (tenant_id, workflow_id, first_attempt_at);

        CREATE SCHEMA saga;
        CREATE TABLE saga.completions (
            tenant_id    uuid        NOT NULL,
            workflow_id  uuid        NOT NULL,
            status       text        NOT NULL CHECK (status IN ('running', 'compensating',
                                         'completed', 'completion_failed')),
            run          integer     NOT NULL DEFAULT 1,     -- `saga retry` starts another
            step         text,       -- the step running now (NULL once finished)
            steps        jsonb       NOT NULL DEFAULT '{}',  -- step -> its outcome
            attempts     integer     NOT NULL DEFAULT 0,     -- of the current step
            last_error   text,
            started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
            updated_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
            finished_at  timestamptz,
            PRIMARY KEY (tenant_id, workflow_id)
        );
        CREATE INDEX completions_unfinished ON saga.completions (updated_at)
            WHERE finished_at IS NULL;

        GRANT USAGE ON SCHEMA notifications, saga TO ringiflow_projector, ringiflow_query;
        GRANT SELECT, INSERT, UPDATE ON notifications.deliveries, saga.completions
            TO ringiflow_projector;
        GRANT SELECT ON notifications.deliveries, saga.completions TO ringiflow_query;
        -- The dispatcher reads a recipient's newest snapshot (name, email, preferences)
        -- from the event store, which is never behind the notification it delivers.
        GRANT EXECUTE ON FUNCTION event_store.latest_snapshots(uuid, text, uuid[])
            TO ringiflow_projector;
    """)
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY tenant_isolation ON {table} "
                   "USING (tenant_id = event_store.current_tenant()) "
                   "WITH CHECK (tenant_id = event_store.current_tenant())")
        op.execute(f"CREATE POLICY operator_all ON {table} TO ringiflow_operator "
                   "USING (true) WITH CHECK (true)")
    # The saga worker looks for unfinished completions of every tenant after a restart.
    op.execute("CREATE POLICY saga_resume ON saga.completions FOR SELECT "
               "TO ringiflow_projector USING (finished_at IS NULL)")


def downgrade() -> None:
    op.execute("REVOKE EXECUTE ON FUNCTION event_store.latest_snapshots(uuid, text, uuid[]) "
               "FROM ringiflow_projector")
    op.execute("DROP SCHEMA saga CASCADE")
    op.execute("DROP SCHEMA notifications CASCADE")
