"""Event store, outbox, idempotency keys, read models, roles and row-level security.

Revision ID: 0001
"""

from alembic import op

revision = "0001"
down_revision = None

APP_ROLES = ("ringiflow_command", "ringiflow_relay", "ringiflow_projector", "ringiflow_query")

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS event_store;
CREATE SCHEMA IF NOT EXISTS read_model;

-- The tenant of the current transaction, set with set_config('ringiflow.tenant_id', $1, true).
-- Unset means NULL, and NULL matches no row: isolation fails closed.
CREATE FUNCTION event_store.current_tenant() RETURNS uuid
LANGUAGE sql STABLE AS $$ SELECT NULLIF(current_setting('ringiflow.tenant_id', true), '')::uuid $$;

CREATE TABLE event_store.events (
    position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    tenant_id       uuid        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    uuid        NOT NULL,
    version         integer     NOT NULL CHECK (version >= 1),
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL DEFAULT 1,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Commit order is not id order (a transaction can commit after one with a higher
    -- id); readers that tail the log use this.
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    payload         jsonb       NOT NULL,
    aggregate       jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    CONSTRAINT events_aggregate_version UNIQUE (aggregate_id, version)
);
CREATE INDEX events_tenant_occurred ON event_store.events (tenant_id, occurred_at);
CREATE INDEX events_type_occurred ON event_store.events (event_type, occurred_at);

CREATE FUNCTION event_store.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Correct history by appending a compensating event.';
END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON event_store.events
    FOR EACH ROW EXECUTE FUNCTION event_store.refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON event_store.events
    FOR EACH STATEMENT EXECUTE FUNCTION event_store.refuse_change();

CREATE TABLE event_store.outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE REFERENCES event_store.events (event_id),
    tenant_id       uuid        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    uuid        NOT NULL,
    version         integer     NOT NULL,
    event_type      text        NOT NULL,
    topic           text        NOT NULL,
    payload         jsonb       NOT NULL,  -- the envelope exactly as published
    metadata        jsonb       NOT NULL,  -- the Kafka headers
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'published', 'failed')),
    published_at    timestamptz,
    retry_count     integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz,
    -- Per-aggregate order is delivery order: version is the sequence, not id.
    CONSTRAINT outbox_aggregate_version UNIQUE (aggregate_id, version)
);
CREATE INDEX outbox_pending ON event_store.outbox (id) WHERE status = 'pending';
CREATE INDEX outbox_published ON event_store.outbox (published_at) WHERE status = 'published';
CREATE INDEX outbox_failed ON event_store.outbox (aggregate_id) WHERE status = 'failed';

-- Appending is one statement (one round trip, its own transaction): the tenant
-- setting, the idempotency record, the events and their outbox rows. Each item
-- of p_events is {"envelope": <the event as published>, "topic", "headers"}.
-- Optimistic concurrency is the unique (aggregate_id, version); the idempotency
-- row goes first so a concurrent retry waits for this one and then conflicts.
CREATE FUNCTION event_store.append_events(p_tenant uuid, p_events jsonb,
                                          p_idempotency jsonb DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    last_position bigint;
BEGIN
    PERFORM set_config('ringiflow.tenant_id', p_tenant::text, true);
    IF p_idempotency IS NOT NULL THEN
        INSERT INTO event_store.idempotency_keys
            (tenant_id, idempotency_key, request_hash, status_code, response)
        VALUES (p_tenant, p_idempotency->>'key', p_idempotency->>'request_hash',
                (p_idempotency->>'status_code')::int, p_idempotency->'response');
    END IF;
    WITH appended AS (
        INSERT INTO event_store.events (event_id, tenant_id, aggregate_type, aggregate_id,
            version, event_type, schema_version, occurred_at, payload, aggregate, metadata)
        SELECT (e->>'event_id')::uuid, p_tenant, e->>'aggregate_type',
               (e->>'aggregate_id')::uuid, (e->>'version')::int, e->>'event_type',
               (e->>'schema_version')::int, (e->>'occurred_at')::timestamptz,
               e->'payload', e->'aggregate', e->'metadata'
        FROM jsonb_array_elements(p_events) AS item(value),
             LATERAL (SELECT item.value->'envelope') AS env(e)
        RETURNING position
    )
    SELECT max(position) INTO last_position FROM appended;
    INSERT INTO event_store.outbox (event_id, tenant_id, aggregate_type, aggregate_id, version,
        event_type, topic, payload, metadata)
    SELECT (e->>'event_id')::uuid, p_tenant, e->>'aggregate_type', (e->>'aggregate_id')::uuid,
           (e->>'version')::int, e->>'event_type', item.value->>'topic', e,
           item.value->'headers'
    FROM jsonb_array_elements(p_events) AS item(value),
         LATERAL (SELECT item.value->'envelope') AS env(e);
    IF p_idempotency IS NOT NULL THEN
        UPDATE event_store.idempotency_keys
        SET response = jsonb_set(response, '{position}', to_jsonb(last_position))
        WHERE tenant_id = p_tenant AND idempotency_key = p_idempotency->>'key';
    END IF;
    RETURN last_position;
END $$;

-- Reads scoped to one tenant in one statement (and so one round trip).
CREATE FUNCTION event_store.load_stream(p_tenant uuid, p_aggregate_type text,
                                        p_aggregate_id uuid)
RETURNS TABLE (event_type text, payload jsonb) LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM set_config('ringiflow.tenant_id', p_tenant::text, true);
    RETURN QUERY SELECT e.event_type, e.payload FROM event_store.events e
        WHERE e.aggregate_id = p_aggregate_id AND e.aggregate_type = p_aggregate_type
        ORDER BY e.version;
END $$;

CREATE FUNCTION event_store.latest_snapshots(p_tenant uuid, p_aggregate_type text,
                                             p_aggregate_ids uuid[])
RETURNS TABLE (aggregate_id uuid, version integer, aggregate jsonb)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM set_config('ringiflow.tenant_id', p_tenant::text, true);
    RETURN QUERY SELECT DISTINCT ON (e.aggregate_id) e.aggregate_id, e.version, e.aggregate
        FROM event_store.events e
        WHERE e.aggregate_id = ANY (p_aggregate_ids) AND e.aggregate_type = p_aggregate_type
        ORDER BY e.aggregate_id, e.version DESC;
END $$;

CREATE FUNCTION event_store.idempotent_response(p_tenant uuid, p_key text)
RETURNS TABLE (request_hash text, status_code integer, response jsonb)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM set_config('ringiflow.tenant_id', p_tenant::text, true);
    RETURN QUERY SELECT k.request_hash, k.status_code, k.response
        FROM event_store.idempotency_keys k
        WHERE k.tenant_id = p_tenant AND k.idempotency_key = p_key;
END $$;

CREATE FUNCTION event_store.stream_version(p_tenant uuid, p_aggregate_id uuid)
RETURNS integer LANGUAGE plpgsql STABLE AS $$
DECLARE v integer;
BEGIN
    PERFORM set_config('ringiflow.tenant_id', p_tenant::text, true);
    SELECT coalesce(max(e.version), 0) INTO v FROM event_store.events e
        WHERE e.aggregate_id = p_aggregate_id;
    RETURN v;
END $$;

CREATE TABLE event_store.idempotency_keys (
    tenant_id       uuid        NOT NULL,
    idempotency_key text        NOT NULL,
    request_hash    text        NOT NULL,
    status_code     integer     NOT NULL,
    response        jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, idempotency_key)
);
CREATE INDEX idempotency_keys_created ON event_store.idempotency_keys (created_at);

-- Read models (ADR 0004).
CREATE TABLE read_model.workflow_read_models (
    id                    uuid PRIMARY KEY,
    tenant_id             uuid         NOT NULL,
    definition_id         uuid         NOT NULL,
    definition_name       varchar(255) NOT NULL,
    title                 varchar(500) NOT NULL,
    description           text,
    status                varchar(50)  NOT NULL,
    priority              varchar(20)  NOT NULL,
    current_step_id       uuid,
    current_step_name     varchar(255),
    current_assignee_id   uuid,
    current_assignee_name varchar(255),
    initiated_by_id       uuid         NOT NULL,
    initiated_by_name     varchar(255) NOT NULL,
    due_date              timestamptz,
    completed_at          timestamptz,
    created_at            timestamptz  NOT NULL,
    updated_at            timestamptz  NOT NULL,
    search_text           tsvector,
    last_event_id         uuid         NOT NULL,
    last_event_version    bigint       NOT NULL
);
CREATE INDEX workflow_rm_tenant_status ON read_model.workflow_read_models (tenant_id, status);
CREATE INDEX workflow_rm_assignee ON read_model.workflow_read_models (current_assignee_id)
    WHERE status = 'in_progress';
CREATE INDEX workflow_rm_search ON read_model.workflow_read_models USING gin (search_text);

CREATE TABLE read_model.workflow_steps (
    workflow_id   uuid         NOT NULL,
    step_id       uuid         NOT NULL,
    tenant_id     uuid         NOT NULL,
    step_order    integer      NOT NULL,
    name          varchar(255) NOT NULL,
    assignee_id   uuid,
    assignee_name varchar(255),
    status        varchar(30)  NOT NULL,
    decided_by_id uuid,
    decided_at    timestamptz,
    comment       text,
    due_date      timestamptz,
    PRIMARY KEY (workflow_id, step_id)
);

CREATE TABLE read_model.workflow_history (
    event_id       uuid PRIMARY KEY,
    tenant_id      uuid        NOT NULL,
    workflow_id    uuid        NOT NULL,
    version        integer     NOT NULL,
    event_type     text        NOT NULL,
    actor_id       uuid,
    actor_name     varchar(255),
    occurred_at    timestamptz NOT NULL,
    correlation_id uuid,
    payload        jsonb       NOT NULL
);
CREATE INDEX workflow_history_workflow ON read_model.workflow_history (workflow_id, version);

CREATE TABLE read_model.my_tasks (
    workflow_id    uuid         NOT NULL,
    step_id        uuid         NOT NULL,
    tenant_id      uuid         NOT NULL,
    assignee_id    uuid         NOT NULL,
    assignee_name  varchar(255),
    workflow_title varchar(500) NOT NULL,
    step_name      varchar(255) NOT NULL,
    priority       varchar(20)  NOT NULL,
    due_date       timestamptz,
    assigned_at    timestamptz  NOT NULL,
    PRIMARY KEY (workflow_id, step_id)
);
CREATE INDEX my_tasks_assignee ON read_model.my_tasks (tenant_id, assignee_id);

CREATE TABLE read_model.users (
    id           uuid PRIMARY KEY,
    tenant_id    uuid         NOT NULL,
    display_name varchar(255) NOT NULL,
    email        varchar(320) NOT NULL,
    version      integer      NOT NULL
);

CREATE TABLE read_model.definitions (
    id        uuid PRIMARY KEY,
    tenant_id uuid         NOT NULL,
    name      varchar(255) NOT NULL,
    steps     jsonb        NOT NULL,
    version   integer      NOT NULL
);
"""

TENANT_TABLES = (
    "event_store.events",
    "event_store.outbox",
    "event_store.idempotency_keys",
    "read_model.workflow_read_models",
    "read_model.workflow_steps",
    "read_model.workflow_history",
    "read_model.my_tasks",
    "read_model.users",
    "read_model.definitions",
)

GRANTS = """
GRANT USAGE ON SCHEMA event_store TO ringiflow_command, ringiflow_relay, ringiflow_projector,
    ringiflow_query;
GRANT USAGE ON SCHEMA read_model TO ringiflow_projector, ringiflow_query;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA event_store FROM PUBLIC;
GRANT EXECUTE ON FUNCTION event_store.current_tenant() TO ringiflow_command, ringiflow_relay,
    ringiflow_projector, ringiflow_query;
GRANT EXECUTE ON FUNCTION event_store.append_events(uuid, jsonb, jsonb),
    event_store.load_stream(uuid, text, uuid), event_store.latest_snapshots(uuid, text, uuid[]),
    event_store.idempotent_response(uuid, text), event_store.stream_version(uuid, uuid)
    TO ringiflow_command;

-- Events are append-only for everyone: no UPDATE or DELETE is granted anywhere.
GRANT SELECT, INSERT ON event_store.events, event_store.outbox TO ringiflow_command;
GRANT SELECT, INSERT, UPDATE, DELETE ON event_store.idempotency_keys TO ringiflow_command;
GRANT SELECT ON event_store.events TO ringiflow_relay, ringiflow_projector, ringiflow_query;
GRANT SELECT, UPDATE, DELETE ON event_store.outbox TO ringiflow_relay;

GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA read_model TO ringiflow_projector;
GRANT SELECT ON ALL TABLES IN SCHEMA read_model TO ringiflow_query;
ALTER DEFAULT PRIVILEGES IN SCHEMA read_model
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO ringiflow_projector;
ALTER DEFAULT PRIVILEGES IN SCHEMA read_model GRANT SELECT ON TABLES TO ringiflow_query;
"""


def _create_roles() -> None:
    # Roles are cluster-wide and may exist from another database on the server.
    op.execute(
        """
        DO $$
        DECLARE r text;
        BEGIN
            FOREACH r IN ARRAY ARRAY['ringiflow_command', 'ringiflow_relay',
                                     'ringiflow_projector', 'ringiflow_query'] LOOP
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
                    EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
                                   'NOBYPASSRLS', r);
                END IF;
            END LOOP;
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ringiflow_operator') THEN
                CREATE ROLE ringiflow_operator NOLOGIN;
            END IF;
        END $$;
        """
    )
    # The migrating (owner) role is the operator: rebuilds and verify read across tenants.
    op.execute("GRANT ringiflow_operator TO CURRENT_USER")


def _row_level_security() -> None:
    for table in TENANT_TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} "
            "USING (tenant_id = event_store.current_tenant()) "
            "WITH CHECK (tenant_id = event_store.current_tenant())"
        )
        op.execute(
            f"CREATE POLICY operator_all ON {table} TO ringiflow_operator USING (true) "
            "WITH CHECK (true)"
        )
    # The relay publishes every tenant's events.
    op.execute(
        "CREATE POLICY relay_all ON event_store.outbox TO ringiflow_relay USING (true) "
        "WITH CHECK (true)"
    )
    op.execute("CREATE POLICY relay_read ON event_store.events FOR SELECT TO ringiflow_relay "
               "USING (true)")


def upgrade() -> None:
    _create_roles()
    op.execute(SCHEMA)
    _row_level_security()
    op.execute(GRANTS)


def downgrade() -> None:
    op.execute("DROP SCHEMA read_model CASCADE")
    op.execute("DROP SCHEMA event_store CASCADE")
