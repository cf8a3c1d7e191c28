"""The write path in fewer round trips (issue 19, ADR 0013).

`event_store.append_at`: append only if the stream's head is still the version the
caller decided on; if it is not, nothing is written and the events the caller has
not seen come back instead, in the same round trip. A command API that keeps
recent aggregates in memory thus commits a command in one round trip when its
copy is current, and in two when another process moved the stream on: never an
error in the server log for an ordinary stale copy.

`event_store.definition_with_assignees`: a definition's newest snapshot and its
assignees' newest snapshots in one statement (CreateWorkflow read them in two).

Revision ID: 0009
"""

from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION event_store.append_at(p_tenant uuid, p_aggregate_type text,
                                              p_aggregate_id uuid, p_head integer,
                                              p_events jsonb, p_idempotency jsonb DEFAULT NULL)
        RETURNS TABLE (last_position bigint, event_type text, payload jsonb)
        LANGUAGE plpgsql AS $$
        DECLARE head integer;
        BEGIN
            PERFORM set_config('ringiflow.tenant_id', p_tenant::text, true);
            SELECT coalesce(max(e.version), 0) INTO head FROM event_store.events e
                WHERE e.tenant_id = p_tenant AND e.aggregate_id = p_aggregate_id;
            IF head <> p_head THEN
                -- A concurrent append between this check and the insert still fails
                -- on the unique (tenant, aggregate, version): the check only spares
                -- the ordinary stale copy an error.
                RETURN QUERY SELECT NULL::bigint, e.event_type, e.payload
                    FROM event_store.events e
                    WHERE e.tenant_id = p_tenant AND e.aggregate_id = p_aggregate_id
                      AND e.aggregate_type = p_aggregate_type AND e.version > p_head
                    ORDER BY e.version;
                RETURN;
            END IF;
            RETURN QUERY SELECT event_store.append_events(p_tenant, p_events, p_idempotency),
                                NULL::text, NULL::jsonb;
        END $$;

        CREATE FUNCTION event_store.definition_with_assignees(p_tenant uuid,
                                                              p_definition_id uuid)
        RETURNS TABLE (aggregate_type text, aggregate_id uuid, version integer,
                       aggregate jsonb)
        LANGUAGE plpgsql STABLE AS $$
        BEGIN
            PERFORM set_config('ringiflow.tenant_id', p_tenant::text, true);
            RETURN QUERY
            WITH definition AS (
                SELECT e.aggregate_id, e.version, e.aggregate FROM event_store.events e
                WHERE e.tenant_id = p_tenant AND e.aggregate_id = p_definition_id
                  AND e.aggregate_type = 'definition'
                ORDER BY e.version DESC LIMIT 1
            )
            SELECT 'definition'::text, d.aggregate_id, d.version, d.aggregate FROM definition d
            UNION ALL
            SELECT 'user'::text, u.aggregate_id, u.version, u.aggregate
            FROM (SELECT DISTINCT (s->>'assignee_id')::uuid AS id
                  FROM definition d, jsonb_array_elements(d.aggregate->'steps') AS s) a
            CROSS JOIN LATERAL (
                SELECT e.aggregate_id, e.version, e.aggregate FROM event_store.events e
                WHERE e.tenant_id = p_tenant AND e.aggregate_id = a.id
                  AND e.aggregate_type = 'user'
                ORDER BY e.version DESC LIMIT 1
            ) u;
        END $$;

        REVOKE EXECUTE ON FUNCTION
            event_store.append_at(uuid, text, uuid, integer, jsonb, jsonb),
            event_store.definition_with_assignees(uuid, uuid)
        FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION
            event_store.append_at(uuid, text, uuid, integer, jsonb, jsonb),
            event_store.definition_with_assignees(uuid, uuid)
        TO ringiflow_command;
    """)


def downgrade() -> None:
    op.execute("""
        DROP FUNCTION event_store.definition_with_assignees(uuid, uuid);
        DROP FUNCTION event_store.append_at(uuid, text, uuid, integer, jsonb, jsonb);
    """)
