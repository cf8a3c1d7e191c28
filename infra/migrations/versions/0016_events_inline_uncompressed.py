"""Events and outbox rows of an ordinary size are stored as they are, not compressed
(issue 19).

PostgreSQL compresses a row's long values (pglz) once the row passes ~2 kB, and a
CreateWorkflow's outbox row (its ~2.4 kB record value) and events row (payload,
snapshot and metadata) both do: `perf` put `pglz_compress` at 12 % of the
server's CPU under wrk CreateWorkflow, on the command's path to its commit, and
the relay then paid for decompressing each row it read. The rows stay inline
uncompressed up to a full page now (`toast_tuple_target`); a larger one (a
workflow's snapshot after many comments) is still compressed, as before.

The cost is space: such rows take about twice the bytes on disk and in the WAL.
Outbox rows leave once published; the events table grows by the same factor.

Revision ID: 0016
"""

from alembic import op

revision = "0016"
down_revision = "0015"

TABLES = ("event_store.events", "event_store.outbox")
ROW_FITS_A_PAGE = 8160  # the largest toast_tuple_target PostgreSQL accepts


def upgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} SET (toast_tuple_target = {ROW_FITS_A_PAGE})")


def downgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} RESET (toast_tuple_target)")
