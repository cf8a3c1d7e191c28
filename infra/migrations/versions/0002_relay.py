"""Relay: ordered single-owner lanes, a wake-up notification, published rows table.

Revision ID: 0002
"""

from alembic import op

revision = "0002"
down_revision = "0001"

# Every aggregate maps to one of LANES lanes; a relay owns a lane through an
# advisory lock, so one aggregate is never published by two relays at once.
LANES = 32


def upgrade() -> None:
    op.execute(f"""
        ALTER TABLE event_store.outbox ADD COLUMN lane smallint
            GENERATED ALWAYS AS (get_byte(uuid_send(aggregate_id), 15) % {LANES}) STORED;
        CREATE INDEX outbox_pending_lane ON event_store.outbox (lane, id)
            WHERE status = 'pending';
        -- A queue table: every row is inserted once and deleted once. Vacuum it
        -- early so index walks do not wade through dead entries.
        ALTER TABLE event_store.outbox SET (autovacuum_vacuum_scale_factor = 0.0,
            autovacuum_vacuum_threshold = 5000, autovacuum_vacuum_insert_threshold = 5000,
            autovacuum_analyze_scale_factor = 0.0, autovacuum_analyze_threshold = 5000);

        -- One notification per appending statement wakes idle relays at once; they
        -- also poll, because a notification can be missed (one sent while the listener
        -- reconnects is lost).
        CREATE FUNCTION event_store.notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('ringiflow_outbox', '');
            RETURN NULL;
        END $$;
        CREATE TRIGGER outbox_notify AFTER INSERT ON event_store.outbox
            FOR EACH STATEMENT EXECUTE FUNCTION event_store.notify_outbox();

        -- A published row moves here (a compact copy) instead of being updated in
        -- place: deleting a row and inserting four narrow columns costs a third of
        -- rewriting the wide row and all its indexes, and keeps the outbox itself
        -- (pending and failed rows only) small and its scans fast.
        DROP INDEX event_store.outbox_published;
        CREATE TABLE event_store.outbox_published (
            id             bigint PRIMARY KEY,  -- the outbox row's id
            event_id       uuid        NOT NULL,
            tenant_id      uuid        NOT NULL,
            aggregate_type text        NOT NULL,
            aggregate_id   uuid        NOT NULL,
            version        integer     NOT NULL,
            event_type     text        NOT NULL,
            topic          text        NOT NULL,
            retry_count    integer     NOT NULL,
            created_at     timestamptz NOT NULL,
            published_at   timestamptz NOT NULL  -- when the broker acknowledged it
        );
        CREATE INDEX outbox_published_at ON event_store.outbox_published (published_at);
        ALTER TABLE event_store.outbox_published ENABLE ROW LEVEL SECURITY;
        ALTER TABLE event_store.outbox_published FORCE ROW LEVEL SECURITY;
        CREATE POLICY tenant_isolation ON event_store.outbox_published
            USING (tenant_id = event_store.current_tenant())
            WITH CHECK (tenant_id = event_store.current_tenant());
        CREATE POLICY operator_all ON event_store.outbox_published TO ringiflow_operator
            USING (true) WITH CHECK (true);
        CREATE POLICY relay_all ON event_store.outbox_published TO ringiflow_relay
            USING (true) WITH CHECK (true);
        GRANT SELECT, INSERT, DELETE ON event_store.outbox_published TO ringiflow_relay;

        -- Every row's delivery state in one place, for operators.
        CREATE VIEW event_store.outbox_state WITH (security_invoker = true) AS
            SELECT id, event_id, tenant_id, aggregate_type, aggregate_id, version, event_type,
                   status, retry_count, last_error, created_at, NULL::timestamptz AS published_at
            FROM event_store.outbox
            UNION ALL
            SELECT id, event_id, tenant_id, aggregate_type, aggregate_id, version, event_type,
                   'published', retry_count, NULL, created_at, published_at
            FROM event_store.outbox_published;
        GRANT SELECT ON event_store.outbox_state TO ringiflow_relay;
    """)


def downgrade() -> None:
    op.execute("""
        DROP VIEW event_store.outbox_state;
        DROP TABLE event_store.outbox_published;
        CREATE INDEX outbox_published ON event_store.outbox (published_at)
            WHERE status = 'published';
        DROP TRIGGER outbox_notify ON event_store.outbox;
        DROP FUNCTION event_store.notify_outbox();
        DROP INDEX event_store.outbox_pending_lane;
        ALTER TABLE event_store.outbox DROP COLUMN lane;
    """)
