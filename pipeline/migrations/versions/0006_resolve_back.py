"""resolving back: the outbox of HTTP calls telling an RMM that an alert's ticket was completed

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 09:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "resolve_back_calls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=False),
        sa.Column("mailbox", sa.String(length=200), nullable=False),
        sa.Column("vendor", sa.String(length=100), nullable=False),
        sa.Column("journal_id", sa.Integer(), nullable=True),
        sa.Column("alert_journal_id", sa.Integer(), nullable=True),
        sa.Column("ticket_values", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["ticket_id"], ["tickets.id"]),
        sa.ForeignKeyConstraint(["journal_id"], ["journal.id"]),
        sa.ForeignKeyConstraint(["alert_journal_id"], ["journal.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    # The sweep looks rows up by status; a ticket's calls by ticket.
    op.create_index("ix_resolve_back_calls_status", "resolve_back_calls", ["status"], unique=False)
    op.create_index("ix_resolve_back_calls_ticket_id", "resolve_back_calls", ["ticket_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_resolve_back_calls_ticket_id", table_name="resolve_back_calls")
    op.drop_index("ix_resolve_back_calls_status", table_name="resolve_back_calls")
    op.drop_table("resolve_back_calls")
