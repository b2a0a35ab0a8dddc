"""Process tasks (CPU): run the pipeline on journaled mail, a batch of ids per transaction."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from celery import shared_task

from pipeline.notify.send import pending_for_journal
from pipeline.process import Unavailable
from pipeline.tasks import runtime
from pipeline.tasks.policy import COALESCE_SECONDS, RETRY, task_options

log = logging.getLogger("pipeline.tasks.process")


@shared_task(name="pipeline.tasks.process.process_batch", autoretry_for=(Unavailable,),
             **RETRY, **task_options("process", idempotent=True))
def process_batch(journal_ids: list[int]) -> dict[str, int]:
    """Process several journal ids in one transaction (`MailProcessor.process_many`); outcomes by kind.

    A retry after an outage runs the whole batch again: ids already processed return
    their recorded outcome without doing anything twice.
    """
    counts: dict[str, int] = {}
    for result in runtime().processor().process_many(journal_ids):
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    log.info("processed %d mail(s): %s", len(journal_ids), counts)
    notify_after_commit(journal_ids)
    return counts


@shared_task(name="pipeline.tasks.process.process_mail", autoretry_for=(Unavailable,),
             **RETRY, **task_options("process", idempotent=True))
def process_mail(journal_id: int) -> str:
    """Process one journal id (for sources that hand over one mail at a time)."""
    outcome = runtime().processor().process(journal_id).outcome
    notify_after_commit([journal_id])
    return outcome


def notify_after_commit(journal_ids: list[int]) -> None:
    """Hand the outbox rows these mails wrote to the notify queue, now that they are committed.

    Best effort: the mails' outcomes stand whatever happens here, and the notify sweep
    sends whatever this could not enqueue (D1.7: SMTP trouble never changes an outcome).
    """
    from pipeline.tasks.notify import enqueue as enqueue_notifications

    try:
        with runtime().store().sessions() as session:
            ids = pending_for_journal(session, journal_ids)
        enqueue_notifications(ids)
    except Exception as exc:
        log.warning("notifications of %d mail(s) left to the sweep: %s", len(journal_ids), exc)


def enqueue(journal_ids: list[int], batch_size: int) -> int:
    """Send journal ids to the process queue in batches; returns how many tasks were sent."""
    sent = 0
    for start in range(0, len(journal_ids), batch_size):
        process_batch.delay(journal_ids[start:start + batch_size])
        sent += 1
    return sent


class Coalescer:
    """Hands journal ids over in batches: at most `size` ids, at most `delay` seconds after the first.

    An intake or an IDLE fetcher journals one mail at a time; sent one by one, each would be
    a task and a transaction of its own. Waiting up to COALESCE_SECONDS (200 ms) for company
    lets the process task run them in one transaction (`process_many`): under a steady 150
    mails/s, 250 ms gave 14% more throughput than 50 ms (bench/README.md). Nothing is at risk
    meanwhile: the mail is journaled, and reconcile re-enqueues whatever a crash left unprocessed.
    """

    def __init__(self, send: Callable[[list[int]], object], size: int, delay: float = COALESCE_SECONDS) -> None:
        self.send, self.size, self.delay = send, size, delay
        self._pending: list[int] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def __call__(self, journal_ids: list[int]) -> None:
        with self._lock:
            self._pending.extend(journal_ids)
            if len(self._pending) < self.size:
                if self._timer is None:
                    self._timer = threading.Timer(self.delay, self.flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
        self.flush()

    def flush(self) -> None:
        with self._lock:
            ids, self._pending = self._pending, []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for start in range(0, len(ids), self.size):
            try:
                self.send(ids[start:start + self.size])
            except Exception as exc:  # the broker is down: the ids are journaled, reconcile sends them
                log.warning("%d journal id(s) left to reconcile: %s", len(ids) - start, exc)
                return
