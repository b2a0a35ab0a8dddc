"""Fetch tasks (I/O): journal new mail of one mailbox, then hand its ids to the process queue.

One fetcher per mailbox at a time across the fleet: a Redis lock with an expiry, so a
worker that dies holding it blocks the mailbox for at most `FETCH_LOCK_SECONDS`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from celery import shared_task
from redis.exceptions import LockError

from pipeline.metrics import FETCHED
from pipeline.process import Unavailable
from pipeline.sources.maildir import fetch_maildir
from pipeline.status import record_fetch, record_fetch_failure
from pipeline.tasks import runtime
from pipeline.tasks.policy import FETCH_LOCK_SECONDS, PROCESS_BATCH, RETRY, task_options
from pipeline.tasks.process import enqueue

log = logging.getLogger("pipeline.tasks.fetch")


@shared_task(name="pipeline.tasks.fetch.fetch_mailbox", autoretry_for=(Unavailable,),
             **RETRY, **task_options("fetch", idempotent=True))
def fetch_mailbox(mailbox: str) -> int:
    """Journal the mailbox's new mail and enqueue it; returns how many mails were journaled."""
    rt = runtime()
    box = rt.config.mailbox(mailbox)
    if box.source.kind != "maildir":
        log.warning("mailbox %s: source %r is not fetched by this task", mailbox, box.source.kind)
        return 0
    client = rt.redis()
    lock = client.lock(f"{rt.config.settings.redis.key_prefix}lock:fetch:{mailbox}",
                       timeout=FETCH_LOCK_SECONDS, blocking=False)
    if not lock.acquire():
        log.info("mailbox %s: another fetcher is at work; skipping this turn", mailbox)
        return 0
    try:
        processor = rt.processor()
        ids = fetch_maildir(rt.config.resolve_path(box.source.path), mailbox, rt.store(), processor.journal)
        record_fetch(client, rt.config, mailbox, datetime.now(timezone.utc))
    except OSError as exc:  # the folder is gone or unreadable: not transient, tell the operator
        record_fetch_failure(client, rt.config, mailbox, f"{type(exc).__name__}: {exc}")
        log.error("mailbox %s: cannot read its Maildir: %s", mailbox, exc)
        return 0
    finally:
        try:
            lock.release()
        except LockError:  # it expired while we fetched; the journal's source_ref keeps this safe
            log.warning("mailbox %s: fetch lock expired before the fetch ended", mailbox)
    if ids:
        FETCHED.labels(mailbox).inc(len(ids))
        enqueue(ids, PROCESS_BATCH)
        log.info("mailbox %s: journaled %d mail(s)", mailbox, len(ids))
    return len(ids)

