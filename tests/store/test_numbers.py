"""Ticket numbers (D3): per-day sequences, unique under concurrent writers, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp
from datetime import datetime, timezone

from pipeline.config import NumberingSettings
from pipeline.store.db import Store
from pipeline.store.locks import NO_WAIT
from pipeline.store.numbers import allocate_number
from pipeline.store.rows import hold_back_appends


def _allocate_many(url: str, count: int, queue: mp.Queue, per_batch: int = 0) -> None:
    """`count` numbers, one per transaction, or `per_batch` per transaction run as a process task's
    batch runs it (rows held back, no lock waited for: on SQLite the counter is counted on in memory)."""
    store = Store(url)
    numbering = NumberingSettings()
    at = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
    got = []
    while len(got) < count:
        with store.transaction() as session:
            if per_batch:
                session.info[NO_WAIT] = True
                hold_back_appends(session)
            for _ in range(per_batch or 1):
                got.append(allocate_number(session, "ticket", numbering, at))
    store.dispose()
    queue.put(got)


def _numbers_from_processes(db_url: str, each: int, per_batch: tuple[int, ...]) -> list[str]:
    """The numbers `len(per_batch)` processes allocated at once, `each` apiece (`_allocate_many`)."""
    queue: mp.Queue = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_allocate_many, args=(db_url, each, queue, n))
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
