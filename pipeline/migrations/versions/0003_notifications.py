"""notifications: HTML part, send lease and backoff, indexes for threading and the history purge (D1.7)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 10:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot alter tables in place; on PostgreSQL it is plain ALTER TABLE.
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.add_column(sa.Column("body_html", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        # Threading and D8 look notifications up by entity; the purge by age.
        batch_op.create_index("ix_notifications_entity", ["entity_type", "entity_id"], unique=False)
        batch_op.create_index("ix_notifications_created_at", ["created_at"], unique=False)


def downgrade() -> None:
    # Not batch mode: on SQLite it would copy and drop the table, which notification_recipients'
    # foreign key forbids once there are rows. ALTER TABLE … DROP COLUMN needs SQLite 3.35+.
    op.drop_index("ix_notifications_created_at", table_name="notifications")
    op.drop_index("ix_notifications_entity", table_name="notifications")
    op.drop_column("notifications", "next_attempt_at")
    op.drop_column("notifications", "lease_until")
    op.drop_column("notifications", "body_html")
