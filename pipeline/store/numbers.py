"""Ticket, task and project numbers (D3): unique under any number of concurrent writers."""

from __future__ import annotations

import logging
import os
from datetime import datetime
from functools import cache
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, Insert, bindparam, create_engine, event, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, SessionTransaction

from pipeline.config import NumberingSettings
from pipeline.store.db import count_change
from pipeline.store.locks import NO_WAIT
from pipeline.store.models import NumberSequence
from pipeline.store.rows import holding_back

log = logging.getLogger("pipeline.store")


def allocate_number(session: Session, kind: str, numbering: NumberingSettings, now: datetime) -> str:
    """The next number of `kind` for today's date in the configured time zone.

    One upsert that increments and returns the counter: atomic on PostgreSQL (the row
    lock serialises concurrent writers) and on SQLite (one writer at a time). A SQLite batch
    reads the counter once and counts on in memory, writing it back as it commits: its write
    lock, held from BEGIN IMMEDIATE, keeps every other writer out meanwhile. In a batch on
    PostgreSQL the upsert commits on its own connection at once: held to the end of a batch,
    the counter's row lock would make every other worker wait for that batch. The price is
    a gap in the sequence where a batch (or one mail of it) is rolled back; numbers stay
    unique (D3). Such a batch takes the numbers its mails will most likely need in one
    increment (`foresee_numbers`) and, at its end, gives back those it did not use where nobody
    took one since (`_give_back`).
    """
    local = now.astimezone(ZoneInfo(numbering.timezone))
    dialect = session.get_bind().dialect.name
    params = {"kind": kind, "day": local.strftime("%Y-%m-%d")}
    if session.info.get(NO_WAIT) and dialect == "postgresql":
        seq = _take_from_block(session, params)
    elif dialect == "sqlite" and holding_back(session):
        seq = _counted_on(session, params)
    else:
        seq = session.connection().execute(_upsert(dialect), params).scalar_one()  # Core: the ORM path costs more
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


@cache
def _increment_by() -> Insert:
    """The increment by a block's size, returning the block's last number (PostgreSQL)."""
    table = NumberSequence.__table__
    stmt = postgresql.insert(table).values(kind=bindparam("kind"), day=bindparam("day"), last_value=bindparam("size"))
    return stmt.on_conflict_do_update(index_elements=[table.c.kind, table.c.day],
                                      set_={"last_value": table.c.last_value + stmt.excluded.last_value}) \
        .returning(table.c.last_value)


# Numbers taken and not used go back only if nobody took one since: else they stay a gap.
_GIVE_BACK = (update(NumberSequence)
              .where(NumberSequence.kind == bindparam("b_kind"), NumberSequence.day == bindparam("b_day"),
                     NumberSequence.last_value == bindparam("b_last"))
              .values(last_value=bindparam("b_first") - 1))

# session.info keys: how many numbers of each kind the batch's mails will most likely still need
# (`foresee_numbers`); the blocks it took, by (kind, day): [next number to hand out, last number].
_FORESEEN = "mailloop.foreseen_numbers"
_BLOCKS = "mailloop.number_blocks"


def foresee_numbers(session: Session, kind: str, count: int) -> None:
    """How many numbers of `kind` a PostgreSQL batch's mails will most likely need: its first
    allocation takes them all in one increment instead of a round trip each (bench/README.md,
    issue 10, session 24). A guess too low costs a round trip for each number past it; too high,
    nothing where the batch can give the rest back, a gap where another worker took a number
    meanwhile (with several workers busy, most of what was guessed too many)."""
    session.info.setdefault(_FORESEEN, {})[kind] = count
    _until_the_end(session)


def _take_from_block(session: Session, params: dict[str, str]) -> int:
    key = (params["kind"], params["day"])
    blocks = session.info.setdefault(_BLOCKS, {})
    foreseen = session.info.get(_FORESEEN, {})
    block = blocks.get(key)
    if block is None or block[0] > block[1]:
        size = max(foreseen.get(key[0], 0), 1)
        last = _counter_connection(session).execute(_increment_by(), {**params, "size": size}).scalar_one()
        block = blocks[key] = [last - size + 1, last]
    if foreseen.get(key[0]):
        foreseen[key[0]] -= 1
    block[0] += 1
    return block[0] - 1


def _give_back_unused(blocks: list[tuple[tuple[str, str], list[int]]], conn: Connection) -> None:
    unused = [{"b_kind": kind, "b_day": day, "b_first": first, "b_last": last}
              for (kind, day), (first, last) in blocks if first <= last]
    if unused:
        conn.execute(_GIVE_BACK, unused)


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
        _until_the_end(session)
    return own


def _until_the_end(session: Session) -> None:
    """The batch's counters state lives until its transaction ends (`_give_back`)."""
    if not event.contains(session, "after_transaction_end", _give_back):
        event.listen(session, "after_transaction_end", _give_back)


def _give_back(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the batch's transaction, not a mail's savepoint
        session.info.pop(_FORESEEN, None)
        blocks = session.info.pop(_BLOCKS, None)
        own = session.info.pop(_OWN, None)
        if own is not None:
            try:
                # A connection lost mid-batch is not asked again: what the batch raised is the news.
                if blocks and not own.invalidated:
                    _give_back_unused(sorted(blocks.items()), own)  # in key order: two batches never deadlock
            except SQLAlchemyError as exc:  # the server went away: the numbers stay a gap, still unique
                log.warning("numbers not given back (%s): a gap in the sequence", getattr(exc, "orig", None) or exc)
            finally:
                own.close()


def dispose_counters(engine: Engine) -> None:
    found = _COUNTERS.pop(id(engine), None)
    if found is not None:
        found[1].dispose()
