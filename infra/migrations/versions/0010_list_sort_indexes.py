"""The workflow list's default sorts read an index, not every row of the tenant (issue 14).

`GET /workflows` pages by (created_at, id) or (updated_at, id) within one tenant
(row-level security adds `tenant_id = …`). Without an index on that order each
page sorted all of the tenant's workflows: fine at a thousand, seconds at a
million, and under load the sort was the list's share of PostgreSQL's CPU. A
btree serves both directions, so one index per sort key.

`read_model.workflow_read_models` is a view of the live version's table (ADR 0005):
the indexes go on every version's table, and a rebuild's new tables, created
`LIKE … INCLUDING ALL` from the live one, get them too.

Revision ID: 0010
"""

from alembic import op

revision = "0010"
down_revision = "0009"


VERSIONS = ("SELECT n.nspname FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid "
            "WHERE n.nspname ~ '^read_model_v[0-9]+$' AND c.relname = 'workflow_read_models' "
            "AND c.relkind = 'r'")
INDEXES = {"workflow_rm_tenant_created": "(tenant_id, created_at, id)",
           "workflow_rm_tenant_updated": "(tenant_id, updated_at, id)"}


def upgrade() -> None:
    for (schema,) in op.get_bind().exec_driver_sql(VERSIONS).fetchall():
        for name, columns in INDEXES.items():
            op.execute(f'CREATE INDEX IF NOT EXISTS {name} ON "{schema}".workflow_read_models '
                       f"{columns}")


def downgrade() -> None:
    for (schema,) in op.get_bind().exec_driver_sql(VERSIONS).fetchall():
        for name in INDEXES:
            op.execute(f'DROP INDEX IF EXISTS "{schema}".{name}')
