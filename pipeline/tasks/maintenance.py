"""Maintenance tasks (scheduled by beat): reconciliation of the journal, scheduled ticket transitions."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from celery import shared_task

from pipeline.lifecycle import run_scheduled_transitions
from pipeline.process import Unavailable
from pipeline.store.journal import unprocessed_ids
from pipeline.tasks import clock, runtime, store_or_retry
from pipeline.tasks.policy import PROCESS_BATCH, RECONCILE_AFTER, RETRY, task_options
from pipeline.tasks.process import enqueue

log = logging.getLogger("pipeline.tasks.maintenance")


@shared_task(name="pipeline.tasks.maintenance.reconcile", autoretry_for=(Unavailable,),
             **RETRY, **task_options("maintenance", idempotent=True))
def reconcile(older_than_seconds: float | None = None) -> int:
    """Enqueue journaled mail that has waited too long for an outcome; returns how many.

    Catches what a crash or a broker outage left behind: a mail journaled but never
    enqueued, or a task lost with a killed worker. Processing is idempotent, so a mail
    that is merely slow and gets enqueued twice is still processed once.
    """
    age = RECONCILE_AFTER if older_than_seconds is None else timedelta(seconds=older_than_seconds)
    with store_or_retry("reconcile"), runtime().store().sessions() as session:
        ids = unprocessed_ids(session, datetime.now(timezone.utc) - age)
    if ids:
        enqueue(ids, PROCESS_BATCH)
        log.warning("reconcile: %d journaled mail(s) without an outcome enqueued again", len(ids))
    return len(ids)


@shared_task(name="pipeline.tasks.maintenance.scheduled_transitions", autoretry_for=(Unavailable,),
             **RETRY, **task_options("maintenance", idempotent=True))
def scheduled_transitions(now: str | None = None) -> dict[str, int]:
    """D2's transitions that come due with time (Waiting Until, feedback window, auto-close).

    `now` (ISO 8601) sets the clock, for a test or to catch up; beat leaves it to the wall clock.
    """
    at = clock(now)
    with store_or_retry("scheduled transitions"), runtime().store().transaction() as session:
        counts = run_scheduled_transitions(session, runtime().config, at)
    if any(counts.values()):
        log.info("scheduled transitions at %s: %s", at.isoformat(), counts)
    return counts
