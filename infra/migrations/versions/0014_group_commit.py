"""Concurrent commands committed together (issue 19, ADR 0018).

`event_store.append_batch` runs `append_at` for each of several commands in one
transaction: one round trip, one commit and one WAL flush for all of them. Each
command runs in a block of its own (a subtransaction), so one command's refusal —
a version conflict, a reused idempotency key, reads that moved on, or any other
error — undoes that command only and comes back as its SQLSTATE on its rows;
the others are written.

The arrays are flat, as PostgreSQL arrays must be rectangular: command i owns
`p_counts[i]` envelopes of `p_wire` and `p_read_counts[i]` entries of `p_read_ids`
and `p_read_versions`, in order; `p_events->(i-1)` is its outbox targets and
`p_idempotency->(i-1)` its idempotency record (JSON null: none).

Revision ID: 0014
"""

from alembic import op

revision = "0014"
down_revision = "0013"

SIGNATURE = ("event_store.append_batch(uuid[], text[], uuid[], integer[], integer[], jsonb, "
             "bytea[], jsonb, integer[], uuid[], integer[])")


def upgrade() -> None:
    op.execute(f"""
        CREATE FUNCTION event_store.append_batch(
            p_tenants uuid[], p_types text[], p_ids uuid[], p_heads integer[],
            p_counts integer[], p_events jsonb, p_wire bytea[], p_idempotency jsonb,
            p_read_counts integer[], p_read_ids uuid[], p_read_versions integer[])
        RETURNS TABLE (item integer, last_position bigint, event_type text, payload jsonb,
                       refused_sqlstate text, refused_constraint text, refused_message text)
        LANGUAGE plpgsql AS $$
        DECLARE
            wire_at integer := 1;
            read_at integer := 1;
            v_sqlstate text;
            v_constraint text;
        BEGIN
            FOR i IN 1 .. cardinality(p_ids) LOOP
                BEGIN
                    RETURN QUERY SELECT i, a.last_position, a.event_type, a.payload,
                                        NULL::text, NULL::text, NULL::text
                        FROM event_store.append_at(
                            p_tenants[i], p_types[i], p_ids[i], p_heads[i], p_events->(i - 1),
                            p_wire[wire_at : wire_at + p_counts[i] - 1],
                            nullif(p_idempotency->(i - 1), 'null'::jsonb),
                            p_read_ids[read_at : read_at + p_read_counts[i] - 1],
                            p_read_versions[read_at : read_at + p_read_counts[i] - 1]) a;
                EXCEPTION WHEN OTHERS THEN
                    GET STACKED DIAGNOSTICS v_sqlstate = RETURNED_SQLSTATE,
                                            v_constraint = CONSTRAINT_NAME;
                    RETURN QUERY SELECT i, NULL::bigint, NULL::text, NULL::jsonb, v_sqlstate,
                                        v_constraint, SQLERRM;
                END;
                wire_at := wire_at + p_counts[i];
                read_at := read_at + p_read_counts[i];
            END LOOP;
        END $$;
        REVOKE EXECUTE ON FUNCTION {SIGNATURE} FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION {SIGNATURE} TO ringiflow_command;
    """)


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {SIGNATURE};")
