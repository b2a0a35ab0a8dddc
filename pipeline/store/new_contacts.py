"""New senders' contacts for a whole PostgreSQL batch, in one statement.

A first mail from a new sender created its contact with a round trip of its own (`add_new`),
one per new sender: most of a corpus of customer mail (bench/README.md, issue 10, session 23).
A batch knows its senders before any mail's turn (`stages.prefetch`), so at the first contact
a mail must create, the batch inserts the contacts of every new sender it expects, in one
`INSERT … ON CONFLICT DO NOTHING`, in address order: two batches that share new senders then
wait for each other's contacts in one order (a cycle through other rows, such as a default
account two batches create at once, is what it was before: PostgreSQL breaks it and the batch is
retried).

Each mail that creates its sender's contact then takes the row written for it, as `add_new`
would have answered: the contact, with the mail's own name and account (the prediction came from
the sender's first mail of the batch, which may not be the one that creates it), or None where
another transaction had written the sender first (the caller reads theirs). Until a mail takes
it, a row is not there for the batch's reads (`written_ahead`: a mail quarantined in place
empties the batch's cache, and the next asks the database). A row no mail took (its mail stopped
at a gate, or runs alone after the batch) is deleted before the batch commits: a contact exists
only where a mail created it. A sender whose default account does not exist yet is not written
ahead: the account too is created only by the mail that needs it.

Not held back to the batch's end like its other rows (`rows`): a contact refused there, because
another worker's batch wrote the same sender meanwhile, would cost the batch a second run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sqlalchemy import bindparam, delete, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from pipeline.store.db import count_change
from pipeline.store.models import Account, Contact
from pipeline.store.rows import add_new, as_loaded, new_row, write_held


@dataclass(frozen=True)
class ExpectedContact:
    """A new sender's contact as the batch's attribution foresees it."""

    name: str
    account_id: int | None  # None: the mailbox's default account (written ahead only if it exists)
    default_account: str


# session.info keys: the contacts the batch expects to create, by address; the rows it wrote
# for them and no mail has taken yet, by address: this batch's id, or None for another's row.
_EXPECTED = "mailloop.new_contacts.expected"
_WRITTEN = "mailloop.new_contacts.written"

_TABLE = Contact.__table__
_INSERT = (postgresql.insert(_TABLE).on_conflict_do_nothing(index_elements=[_TABLE.c.email])
           .returning(*_TABLE.c))
_CORRECT = (update(_TABLE).where(_TABLE.c.id == bindparam("contact_id"))
            .values(name=bindparam("name"), account_id=bindparam("account_id")))
_DELETE = delete(_TABLE).where(_TABLE.c.id.in_(bindparam("ids", expanding=True)))


def expect_contacts(session: Session, expected: dict[str, ExpectedContact]) -> None:
    """The new senders this batch will most likely create a contact for, by address."""
    session.info[_EXPECTED] = dict(expected)


def expected(session: Session, email: str) -> bool:
    """Is `email`'s contact one the batch writes with the others (`add_new_contact`)?"""
    return email in session.info.get(_EXPECTED, ()) or email in session.info.get(_WRITTEN, ())


def written_ahead(session: Session, email: str) -> bool:
    """Is the contact row of `email` one this batch wrote ahead and no mail has taken yet?
    Such a row is not there yet for the batch's reads."""
    return session.info.get(_WRITTEN, {}).get(email) is not None


def add_new_contact(session: Session, contact: Contact,
                    existing_account: Callable[[str], Account | None]) -> Contact | None:
    """`add_new(session, contact, "email")`; for an expected sender, from the batch's one insert.

    `existing_account(name)`: the default account `name` if it exists (never created here: the
    expected sender who would belong to it may never need it), e.g. `Lookups.account_by_name`.
    """
    written = session.info.setdefault(_WRITTEN, {})
    if contact.email not in written:
        if contact.email not in session.info.get(_EXPECTED, ()):
            return add_new(session, contact, "email")
        _write_expected(session, existing_account)
        if contact.email not in written:  # its default account did not exist: not written ahead
            return add_new(session, contact, "email")
    row = written.pop(contact.email)
    if row is None:
        return None
    if (row.name, row.account_id) != (contact.name, contact.account_id):
        # Foreseen from another of the sender's mails (a mailbox of another policy, another display name).
        session.connection().execute(_CORRECT, {"contact_id": row.id, "name": contact.name,
                                                "account_id": contact.account_id})
    contact.id, contact.notifications = row.id, row.notifications  # every column loaded, none read again
    count_change(session)  # taken, the row is this mail's change: a failure after it redoes the batch
    as_loaded(session, contact)
    return contact


def _write_expected(session: Session, existing_account: Callable[[str], Account | None]) -> None:
    expected = session.info.pop(_EXPECTED)
    contacts = []
    for email, e in sorted(expected.items()):
        account_id = e.account_id
        if account_id is None:
            default = existing_account(e.default_account)
            account_id = default.id if default is not None else None
        if account_id is not None:
            contacts.append(Contact(email=email, name=e.name, account_id=account_id))
    if not contacts:
        return
    write_held(session, Contact)
    mine = {row.email: row for row in session.connection().execute(_INSERT, [new_row(c) for c in contacts])}
    session.info[_WRITTEN].update({c.email: mine.get(c.email) for c in contacts})


def discard_untaken(session: Session) -> None:
    """Delete the contacts the batch wrote ahead that no mail took; before the batch commits."""
    session.info.pop(_EXPECTED, None)
    ids = [row.id for row in session.info.pop(_WRITTEN, {}).values() if row is not None]
    if ids:
        session.connection().execute(_DELETE, {"ids": ids})
