"""The append checks what the command read of other aggregates (issue 19, ADR 0016).

CreateWorkflow read its definition and the assignees' names in a round trip of its
own before appending. The command API now keeps those snapshots and passes each
one's version with the append; `event_store.append_at` writes only if every one is
still at that version, and otherwise refuses with SQLSTATE RF001 and writes
nothing, so the command is built again from fresh reads.

Revision ID: 0013
"""

from alembic import op

revision = "0013"
down_revision = "0012"

OLD = "event_store.append_at(uuid, text, uuid, integer, jsonb, bytea[], jsonb)"
NEW = "event_store.append_at(uuid, text, uuid, integer, jsonb, bytea[], jsonb, uuid[], integer[])"

READS_VARIABLES = """
            now_at integer;"""
READS_CHECK = """
            IF cardinality(p_read_ids) IS DISTINCT FROM cardinality(p_read_versions) THEN
                RAISE EXCEPTION 'append_at: % aggregates read but % versions',
                    cardinality(p_read_ids), cardinality(p_read_versions)
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            -- One probe per read: a set-based join over the arrays planned far worse.
            FOR i IN 1 .. coalesce(cardinality(p_read_ids), 0) LOOP
                SELECT coalesce(max(e.version), 0) INTO now_at FROM event_store.events e
                    WHERE e.tenant_id = p_tenant AND e.aggregate_id = p_read_ids[i];
                IF now_at <> p_read_versions[i] THEN
                    RAISE EXCEPTION '% was read at version % but is now at version %',
                        p_read_ids[i], p_read_versions[i], now_at
                        USING ERRCODE = 'RF001', HINT = 'Build the command again from fresh reads.';
                END IF;
            END LOOP;"""


def _append_at(checked_reads: bool) -> str:
    reads_args = ", p_read_ids uuid[] DEFAULT NULL, p_read_versions integer[] DEFAULT NULL"
    return f"""
        CREATE FUNCTION event_store.append_at(p_tenant uuid, p_aggregate_type text,
                                              p_aggregate_id uuid, p_head integer,
                                              p_events jsonb, p_wire bytea[],
                                              p_idempotency jsonb DEFAULT NULL
                                              {reads_args if checked_reads else ""})
        RETURNS TABLE (last_position bigint, event_type text, payload jsonb)
        LANGUAGE plpgsql AS $$
        DECLARE
            head integer;{READS_VARIABLES if checked_reads else ""}
        BEGIN
            PERFORM set_config('ringiflow.tenant_id', p_tenant::text, true);
            SELECT coalesce(max(e.version), 0) INTO head FROM event_store.events e
                WHERE e.tenant_id = p_tenant AND e.aggregate_id = p_aggregate_id;
            IF head <> p_head THEN
                RETURN QUERY SELECT NULL::bigint, e.event_type, e.payload
                    FROM event_store.events e
                    WHERE e.tenant_id = p_tenant AND e.aggregate_id = p_aggregate_id
                      AND e.aggregate_type = p_aggregate_type AND e.version > p_head
                    ORDER BY e.version;
                RETURN;
            END IF;{READS_CHECK if checked_reads else ""}
            RETURN QUERY SELECT event_store.append_events(p_tenant, p_events, p_wire,
                                                          p_idempotency),
                                NULL::text, NULL::jsonb;
        END $$;"""


def _replace(old: str, new: str, checked_reads: bool) -> None:
    op.execute(f"""
        DROP FUNCTION {old};
        {_append_at(checked_reads)}
        REVOKE EXECUTE ON FUNCTION {new} FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION {new} TO ringiflow_command;
    """)


def upgrade() -> None:
    _replace(OLD, NEW, checked_reads=True)


def downgrade() -> None:
    _replace(NEW, OLD, checked_reads=False)
