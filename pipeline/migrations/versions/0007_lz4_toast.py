"""PostgreSQL: the large columns (raw mail, attachments, bodies) are compressed with lz4

PostgreSQL compresses a value over about 2 kB before storing it out of line. Its default
method, pglz, cost the server 0.35 ms of CPU per mail of the benchmark corpus for the raw
mail alone; lz4 costs 0.09 ms and stores a little less (bench/README.md, issue 10). Only
values written afterwards use it; older ones stay readable as they are. Nothing changes on
SQLite, or on a PostgreSQL built without lz4.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 02:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: Union[str, Sequence[str], None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

LARGE_COLUMNS = {
    "journal": ("raw", "error"),
    "attachments": ("data",),
    "tickets": ("description", "description_html"),
    "notes": ("body", "body_html"),
    "notifications": ("body_text", "body_html"),
}


def _lz4_available() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    # Only the methods this server was built with are listed.
    return bool(bind.execute(sa.text(
        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'")).scalar())


def _set(method: str) -> None:
    # Each ALTER changes only the catalog, but takes its table's exclusive lock: behind a running
    # batch it would wait, and everything after it with it. Better to fail and be run again.
    op.execute("SET LOCAL lock_timeout = '10s'")
    for table, columns in LARGE_COLUMNS.items():
        for column in columns:
            op.execute(f'ALTER TABLE {table} ALTER COLUMN "{column}" SET COMPRESSION {method}')


def upgrade() -> None:
    if _lz4_available():
        _set("lz4")


def downgrade() -> None:
    if _lz4_available():
        _set("default")
