"""How a source hands a fetched batch to the journal (`Sink.journal_each`): one commit for the
batch, split where big mails would make one statement too large, and one mail the store refuses
set apart without holding back the others."""

from __future__ import annotations

from pipeline.process import MailProcessor, by_bytes
from pipeline.sources.base import Sink
from pipeline.store.db import Store
from tests.conftest import journal_inserts, make_mail


def test_runs_hold_at_most_the_limit_and_a_bigger_item_runs_alone() -> None:
    sizes = [4, 4, 4, 9, 1, 1, 20, 2]
    assert list(by_bytes(sizes, lambda n: n, limit=10)) == [[4, 4], [4], [9, 1], [1], [20], [2]]
    assert list(by_bytes(sizes, lambda n: n, limit=100, count=3)) == [[4, 4, 4], [9, 1, 1], [20, 2]]
    assert list(by_bytes([], lambda n: n)) == []


def test_runs_are_handed_on_before_the_next_item_is_taken() -> None:
    taken: list[int] = []

    def items():
        for n in range(6):
            taken.append(n)
            yield n

    runs = by_bytes(items(), lambda n: 1, limit=2)
    assert next(runs) == [0, 1] and taken == [0, 1, 2]  # one item ahead, never the whole batch
    assert next(runs) == [2, 3] and taken == [0, 1, 2, 3, 4]


def test_a_batch_of_big_mails_is_journaled_a_few_at_a_time(processor: MailProcessor, store: Store) -> None:
    # Scans of 7 MiB each: three would be 21 MiB in one statement; at most 16 MiB go together.
    mails = [(make_mail(subject=f"Scan {i}", body="x" * (7 * 2**20)), f"imap:support:1:{i}") for i in range(3)]
    sink = Sink(processor.journal, lambda ids: None, journal_many=processor.journal_many)

    with journal_inserts(store) as inserts:
        ids = sink.journal_each("support", mails)

    assert len(inserts) == 2
    assert len(set(ids)) == 3 and all(isinstance(i, int) for i in ids)
    small = [(make_mail(subject=f"Note {i}"), f"imap:support:1:{10 + i}") for i in range(5)]
    with journal_inserts(store) as inserts:
        sink.journal_each("support", small)
    assert len(inserts) == 1
