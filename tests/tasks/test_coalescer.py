"""Journal ids handed over one at a time leave for the process queue in batches (Coalescer)."""

from __future__ import annotations

import threading

from pipeline.tasks.process import Coalescer


class Queue:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.fail = fail
        self.sent = threading.Event()

    def send(self, ids: list[int]) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.batches.append(list(ids))
        self.sent.set()


def test_ids_arriving_one_by_one_leave_together_within_the_delay() -> None:
    queue = Queue()
    enqueue = Coalescer(queue.send, size=50, delay=0.2)
    for journal_id in (1, 2, 3):
        enqueue([journal_id])
    assert queue.batches == []  # still waiting for company
    assert queue.sent.wait(5)
    assert queue.batches == [[1, 2, 3]]


def test_a_full_batch_leaves_at_once_without_waiting_for_the_timer() -> None:
    queue = Queue()
    enqueue = Coalescer(queue.send, size=3, delay=5)
    enqueue([1, 2])
    enqueue([3, 4])
    assert queue.batches == [[1, 2, 3], [4]]  # no batch larger than a process task takes


def test_a_broker_error_is_logged_and_the_ids_left_to_reconcile(caplog) -> None:
    enqueue = Coalescer(Queue(fail=True).send, size=2)
    enqueue([7, 8])  # a full batch: sent at once, and the failure must not reach the intake
    assert "2 journal id(s) left to reconcile" in caplog.text
