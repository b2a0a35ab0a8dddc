"""Rows held back by a batch (`append_later`): written in one statement, yet read as if written at once."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import event, func, select

from pipeline.store.db import Store, changes
from pipeline.store.models import Ticket, TimelineEntry
from pipeline.store.rows import append, append_later, flush_appended, hold_back_appends

AT = datetime(2026, 12, 2, 9, 0, tzinfo=timezone.utc)


def _entry(what: str, entity_id: int = 7) -> dict:
    return dict(entity_type="ticket", entity_id=entity_id, who="tom@msp.example", what=what,
                from_value=None, to_value=None, journal_id=None, at=AT)


def _inserts(store: Store) -> list[str]:
    sent: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_a: sent.append(statement) if statement.startswith("INSERT") else None)
    return sent


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
