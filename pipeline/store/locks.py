"""Transaction-scoped locks in the store, for decisions that must not be made twice at once."""

from __future__ import annotations

import hashlib

from sqlalchemy import text
from sqlalchemy.orm import Session


def lock_conversation(session: Session, subject_key: str) -> None:
    """Serialise new conversations with this normalised subject until the transaction ends.

    Two workers handed the first two mails of a conversation at once must decide as if
    one came after the other (D1.5.4): the second waits here until the first has
    committed its ticket, then finds it. PostgreSQL: an advisory lock held to the end of
    the transaction. SQLite needs none: a write transaction already excludes all others.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    key = int.from_bytes(hashlib.sha1(b"mailloop:conversation:" + subject_key.encode()).digest()[:8], "big",
                         signed=True)
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
