"""Ticket, task and project numbers (D3): unique under any number of concurrent writers."""

from __future__ import annotations

from datetime import datetime
from functools import cache
from zoneinfo import ZoneInfo

from sqlalchemy import Insert, bindparam, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pipeline.config import NumberingSettings
from pipeline.store.locks import NO_WAIT
from pipeline.store.models import NumberSequence


def allocate_number(session: Session, kind: str, numbering: NumberingSettings, now: datetime) -> str:
    """The next number of `kind` for today's date in the configured time zone.

    One upsert that increments and returns the counter: atomic on PostgreSQL (the row
    lock serialises concurrent writers) and on SQLite (one writer at a time). In a batch on
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
        with session.get_bind().begin() as own:
            # No wait for the disk here: the WAL is written in order, so once the batch that
            # uses this number has committed (durably), this increment is on disk too; if it
            # is lost in a crash, so is every ticket that carried the number.
            own.execute(text("SET LOCAL synchronous_commit TO OFF"))
            seq = own.execute(stmt, params).scalar_one()
    else:
        seq = session.execute(stmt, params).scalar_one()
    fmt = getattr(numbering, kind)
    return fmt.format(date=local, seq=seq)


@cache
def _upsert(dialect: str) -> Insert:
    """The increment-and-return statement, built once: it runs for every new ticket."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(NumberSequence).values(kind=bindparam("kind"), day=bindparam("day"), last_value=1) \
        .on_conflict_do_update(index_elements=[NumberSequence.kind, NumberSequence.day],
                               set_={"last_value": NumberSequence.last_value + 1}) \
        .returning(NumberSequence.last_value)
