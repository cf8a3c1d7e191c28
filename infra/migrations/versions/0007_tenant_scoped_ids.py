"""Aggregate ids are unique per tenant, not across tenants (issue 13).

A stream is (tenant_id, aggregate_id): the optimistic-concurrency constraints
of the events and the outbox, every read-model key (in each versioned
read_model_vN schema, so later rebuilds copy it) and the parked aggregates
all gain the tenant. Two tenants may then hold the same user id, and an id
taken in one tenant no longer answers 409 in another (an existence oracle).
Existing rows satisfy the wider keys as they are: nothing is rewritten.

Revision ID: 0007
"""

from alembic import op

revision = "0007"
down_revision = "0006"

# table -> its key columns after the tenant
READ_MODEL_KEYS = {
    "workflow_read_models": "id",
    "workflow_steps": "workflow_id, step_id",
    "my_tasks": "workflow_id, step_id",
    "users": "id",
    "definitions": "id",
}


def _rekey_read_models(with_tenant: bool) -> None:
    for table, columns in READ_MODEL_KEYS.items():
        key = f"tenant_id, {columns}" if with_tenant else columns
        op.execute(f"""
            DO $$
            DECLARE s text; c text;
            BEGIN
                FOR s IN SELECT nspname FROM pg_namespace
                         WHERE nspname ~ '^read_model_v[0-9]+$' LOOP
                    SELECT conname INTO c FROM pg_constraint
                    WHERE conrelid = format('%I.%I', s, '{table}')::regclass
                      AND contype = 'p';
                    EXECUTE format('ALTER TABLE %I.%I DROP CONSTRAINT %I, '
                                   'ADD PRIMARY KEY ({key})', s, '{table}', c);
                END LOOP;
            END $$;
        """)


def _functions(tenant_filter: str) -> None:
    # The explicit tenant predicate lets the (tenant_id, aggregate_id, version)
    # index serve every stream read, whatever row-level security adds.
    op.execute(f"""
        CREATE OR REPLACE FUNCTION event_store.load_stream(p_tenant uuid, p_aggregate_type text,
                                                           p_aggregate_id uuid)
        RETURNS TABLE (event_type text, payload jsonb) LANGUAGE plpgsql STABLE AS $$
        BEGIN
            PERFORM set_config('ringiflow.tenant_id', p_tenant::text, true);
            RETURN QUERY SELECT e.event_type, e.payload FROM event_store.events e
                WHERE {tenant_filter} e.aggregate_id = p_aggregate_id
                  AND e.aggregate_type = p_aggregate_type
                ORDER BY e.version;
        END $$;

        CREATE OR REPLACE FUNCTION event_store.latest_snapshots(
            p_tenant uuid, p_aggregate_type text, p_aggregate_ids uuid[])
        RETURNS TABLE (aggregate_id uuid, version integer, aggregate jsonb)
        LANGUAGE plpgsql STABLE AS $$
        BEGIN
            PERFORM set_config('ringiflow.tenant_id', p_tenant::text, true);
            RETURN QUERY SELECT DISTINCT ON (e.aggregate_id) e.aggregate_id, e.version,
                                e.aggregate
                FROM event_store.events e
                WHERE {tenant_filter} e.aggregate_id = ANY (p_aggregate_ids)
                  AND e.aggregate_type = p_aggregate_type
                ORDER BY e.aggregate_id, e.version DESC;
        END $$;

        CREATE OR REPLACE FUNCTION event_store.stream_version(p_tenant uuid,
                                                              p_aggregate_id uuid)
        RETURNS integer LANGUAGE plpgsql STABLE AS $$
        DECLARE v integer;
        BEGIN
            PERFORM set_config('ringiflow.tenant_id', p_tenant::text, true);
            SELECT coalesce(max(e.version), 0) INTO v FROM event_store.events e
                WHERE {tenant_filter} e.aggregate_id = p_aggregate_id;
            RETURN v;
        END $$;
    """)


def upgrade() -> None:
    op.execute("""
        ALTER TABLE event_store.events DROP CONSTRAINT events_aggregate_version,
            ADD CONSTRAINT events_aggregate_version UNIQUE (tenant_id, aggregate_id, version);
        ALTER TABLE event_store.outbox DROP CONSTRAINT outbox_aggregate_version,
            ADD CONSTRAINT outbox_aggregate_version UNIQUE (tenant_id, aggregate_id, version);
        DROP INDEX event_store.outbox_failed;
        CREATE INDEX outbox_failed ON event_store.outbox (tenant_id, aggregate_id)
            WHERE status = 'failed';
        ALTER TABLE streams.parked_aggregates DROP CONSTRAINT parked_aggregates_pkey,
            ADD PRIMARY KEY (consumer_group, tenant_id, aggregate_id);
    """)
    _rekey_read_models(with_tenant=True)
    _functions("e.tenant_id = p_tenant AND")


def downgrade() -> None:
    # Fails (as it must) if two tenants now share an id.
    _functions("")
    _rekey_read_models(with_tenant=False)
    op.execute("""
        ALTER TABLE streams.parked_aggregates DROP CONSTRAINT parked_aggregates_pkey,
            ADD PRIMARY KEY (consumer_group, aggregate_id);
        DROP INDEX event_store.outbox_failed;
        CREATE INDEX outbox_failed ON event_store.outbox (aggregate_id) WHERE status = 'failed';
        ALTER TABLE event_store.outbox DROP CONSTRAINT outbox_aggregate_version,
            ADD CONSTRAINT outbox_aggregate_version UNIQUE (aggregate_id, version);
        ALTER TABLE event_store.events DROP CONSTRAINT events_aggregate_version,
            ADD CONSTRAINT events_aggregate_version UNIQUE (aggregate_id, version);
    """)
