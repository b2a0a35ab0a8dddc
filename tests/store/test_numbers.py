"""Ticket numbers (D3): per-day sequences, unique under concurrent writers, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from pipeline.config import NumberingSettings
from pipeline.store.db import Store
from pipeline.store.locks import NO_WAIT
from pipeline.store.numbers import allocate_number, foresee_numbers
from pipeline.store.models import NumberSequence
from pipeline.store.rows import hold_back_appends


@contextmanager
def _batch_transaction(store: Store, foreseen: int) -> Iterator[Session]:
    """A transaction as a process task's batch runs it (rows held back, no lock waited for: on
    SQLite the counter is counted on in memory), its mails foreseen to need `foreseen` numbers."""
    with store.transaction() as session:
        session.info[NO_WAIT] = True
        hold_back_appends(session)
        foresee_numbers(session, "ticket", foreseen)
        yield session


def _allocate_many(url: str, count: int, queue: mp.Queue, per_batch: int = 0, foreseen: int = 0,
                   start=None) -> None:
    """`count` numbers, one per transaction, or `per_batch` per transaction run as a process task's
    batch runs it (`_batch_transaction`, `foreseen` foreseen); once every process is at `start` (a barrier)."""
    store = Store(url)
    if start is not None:
        store.engine.connect().close()  # connected before the race starts, not during it
        start.wait(timeout=120)
    numbering = NumberingSettings()
    at = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
    got = []
    while len(got) < count:
        with _batch_transaction(store, foreseen) if per_batch else store.transaction() as session:
            for _ in range(per_batch or 1):
                got.append(allocate_number(session, "ticket", numbering, at))
    store.dispose()
    queue.put(got)


def _numbers_from_processes(db_url: str, each: int, per_batch: tuple[int, ...], foreseen: int = 0) -> list[str]:
    """The numbers `len(per_batch)` processes allocated at once, `each` apiece (`_allocate_many`)."""
    spawn = mp.get_context("spawn")
    queue: mp.Queue = spawn.Queue()
    start = spawn.Barrier(len(per_batch))
    procs = [spawn.Process(target=_allocate_many, args=(db_url, each, queue, n, foreseen, start))
             for n in per_batch]
    for p in procs:
        p.start()
    numbers = [n for _ in procs for n in queue.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return numbers


def test_numbers_are_unique_and_gapless_under_concurrent_writers(db_url: str) -> None:
    workers, each = 4, 25
    numbers = _numbers_from_processes(db_url, each, (0,) * workers)
    assert len(numbers) == len(set(numbers)) == workers * each
    assert sorted(numbers) == [f"T20261123.{i:04d}" for i in range(1, workers * each + 1)]


def test_numbers_stay_gapless_when_batches_and_single_mails_allocate_at_once(db_url: str) -> None:
    numbers = _numbers_from_processes(db_url, 25, (0, 5, 0, 5))
    assert sorted(numbers) == [f"T20261123.{i:04d}" for i in range(1, 101)]


def test_a_batch_rolled_back_leaves_no_gap_on_sqlite_and_one_on_postgresql(db_url: str) -> None:
    store = Store(db_url)
    numbering = NumberingSettings()
    at = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
    with store.transaction() as session:
        assert allocate_number(session, "ticket", numbering, at) == "T20261123.0001"
    try:
        with store.transaction() as session:
            session.info[NO_WAIT] = True
            hold_back_appends(session)
            assert [allocate_number(session, "ticket", numbering, at) for _ in range(3)] == [
                "T20261123.0002", "T20261123.0003", "T20261123.0004"]
            raise RuntimeError("the batch fails")
    except RuntimeError:
        pass
    with store.transaction() as session:
        # PostgreSQL's batch increments committed on their own connection: a gap there, as documented.
        expected = "T20261123.0005" if db_url.startswith("postgresql") else "T20261123.0002"
        assert allocate_number(session, "ticket", numbering, at) == expected
    store.dispose()


AT = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def pg_store(pg_database: str):
    """PostgreSQL only: a SQLite batch counts on in memory, under its write lock, and foresees nothing."""
    store = Store(pg_database)
    with store.transaction() as session:
        session.execute(NumberSequence.__table__.delete())
    yield store
    store.dispose()


@pytest.fixture
def increments() -> list[dict]:
    """The parameters of every increment of a counter any engine sends from now on."""
    seen: list[dict] = []

    def one(_conn, _cursor, statement, params, *_args) -> None:
        if re.match(r"\s*INSERT INTO number_sequences", statement):
            seen.append(params)

    event.listen(Engine, "before_cursor_execute", one)
    yield seen
    event.remove(Engine, "before_cursor_execute", one)


def _batch(store: Store, foreseen: int, used: int) -> list[str]:
    """`used` numbers taken as a PostgreSQL process task's batch takes them, `foreseen` foreseen."""
    numbering = NumberingSettings()
    with _batch_transaction(store, foreseen) as session:
        return [allocate_number(session, "ticket", numbering, AT) for _ in range(used)]


def _last_value(store: Store) -> int:
    with store.sessions() as session:
        return session.scalar(select(NumberSequence.last_value).where(NumberSequence.kind == "ticket"))


def test_a_postgresql_batch_takes_the_numbers_its_mails_will_need_in_one_increment(pg_store, increments) -> None:
    assert _batch(pg_store, foreseen=3, used=3) == ["T20261123.0001", "T20261123.0002", "T20261123.0003"]
    assert [p["size"] for p in increments] == [3]


def test_a_batch_needing_more_numbers_than_it_foresaw_takes_the_rest_one_at_a_time(pg_store, increments) -> None:
    assert _batch(pg_store, foreseen=2, used=4) == [f"T20261123.{i:04d}" for i in range(1, 5)]
    assert [p["size"] for p in increments] == [2, 1, 1]


def test_numbers_a_batch_foresaw_and_did_not_use_are_given_back(pg_store) -> None:
    assert _batch(pg_store, foreseen=5, used=2) == ["T20261123.0001", "T20261123.0002"]
    assert _last_value(pg_store) == 2
    assert _batch(pg_store, foreseen=0, used=1) == ["T20261123.0003"]  # no gap


def test_unused_numbers_stay_a_gap_when_another_worker_took_one_since(pg_store) -> None:
    numbering = NumberingSettings()
    with _batch_transaction(pg_store, foreseen=5) as session:
        first = allocate_number(session, "ticket", numbering, AT)
        # Another worker's single mail takes the next number past the batch's five meanwhile.
        assert _batch(pg_store, foreseen=0, used=1) == ["T20261123.0006"]
    assert first == "T20261123.0001"
    # Giving 2-5 back would hand out 6 again: they stay a gap, every number unique.
    assert _last_value(pg_store) == 6
    assert _batch(pg_store, foreseen=0, used=1) == ["T20261123.0007"]


def test_numbers_stay_unique_when_batches_foresee_more_than_they_use_at_once(pg_store, pg_database) -> None:
    numbers = _numbers_from_processes(pg_database, 300, (5, 3, 0, 5), foreseen=8)
    assert len(numbers) == len(set(numbers)) == 1200


def test_a_batch_rolled_back_gives_back_what_it_foresaw_and_did_not_use(pg_store) -> None:
    with pytest.raises(RuntimeError):
        with _batch_transaction(pg_store, foreseen=5) as session:
            assert allocate_number(session, "ticket", NumberingSettings(), AT) == "T20261123.0001"
            raise RuntimeError("the batch fails")
    # 1 went with the rolled-back batch (a gap, as without foresight); 2-5 came back.
    assert _batch(pg_store, foreseen=0, used=1) == ["T20261123.0002"]


def test_a_batch_across_midnight_gives_back_both_days_unused_numbers(pg_store) -> None:
    numbering = NumberingSettings()
    with _batch_transaction(pg_store, foreseen=4) as session:
        assert allocate_number(session, "ticket", numbering, AT.replace(hour=23, minute=59)) == "T20261123.0001"
        assert allocate_number(session, "ticket", numbering, AT.replace(day=24, hour=0, minute=1)) == "T20261124.0001"
    with pg_store.sessions() as session:
        counters = dict(session.execute(select(NumberSequence.day, NumberSequence.last_value)).all())
    assert counters == {"2026-11-23": 1, "2026-11-24": 1}


def test_a_batch_whose_counter_connection_is_lost_fails_as_a_database_outage(pg_store) -> None:
    from sqlalchemy import text

    from pipeline.process import TRANSIENT
    from pipeline.store.numbers import _OWN

    numbering = NumberingSettings()
    with pytest.raises(TRANSIENT):  # retried by the task, as any outage; not an error of ours
        with _batch_transaction(pg_store, foreseen=3) as session:
            allocate_number(session, "ticket", numbering, AT.replace(hour=23, minute=59))
            pid = session.info[_OWN].exec_driver_sql("SELECT pg_backend_pid()").scalar()
            with pg_store.engine.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            allocate_number(session, "ticket", numbering, AT.replace(day=24, hour=0, minute=1))  # a new block
    # The block's unused numbers stay a gap; the next batch counts on past it.
    assert _batch(pg_store, foreseen=0, used=1) == ["T20261123.0004"]


def test_the_sequence_restarts_each_day_in_the_configured_zone(db_url: str) -> None:
    store = Store(db_url)
    numbering = NumberingSettings(timezone="Europe/Berlin")
    # 23:30 UTC on the 23rd is already the 24th in Berlin.
    late = datetime(2026, 11, 23, 23, 30, tzinfo=timezone.utc)
    early = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
    with store.transaction() as session:
        assert allocate_number(session, "ticket", numbering, early) == "T20261123.0001"
        assert allocate_number(session, "ticket", numbering, late) == "T20261124.0001"
        assert allocate_number(session, "ticket", numbering, early) == "T20261123.0002"
        assert allocate_number(session, "task", numbering, early) == "K20261123.0001"
    store.dispose()


def test_a_sequence_past_9999_widens(db_url: str) -> None:
    store = Store(db_url)
    numbering = NumberingSettings()
    at = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
    from sqlalchemy import insert

    from pipeline.store.models import NumberSequence

    with store.transaction() as session:
        session.execute(insert(NumberSequence).values(kind="ticket", day="2026-11-23", last_value=9999))
        assert allocate_number(session, "ticket", numbering, at) == "T20261123.10000"
    store.dispose()

