"""New senders' contacts for a whole PostgreSQL batch, in one statement.

A first mail from a new sender created its contact with a round trip of its own (`add_new`),
one per new sender: most of a corpus of customer mail (bench/README.md, issue 10, session 23).
A batch knows its senders before any mail's turn (`stages.prefetch`), so at the first contact
a mail must create, the batch inserts the contacts of every new sender it expects, in one
`INSERT … ON CONFLICT DO NOTHING`, in address order: two batches that share new senders then
wait for each other in one order, never in a cycle. Each mail that creates its sender's contact
then takes the row written for it, as `add_new` would have answered: the contact, or None where
another transaction had written the sender first (the caller reads theirs). A row no mail took
(its mail stopped at a gate, or runs alone after the batch) is deleted before the batch
commits: a contact exists only where a mail created it.

Not held back to the batch's end like its other rows (`rows`): a contact refused there, because
another worker's batch wrote the same sender meanwhile, would cost the batch a second run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sqlalchemy import bindparam, delete
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from pipeline.store.db import count_change
from pipeline.store.models import Contact
from pipeline.store.rows import add_new, as_loaded, new_row, write_held


@dataclass(frozen=True)
class ExpectedContact:
    """A new sender's contact as the batch's attribution foresees it."""

    name: str
    account_id: int | None  # None: the mailbox's default account, created on first use
    default_account: str


# session.info keys: the contacts the batch expects to create, by address; the rows it wrote
# for them and no mail has taken yet, by address: this batch's id, or None for another's row.
_EXPECTED = "mailloop.new_contacts.expected"
_WRITTEN = "mailloop.new_contacts.written"

_TABLE = Contact.__table__
_INSERT = (postgresql.insert(_TABLE).on_conflict_do_nothing(index_elements=[_TABLE.c.email])
           .returning(*_TABLE.c))
_DELETE = delete(_TABLE).where(_TABLE.c.id.in_(bindparam("ids", expanding=True)))


def expect_contacts(session: Session, expected: dict[str, ExpectedContact]) -> None:
    """The new senders this batch will most likely create a contact for, by address."""
    session.info[_EXPECTED] = dict(expected)


def expected(session: Session, email: str) -> bool:
    """Is `email`'s contact one the batch writes with the others (`add_new_contact`)?"""
    return email in session.info.get(_EXPECTED, ()) or email in session.info.get(_WRITTEN, ())


def add_new_contact(session: Session, contact: Contact, account_id_of: Callable[[str], int]) -> Contact | None:
    """`add_new(session, contact, "email")`; for an expected sender, from the batch's one insert.

    `account_id_of(name)`: the id of the default account `name`, for expected senders who belong
    to it. The contact comes back as it was written (the first of the batch's mails named it).
    """
    written = session.info.setdefault(_WRITTEN, {})
    if contact.email not in written:
        if contact.email not in session.info.get(_EXPECTED, ()):
            return add_new(session, contact, "email")
        _write_expected(session, account_id_of)
    row = written.pop(contact.email)
    if row is None:
        return None
    for column in _TABLE.c:  # every column loaded: reading one must not go back to the database
        setattr(contact, column.key, row._mapping[column])
    count_change(session)  # taken, the row is this mail's change: a failure after it redoes the batch
    as_loaded(session, contact)
    return contact


def _write_expected(session: Session, account_id_of: Callable[[str], int]) -> None:
    expected = session.info.pop(_EXPECTED)
    rows = [new_row(Contact(email=email, name=e.name,
                            account_id=e.account_id if e.account_id is not None else account_id_of(e.default_account)))
            for email, e in sorted(expected.items())]
    write_held(session, Contact)
    mine = {row.email: row for row in session.connection().execute(_INSERT, rows)}
    session.info[_WRITTEN].update({email: mine.get(email) for email in expected})


def discard_untaken(session: Session) -> None:
    """Delete the contacts the batch wrote ahead that no mail took; before the batch commits."""
    session.info.pop(_EXPECTED, None)
    ids = [row.id for row in session.info.pop(_WRITTEN, {}).values() if row is not None]
    if ids:
        session.connection().execute(_DELETE, {"ids": ids})
