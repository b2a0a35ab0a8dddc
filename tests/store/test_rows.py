"""Rows held back by a batch (`append_later`): written in one statement, yet read as if written at once."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import event, func, select

from pipeline.store.db import Store, changes
from pipeline.store.models import Account, Contact, Ticket, TimelineEntry
from pipeline.store.rows import (
    add_inserted,
    add_inserted_with,
    add_new,
    append,
    append_later,
    flush_appended,
    hold_back_appends,
    inserted_mark,
    mails_left,
    take_back,
)

AT = datetime(2026, 12, 2, 9, 0, tzinfo=timezone.utc)


def _entry(what: str, entity_id: int = 7) -> dict:
    return dict(entity_type="ticket", entity_id=entity_id, who="tom@msp.example", what=what,
                from_value=None, to_value=None, journal_id=None, at=AT)


def _inserts(store: Store) -> list[str]:
    sent: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_a: sent.append(statement) if statement.lstrip().startswith(("INSERT", "WITH")) else None)
    return sent


def _store_with_account(db_url: str) -> tuple[Store, int]:
    """A migrated store holding one customer account, Contoso; and its id."""
    store = Store(db_url)
    store.upgrade()
    with store.transaction() as session:
        account = Account(name="Contoso")
        session.add(account)
        session.flush()
        return store, account.id


def test_held_back_rows_are_one_statement_and_a_query_of_their_table_sees_them(db_url: str) -> None:
    store = Store(db_url)
    store.upgrade()
    inserts = _inserts(store)
    with store.transaction() as session:
        hold_back_appends(session)
        before = changes(session)
        for what in ("created", "note added", "note added"):
            append_later(session, TimelineEntry, **_entry(what))
        assert inserts == []
        assert changes(session) == before + 3  # they count as changes: a failing mail is redone
        # An ORM query of the table, even of one column or through a join, sees them.
        assert session.scalar(select(func.count(TimelineEntry.id))) == 3
        assert len(inserts) == 1
        # Written now, they are not counted again: a later mail that wrote nothing has changed nothing.
        assert changes(session) == before + 3
        append_later(session, TimelineEntry, **_entry("status changed"))
        joined = select(Ticket.id).join(TimelineEntry, TimelineEntry.entity_id == Ticket.id)
        session.execute(joined).all()
        assert len(inserts) == 2
    store.dispose()


def test_an_immediate_append_to_the_same_table_keeps_the_order_rows_came_in(db_url: str) -> None:
    store = Store(db_url)
    store.upgrade()
    with store.transaction() as session:
        hold_back_appends(session)
        append_later(session, TimelineEntry, **_entry("note added"))
        append(session, TimelineEntry, **_entry("status changed"))
        append_later(session, TimelineEntry, **_entry("time entry"))
        flush_appended(session)
    with store.sessions() as session:
        assert list(session.scalars(select(TimelineEntry.what).order_by(TimelineEntry.id))) == [
            "note added", "status changed", "time entry"]
    store.dispose()


def test_without_holding_back_a_row_is_written_at_once(db_url: str) -> None:
    store = Store(db_url)
    store.upgrade()
    inserts = _inserts(store)
    with store.transaction() as session:
        append_later(session, TimelineEntry, **_entry("created"))
        assert len(inserts) == 1
    store.dispose()


def test_a_new_contact_and_its_ticket_are_written_together_and_read_back_as_written(db_url: str) -> None:
    store, account_id = _store_with_account(db_url)
    inserts = _inserts(store)
    with store.transaction() as session:
        hold_back_appends(session)
        append_later(session, TimelineEntry, **_entry("created"))  # another table's: it stays held back
        contact = Contact(email="anna.berg@contoso.example", name="Anna Berg", account_id=account_id)
        ticket = Ticket(number="T20261202.0001", title="Printer on floor 3 offline", account_id=account_id)
        assert add_inserted_with(session, contact, ticket, "contact_id") is ticket
        # A batch holds both rows back, with ids reserved ahead (PostgreSQL: from the sequences;
        # SQLite: past the highest, its write lock held).
        assert inserts == []
        assert ticket.contact_id == contact.id and contact.id is not None
        # In the session as loaded, with their defaults: reading them costs no query.
        sent = len(inserts)
        assert (ticket.status, ticket.contact.email, contact.notifications) == ("New", "anna.berg@contoso.example",
                                                                               contact.notifications)
        assert session.get(Contact, contact.id) is contact and len(inserts) == sent
        ticket_id, contact_id = ticket.id, contact.id
        flush_appended(session)
    with store.sessions() as session:
        stored = session.get(Ticket, ticket_id)
        assert (stored.contact_id, stored.contact.name, stored.title) == (contact_id, "Anna Berg",
                                                                           "Printer on floor 3 offline")
        assert session.scalar(select(func.count(TimelineEntry.id))) == 1
    store.dispose()


def test_outside_a_batch_a_new_contact_and_its_ticket_are_one_statement_on_postgresql(db_url: str) -> None:
    store, account_id = _store_with_account(db_url)
    inserts = _inserts(store)
    with store.transaction() as session:
        contact = Contact(email="anna.berg@contoso.example", name="Anna Berg", account_id=account_id)
        ticket = Ticket(number="T20261202.0001", title="Printer on floor 3 offline", account_id=account_id)
        assert add_inserted_with(session, contact, ticket, "contact_id", unless_exists="email") is ticket
        assert len(inserts) == (1 if db_url.startswith("postgresql") else 2)
    with store.sessions() as session:
        assert session.get(Ticket, ticket.id).contact_id == contact.id
    store.dispose()


def test_a_savepoint_rolled_back_takes_back_the_contact_and_the_ticket_written_together(db_url: str) -> None:
    store, account_id = _store_with_account(db_url)
    with store.transaction() as session:
        mark = inserted_mark(session)
        savepoint = session.begin_nested()
        contact = Contact(email="anna.berg@contoso.example", name="Anna Berg", account_id=account_id)
        add_inserted_with(session, contact, Ticket(number="T20261202.0001", title="x", account_id=account_id),
                          "contact_id")
        savepoint.rollback()
        take_back(session, mark)
        assert contact not in session
        assert session.scalar(select(func.count(Contact.id))) == 0
        assert session.scalar(select(func.count(Ticket.id))) == 0
    store.dispose()


def test_a_contact_whose_address_exists_is_not_written_nor_its_ticket(db_url: str) -> None:
    store, account_id = _store_with_account(db_url)
    with store.transaction() as session:
        session.add(Contact(email="anna.berg@contoso.example", name="Anna (another worker's)", account_id=account_id))
    with store.transaction() as session:
        again = Contact(email="anna.berg@contoso.example", name="Anna Berg", account_id=account_id)
        ticket = Ticket(number="T20261202.0001", title="Printer on floor 3 offline", account_id=account_id)
        # No error that would cost the transaction: the answer says the row exists.
        assert add_inserted_with(session, again, ticket, "contact_id", unless_exists="email") is None
        assert add_new(session, Contact(email="anna.berg@contoso.example", account_id=account_id), "email") is None
        assert again not in session and ticket not in session
        fresh = add_new(session, Contact(email="ben.ode@contoso.example", account_id=account_id), "email")
        assert fresh is not None and session.get(Contact, fresh.id) is fresh and fresh.notifications is True
    with store.sessions() as session:
        assert sorted(session.execute(select(Contact.email, Contact.name)).all()) == [
            ("anna.berg@contoso.example", "Anna (another worker's)"), ("ben.ode@contoso.example", "")]
        assert session.scalar(select(func.count(Ticket.id))) == 0
    store.dispose()


def _held_batch(session) -> None:
    """The transaction as a batch's first attempt runs it: rows held back, five mails to go."""
    hold_back_appends(session)
    mails_left(session, 5)


def test_a_held_ticket_the_unit_of_work_updates_is_written_before_its_update(db_url: str) -> None:
    store, account_id = _store_with_account(db_url)
    with store.transaction() as session:
        _held_batch(session)
        ticket = add_inserted(session, Ticket(number="T20261202.0001", title="Backup failed", account_id=account_id))
        ticket.status = "In Progress"  # a #status command in the same mail
        session.flush()
        assert session.scalar(select(Ticket.status).where(Ticket.id == ticket.id)) == "In Progress"
    with store.sessions() as session:
        assert session.get(Ticket, ticket.id).status == "In Progress"
    store.dispose()


def test_held_rows_are_written_parents_first_whatever_order_they_came_in(db_url: str) -> None:
    store, account_id = _store_with_account(db_url)
    with store.transaction() as session:
        known = add_inserted(session, Contact(email="anna.berg@contoso.example", name="Anna", account_id=account_id))
    with store.transaction() as session:
        _held_batch(session)
        # First a ticket of a known contact, then a new sender's contact and ticket: on PostgreSQL the
        # tickets' rows are held first, yet the new contact's row must be in before its ticket's.
        add_inserted(session, Ticket(number="T20261202.0001", title="Printer", account_id=account_id,
                                     contact_id=known.id))
        add_inserted_with(session, Contact(email="ben.ode@contoso.example", name="Ben", account_id=account_id),
                          Ticket(number="T20261202.0002", title="Scanner", account_id=account_id), "contact_id")
        flush_appended(session)
    with store.sessions() as session:
        rows = session.execute(select(Ticket.number, Contact.email).join(Contact, Ticket.contact_id == Contact.id)
                               .order_by(Ticket.number)).all()
        assert rows == [("T20261202.0001", "anna.berg@contoso.example"), ("T20261202.0002", "ben.ode@contoso.example")]
    store.dispose()


def test_the_open_ticket_question_finds_a_ticket_the_batch_holds_back_without_writing_it(db_url: str) -> None:
    from pipeline.store.lookups import Lookups
    store, account_id = _store_with_account(db_url)
    with store.transaction() as session:
        older = add_inserted(session, Ticket(number="T20261202.0001", title="Printer", account_id=account_id,
                                             subject_key="printer"))
    inserts = _inserts(store)
    with store.transaction() as session:
        _held_batch(session)
        ticket = add_inserted(session, Ticket(number="T20261202.0002", title="VPN drops", account_id=account_id,
                                              subject_key="vpn drops"))
        lookups = Lookups(session)
        # The duplicate-ticket rule's question for the batch's next mail with this subject: the held ticket.
        assert lookups.open_ticket_like("vpn drops", None, account_id) == (ticket.id, "T20261202.0002")
        # Another subject: the store answers, and the held ticket need not be written for it.
        assert lookups.open_ticket_like("printer", None, account_id) == (older.id, "T20261202.0001")
        if db_url.startswith("postgresql"):
            assert inserts == []
        # One not open, or another account's: no match.
        add_inserted(session, Ticket(number="T20261202.0003", title="Scanner", account_id=account_id,
                                     subject_key="scanner", status="Complete"))
        assert lookups.open_ticket_like("scanner", None, account_id) is None
        assert lookups.open_ticket_like("vpn drops", None, account_id + 1) is None
    store.dispose()


def test_a_new_row_referring_to_a_held_note_finds_it_written(db_url: str) -> None:
    from pipeline.store.models import Note, Resource, TimeEntry

    store, account_id = _store_with_account(db_url)
    with store.transaction() as session:
        tom = Resource(email="tom@msp.example", name="Tom")
        session.add(tom)
    with store.transaction() as session:
        _held_batch(session)
        note_id = append(session, Note, entity_type="ticket", entity_id=7, author_name="Tom",
                         author_email="tom@msp.example", body="Replaced the toner.", internal=False)
        session.add(TimeEntry(entity_type="ticket", entity_id=7, resource_id=tom.id, hours=0.5, billable=True,
                              summary="Replaced the toner.", date=AT, note_id=note_id))
        session.flush()  # the time entry's insert needs the note's row
    with store.sessions() as session:
        assert session.scalar(select(TimeEntry.note_id)) == note_id
        assert session.get(Note, note_id).body == "Replaced the toner."
    store.dispose()


def test_a_batch_reserves_ids_once_for_the_mails_it_has_left(db_url: str) -> None:
    store, account_id = _store_with_account(db_url)
    sent: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda _c, _cur, statement, *_a: sent.append(statement))
    with store.transaction() as session:
        _held_batch(session)
        tickets = [add_inserted(session, Ticket(number=f"T20261202.000{n}", title=f"Case {n}", account_id=account_id))
                   for n in range(1, 6)]
        assert len({t.id for t in tickets}) == 5
        flush_appended(session)
    # PostgreSQL: five ids from the sequence in one round trip; SQLite: the highest id read once.
    reservations = [s for s in sent if "nextval" in s or "max(tickets.id)" in s]
    inserts = [s for s in sent if s.startswith("INSERT INTO tickets")]
    assert (len(reservations), len(inserts)) == (1, 1)
    with store.sessions() as session:
        assert sorted(session.scalars(select(Ticket.id))) == sorted(t.id for t in tickets)
    store.dispose()


def test_a_row_inserted_at_once_between_reserved_ones_takes_none_of_their_ids(db_url: str) -> None:
    # On SQLite a reservation is the ids past the highest; an insert the unit of work or `append`
    # makes meanwhile takes the highest plus one, so the reservation is read again after it.
    store, account_id = _store_with_account(db_url)
    with store.transaction() as session:
        _held_batch(session)
        first = add_inserted(session, Ticket(number="T20261202.0001", title="Held", account_id=account_id))
        by_orm = Ticket(number="T20261202.0002", title="Inserted by the unit of work", account_id=account_id)
        session.add(by_orm)
        session.flush()
        second = add_inserted(session, Ticket(number="T20261202.0003", title="Held too", account_id=account_id))
        at_once = append(session, TimelineEntry, **_entry("created", first.id))
        third = append(session, TimelineEntry, **_entry("note added", second.id))
        flush_appended(session)
        ids = [first.id, by_orm.id, second.id]
    assert len(set(ids)) == 3 and at_once != third
    with store.sessions() as session:
        assert sorted(session.scalars(select(Ticket.title))) == ["Held", "Held too", "Inserted by the unit of work"]
        assert session.scalar(select(func.count(TimelineEntry.id))) == 2
    store.dispose()
