"""Notify tasks (I/O): send outbox rows after commit, sweep what is left, purge old history (D1.7).

The bodies are thin: claiming, sending and recording live in `pipeline.notify.send`.
Sending is idempotent per row (a row is claimed before it is sent, and a sent row is
never claimed again), so the tasks run with late acknowledgement.
"""

from __future__ import annotations

import logging
from datetime import datetime

from celery import shared_task

from pipeline.notify.send import SmtpUnavailable, deliver, due, purge
from pipeline.process import Unavailable
from pipeline.tasks import clock, runtime, store_or_retry
from pipeline.tasks.policy import RETRY, TIME_LIMITS, task_options

log = logging.getLogger("pipeline.tasks.notify")

# A claim outlives any task that could still be sending under it: the hard time limit kills it first.
LEASE_SECONDS = TIME_LIMITS["notify"][1] + 30
# How many rows one send task carries (one SMTP connection).
SEND_BATCH = 50
# After a connection timed out, sends wait this long before trying the server again; the rows
# stay pending meanwhile and the task's retries or the sweep send them.
BREAKER_SECONDS = 15


@shared_task(name="pipeline.tasks.notify.send_notifications", autoretry_for=(SmtpUnavailable, Unavailable),
             **RETRY, **task_options("notify", idempotent=True))
def send_notifications(notification_ids: list[int], now: str | None = None) -> dict[str, int]:
    """Send these outbox rows; rows a transient failure left pending make the task retry (bounded).

    `now` (ISO 8601) is the clock leases are judged by; only a sweep given a clock passes one on.
    """
    rt = runtime()
    when = datetime.fromisoformat(now) if now else None
    breaker = f"{rt.config.settings.redis.key_prefix}smtp:not-answering"
    if rt.redis().exists(breaker):
        # Another sender just waited out a timeout: don't tie up this worker slot as well.
        raise SmtpUnavailable("the SMTP server did not answer a moment ago")
    with store_or_retry("sending notifications"):
        report = deliver(rt.store(), rt.config, notification_ids, lease_seconds=LEASE_SECONDS, now=when)
    if report.timed_out:
        rt.redis().set(breaker, "1", ex=BREAKER_SECONDS)
    if report.sent or report.failed:
        log.info("notifications: %s", report.as_json())
    if report.retry:
        raise SmtpUnavailable(f"{len(report.retry)} notification(s) not sent yet")
    return report.as_json()


@shared_task(name="pipeline.tasks.notify.sweep", autoretry_for=(Unavailable,),
             **RETRY, **task_options("notify", idempotent=True))
def sweep(now: str | None = None) -> int:
    """Hand pending rows that are due, and rows a killed sender left behind, to send tasks.

    `now` (ISO 8601) sets the clock, for a test or to catch up; beat leaves it to the wall clock.
    """
    with store_or_retry("the sweep"), runtime().store().sessions() as session:
        ids = due(session, clock(now))
    enqueue(ids, now)
    if ids:
        log.info("sweep: %d notification(s) handed to senders", len(ids))
    return len(ids)


@shared_task(name="pipeline.tasks.notify.purge_history", autoretry_for=(Unavailable,),
             **RETRY, **task_options("notify", idempotent=True))
def purge_history(now: str | None = None) -> int:
    """Delete notifications older than 30 days; returns how many."""
    with store_or_retry("the purge"), runtime().store().transaction() as session:
        count = purge(session, clock(now))
    if count:
        log.info("purged %d notification(s) older than 30 days", count)
    return count


def enqueue(notification_ids: list[int], now: str | None = None) -> None:
    """Send ids to the notify queue in batches of SEND_BATCH."""
    for start in range(0, len(notification_ids), SEND_BATCH):
        send_notifications.delay(notification_ids[start:start + SEND_BATCH], now)
