"""Transaction-scoped locks in the store, for decisions that must not be made twice at once.

A mail processed alone waits for a lock. A mail processed in a batch (several mails in one
transaction, `MailProcessor.process_many`) must not wait while it holds the batch's earlier
locks — two batches waiting on each other is a deadlock — so there a lock someone else holds
raises `Busy`, and the mail is processed alone after the batch has committed.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from sqlalchemy import BigInteger, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

# session.info key: set while the session runs a batch; locks are then tried, never waited for.
NO_WAIT = "mailloop.no_wait"
# session.info key: the lock keys a batch took for the whole transaction (`try_conversation_locks`).
_HELD = "mailloop.locks_held"


class Busy(Exception):
    """Another transaction holds the lock this mail needs; process it alone, later."""


def lock_conversation(session: Session, subject_key: str) -> None:
    """Serialise new conversations with this normalised subject until the transaction ends.

    Two workers handed the first two mails of a conversation at once must decide as if
    one came after the other (D1.5.4): the second waits here until the first has
    committed its ticket, then finds it. PostgreSQL: an advisory lock held to the end of
    the transaction. SQLite needs none: a write transaction already excludes all others.
    """
    _advisory(session, _conversation(subject_key))


def try_conversation_locks(session: Session, subject_keys: Iterable[str]) -> None:
    """Try, in one statement, the conversation locks a batch's mails may need (PostgreSQL, batch only).

    Run before any mail's savepoint, so a lock taken here is the transaction's to its end and
    `lock_conversation` need not ask again; one another transaction holds is asked again in
    its mail's turn (and is `Busy` if still held). A lock taken for a mail that turns out not to
    need it (a reply, an alert) only makes a concurrent first mail of that subject wait its turn.
    """
    if session.get_bind().dialect.name != "postgresql" or not session.info.get(NO_WAIT):
        return
    keys = sorted({_key(_conversation(k)) for k in subject_keys})
    if keys:
        rows = session.connection().execute(_TRY_LOCKS, {"keys": keys})
        session.info.setdefault(_HELD, set()).update(key for key, taken in rows if taken)


def _conversation(subject_key: str) -> bytes:
    return b"mailloop:conversation:" + subject_key.encode()


def _key(name: bytes) -> int:
    return int.from_bytes(hashlib.sha1(name).digest()[:8], "big", signed=True)


def lock_entity(session: Session, entity_type: str, entity_id: int) -> None:
    """Hold the ticket, task or project a mail writes to until the transaction ends.

    The row lock of the update would serialise writers as well, but only this lock can be
    tried first: a batch must not block on a row another batch holds.
    """
    _advisory(session, f"mailloop:entity:{entity_type}:{entity_id}".encode())


_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(:key)")
_TRY_LOCKS = text("SELECT k, pg_try_advisory_xact_lock(k) FROM unnest(:keys) AS t(k)").bindparams(
    bindparam("keys", type_=ARRAY(BigInteger)))


def _advisory(session: Session, name: bytes) -> None:
    if session.get_bind().dialect.name != "postgresql":
        return
    key = _key(name)
    if key in session.info.get(_HELD, ()):
        return
    if not session.info.get(NO_WAIT):
        session.connection().execute(_LOCK, {"key": key})
    elif not session.connection().execute(_TRY_LOCK, {"key": key}).scalar_one():
        raise Busy(name.decode())
