"""parsed content kept: skipped and inline attachments, sanitized HTML, journal lookups by source

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 16:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot alter tables in place; on PostgreSQL it is plain ALTER TABLE.
    with op.batch_alter_table("attachments", schema=None) as batch_op:
        # An attachment over the mailbox's size limit is recorded, without its data, and why.
        batch_op.add_column(sa.Column("skipped_reason", sa.String(200), nullable=True))
        # Referenced by cid: from the HTML part (an inline image), kept with the note.
        batch_op.add_column(sa.Column("inline", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("notes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("body_html", sa.Text(), nullable=True))  # sanitized (D8)
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("description_html", sa.Text(), nullable=True))  # sanitized (D8)
    # Every fetch asks whether a source's mail (a Maildir file, an IMAP UID) is journaled already.
    op.create_index("ix_journal_mailbox_source_ref", "journal", ["mailbox", "source_ref"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_journal_mailbox_source_ref", table_name="journal")
    op.drop_column("tickets", "description_html")
    op.drop_column("notes", "body_html")
    op.drop_column("attachments", "inline")
    op.drop_column("attachments", "skipped_reason")
