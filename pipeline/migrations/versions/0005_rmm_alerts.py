"""RMM alert tickets: correlation key, repeat count, last seen, recovered at

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 09:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot alter tables in place; on PostgreSQL it is plain ALTER TABLE.
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        # vendor:device:alert — every alert mail looks its ticket up by this key.
        batch_op.add_column(sa.Column("alert_key", sa.String(300), nullable=True))
        batch_op.add_column(sa.Column("alert_repeat_count", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("alert_last_seen_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("recovered_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_tickets_alert_key", ["alert_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_index("ix_tickets_alert_key")
        batch_op.drop_column("recovered_at")
        batch_op.drop_column("alert_last_seen_at")
        batch_op.drop_column("alert_repeat_count")
        batch_op.drop_column("alert_key")
