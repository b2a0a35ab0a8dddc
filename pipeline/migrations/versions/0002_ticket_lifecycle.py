"""ticket lifecycle: status time, wait date, resolutions, SLA pause (D2)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 14:40:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot alter tables in place; on PostgreSQL it is plain ALTER TABLE.
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("wait_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("resolution_method", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("resolved_by", sa.String(length=320), nullable=True))
        batch_op.add_column(sa.Column("first_resolved_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("first_resolved_by", sa.String(length=320), nullable=True))
        batch_op.add_column(sa.Column("sla_paused_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("sla_paused_seconds", sa.Integer(), nullable=False, server_default="0"))
        # The maintenance job looks tickets up by status.
        batch_op.create_index(batch_op.f("ix_tickets_status"), ["status"], unique=False)
    # Existing tickets: their status has held since they were last updated.
    op.execute("UPDATE tickets SET status_changed_at = updated_at WHERE status_changed_at IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tickets_status"))
        batch_op.drop_column("sla_paused_seconds")
        batch_op.drop_column("sla_paused_at")
        batch_op.drop_column("first_resolved_by")
        batch_op.drop_column("first_resolved_at")
        batch_op.drop_column("resolved_by")
        batch_op.drop_column("resolved_at")
        batch_op.drop_column("resolution_method")
        batch_op.drop_column("wait_until")
        batch_op.drop_column("status_changed_at")
