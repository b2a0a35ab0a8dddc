"""Ticket, task and project numbers (D3): unique under any number of concurrent writers."""

from __future__ import annotations

import os
from datetime import datetime
from functools import cache
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, Insert, bindparam, create_engine, event, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, SessionTransaction

from pipeline.config import NumberingSettings
from pipeline.store.db import count_change
from pipeline.store.locks import NO_WAIT
from pipeline.store.models import NumberSequence
from pipeline.store.rows import holding_back


def allocate_number(session: Session, kind: str, numbering: NumberingSettings, now: datetime) -> str:
    """The next number of `kind` for today's date in the configured time zone.

    One upsert that increments and returns the counter: atomic on PostgreSQL (the row
    lock serialises concurrent writers) and on SQLite (one writer at a time). A SQLite batch
    reads the counter once and counts on in memory, writing it back as it commits: its write
    lock, held from BEGIN IMMEDIATE, keeps every other writer out meanwhile. In a batch on
    PostgreSQL the upsert commits on its own connection at once: held to the end of a batch,
    the counter's row lock would make every other worker wait for that batch. The price is
    a gap in the sequence where a batch (or one mail of it) is rolled back; numbers stay
    unique (D3).
    """
    local = now.astimezone(ZoneInfo(numbering.timezone))
    dialect = session.get_bind().dialect.name
    params = {"kind": kind, "day": local.strftime("%Y-%m-%d")}
    stmt = _upsert(dialect)
    if session.info.get(NO_WAIT) and dialect == "postgresql":
        seq = _counter_connection(session).execute(stmt, params).scalar_one()
    elif dialect == "sqlite" and holding_back(session):
        seq = _counted_on(session, params)
    else:
        seq = session.connection().execute(stmt, params).scalar_one()  # Core: the ORM path costs more than the upsert
    fmt = getattr(numbering, kind)
    return fmt.format(date=local, seq=seq)


@cache
def _upsert(dialect: str) -> Insert:
    """The increment-and-return statement, built once: it runs for every new ticket."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = NumberSequence.__table__
    return insert(table).values(kind=bindparam("kind"), day=bindparam("day"), last_value=1) \
        .on_conflict_do_update(index_elements=[table.c.kind, table.c.day],
                               set_={"last_value": table.c.last_value + 1}) \
        .returning(table.c.last_value)


_READ = select(NumberSequence.last_value).where(NumberSequence.kind == bindparam("kind"),
                                                NumberSequence.day == bindparam("day"))
_COUNTER_ROW = sqlite.insert(NumberSequence.__table__)
_WRITE_BACK = _COUNTER_ROW.on_conflict_do_update(index_elements=["kind", "day"],
                                                 set_={"last_value": _COUNTER_ROW.excluded.last_value})

# session.info key: the counters a SQLite batch has counted on, by (kind, day): their last value.
_COUNTED = "mailloop.counted_numbers"


def _counted_on(session: Session, params: dict[str, str]) -> int:
    counted = session.info.get(_COUNTED)
    if counted is None:
        counted = session.info[_COUNTED] = {}
        if not event.contains(session, "before_commit", _write_back):
            event.listen(session, "before_commit", _write_back)
    key = (params["kind"], params["day"])
    if key not in counted:
        counted[key] = session.connection().execute(_READ, params).scalar() or 0
    counted[key] += 1
    count_change(session)  # as the upsert counted: a mail failing after it is redone, so no number is skipped
    return counted[key]


def _write_back(session: Session) -> None:
    """The counters the batch counted on, written as it commits (one statement)."""
    counted = session.info.pop(_COUNTED, None)
    if counted:
        session.connection().execute(_WRITE_BACK, [{"kind": kind, "day": day, "last_value": value}
                                                   for (kind, day), value in counted.items()])


# Per store engine, a small engine whose connections autocommit each increment in one round trip
# and do not wait for the disk: the WAL is written in order, so once the batch that uses a
# number has committed (durably), the increment is on disk too; if a crash loses the
# increment, it loses every ticket that carried the number with it.
_COUNTERS: dict[int, tuple[Engine, Engine]] = {}
os.register_at_fork(after_in_child=_COUNTERS.clear)  # a forked worker must not share the sockets


def _counters(engine: Engine) -> Engine:
    found = _COUNTERS.get(id(engine))
    if found is None or found[0] is not engine:
        own = create_engine(engine.url, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=2,
                            pool_pre_ping=True,
                            connect_args={"connect_timeout": 5, "options": "-c synchronous_commit=off"})
        found = _COUNTERS[id(engine)] = (engine, own)
    return found[1]


# session.info key: the batch's connection to the counters, checked out at its first new ticket.
_OWN = "mailloop.counter_connection"


def _counter_connection(session: Session) -> Connection:
    """One counters connection per batch transaction: a checkout per ticket cost a pool ping each."""
    own = session.info.get(_OWN)
    if own is None:
        own = session.info[_OWN] = _counters(session.get_bind()).connect()
        if not event.contains(session, "after_transaction_end", _give_back):
            event.listen(session, "after_transaction_end", _give_back)
    return own


def _give_back(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the batch's transaction, not a mail's savepoint
        own = session.info.pop(_OWN, None)
        if own is not None:
            own.close()


def dispose_counters(engine: Engine) -> None:
    found = _COUNTERS.pop(id(engine), None)
    if found is not None:
        found[1].dispose()
