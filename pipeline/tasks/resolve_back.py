"""Resolve-back tasks (I/O, the notify queue): tell an RMM that an alert's ticket was completed.

The bodies are thin: claiming, calling and recording live in `pipeline.resolve_back`. A
call is made at most once per claim (a row is claimed under a lease before the call, and a
done row is never claimed again), so the tasks run with late acknowledgement. Rows are
handed over after the commit that wrote them (pipeline/resolve_back/outbox.py); the sweep
takes what that missed: a broker hiccup, a killed worker, an RMM down past the task's retries.
"""

from __future__ import annotations

import logging

from celery import shared_task

from pipeline.process import Unavailable
from pipeline.resolve_back.call import deliver
from pipeline.resolve_back.outbox import due
from pipeline.tasks import clock, runtime, store_or_retry
from pipeline.tasks.policy import RETRY, TIME_LIMITS, task_options

log = logging.getLogger("pipeline.tasks.resolve_back")

# A claim outlives any task that could still be calling under it: the hard time limit kills it first.
LEASE_SECONDS = TIME_LIMITS["notify"][1] + 30
# Rows per task: each call may take its timeout (at most 30 s), and a vendor that does not
# answer is asked once per batch, so a batch stays inside the notify time limit.
CALL_BATCH = 10


class RmmUnavailable(Exception):
    """Some calls got a transient answer (5xx, 408, 429, no connection); the task retries them."""


@shared_task(name="pipeline.tasks.resolve_back.call_rmm", autoretry_for=(RmmUnavailable, Unavailable),
             **RETRY, **task_options("notify", idempotent=True))
def call_rmm(call_ids: list[int], now: str | None = None) -> dict[str, int]:
    """Make these resolve-back calls; rows a transient failure left pending make the task retry (bounded).

    The retries follow the one policy (pipeline/tasks/policy.py: exponential backoff with
    jitter, 5 at most); after them the sweep tries on with a slower backoff until the row's
    `max_attempts`, then the row is failed with the reason on the ticket's timeline.
    """
    rt = runtime()
    with store_or_retry("resolving back"):
        report = deliver(rt.store(), rt.config, call_ids, lease_seconds=LEASE_SECONDS,
                         now=clock(now) if now else None)
    if report.done or report.failed:
        log.info("resolve-back: %s", report.as_json())
    if report.retry:
        raise RmmUnavailable(f"{len(report.retry)} resolve-back call(s) not made yet")
    return report.as_json()


@shared_task(name="pipeline.tasks.resolve_back.sweep", autoretry_for=(Unavailable,),
             **RETRY, **task_options("notify", idempotent=True))
def sweep(now: str | None = None) -> int:
    """Hand pending calls that are due, and calls a killed worker left behind, to call tasks.

    `now` (ISO 8601) sets the clock, for a test or to catch up; beat leaves it to the wall clock.
    """
    with store_or_retry("the resolve-back sweep"), runtime().store().sessions() as session:
        ids = due(session, clock(now))
    enqueue(ids, now)
    if ids:
        log.info("resolve-back sweep: %d call(s) handed to callers", len(ids))
    return len(ids)


def enqueue(call_ids: list[int], now: str | None = None) -> None:
    """Send ids to the notify queue in batches of CALL_BATCH."""
    for start in range(0, len(call_ids), CALL_BATCH):
        call_rmm.delay(call_ids[start:start + CALL_BATCH], now)
