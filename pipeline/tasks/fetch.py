"""Fetch tasks (I/O): journal new mail of one polling mailbox, then hand its ids to the process queue.

Beat schedules this for Maildir, POP3 and IMAP mailboxes without IDLE (IDLE mailboxes and
SMTP/LMTP listeners are long-running processes of `pipeline run` / `pipeline listen`).
One fetcher per mailbox at a time across the fleet: a Redis lock that expires
`LOCK_SECONDS` after the fetcher's last mail, so one that dies holding it blocks the
mailbox only that long. Transient trouble is retried within the task with capped backoff;
what remains, and permanent trouble (bad credentials, an expired token), marks the
mailbox failing in `pipeline status`, logged once — the next scheduled fetch tries again.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from celery import shared_task
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from pipeline.config import MailboxConfig
from pipeline.metrics import FETCHED
from pipeline.process import Unavailable
from pipeline.runtime import Runtime
from pipeline.sources import imap, pop3
from pipeline.sources.base import (
    MailboxLock,
    Sink,
    SourceError,
    TransientSourceError,
    report_failure,
)
from pipeline.sources.maildir import fetch_maildir
from pipeline.sources.settings import polled_by_beat
from pipeline.status import record_fetch
from pipeline.tasks import runtime
from pipeline.tasks.policy import PROCESS_BATCH, RETRY, task_options
from pipeline.tasks.process import enqueue

log = logging.getLogger("pipeline.tasks.fetch")

# Within one fetch: a dropped connection or a throttled server gets three tries, 2 s to 20 s apart.
SOURCE_RETRY = {"retry": retry_if_exception_type(TransientSourceError), "stop": stop_after_attempt(3),
                "wait": wait_exponential_jitter(multiplier=2, max=20), "reraise": True}


@shared_task(name="pipeline.tasks.fetch.fetch_mailbox", autoretry_for=(Unavailable,),
             **RETRY, **task_options("fetch", idempotent=True))
def fetch_mailbox(mailbox: str) -> int:
    """Journal the mailbox's new mail and enqueue it; returns how many mails were journaled."""
    rt = runtime()
    box = rt.config.mailbox(mailbox)
    if not polled_by_beat(box.source):
        log.warning("mailbox %s: source %r is not fetched by this task", mailbox, box.source.kind)
        return 0
    client = rt.redis()
    lock = MailboxLock(client, rt.config, mailbox)
    if not lock.acquire():
        log.info("mailbox %s: another fetcher is at work; skipping this turn", mailbox)
        return 0
    try:
        processor = rt.processor()
        sink = Sink(processor.journal, lambda ids: enqueue(ids, PROCESS_BATCH), keepalive=lock.renew,
                    journal_many=processor.journal_many)
        count = fetch_source(rt, box, sink)
        record_fetch(client, rt.config, mailbox, datetime.now(UTC))
    except SourceError as exc:
        report_failure(client, rt.config, mailbox, str(exc))
        return 0
    except OSError as exc:  # the Maildir is gone or unreadable: not transient, tell the operator
        report_failure(client, rt.config, mailbox, f"{type(exc).__name__}: {exc}")
        return 0
    finally:
        lock.release()
    if count:
        FETCHED.labels(mailbox).inc(count)
        log.info("mailbox %s: journaled %d mail(s)", mailbox, count)
    return count


def fetch_source(rt: Runtime, box: MailboxConfig, sink: Sink) -> int:
    """One fetch of a polling source; how many mails it journaled."""
    if box.source.kind == "maildir":
        ids = fetch_maildir(rt.config.resolve_path(box.source.path), box.name, rt.store(),
                            rt.processor().journal_many, sink.enqueue, keepalive=sink.keepalive)
        return len(ids)
    for attempt in Retrying(**SOURCE_RETRY):
        with attempt:
            if box.source.kind == "imap":
                return imap.fetch_once(box, rt.config, rt.store(), rt.redis(), sink).journaled
            return pop3.fetch_once(box, rt.config, rt.store(), sink)
    raise AssertionError("unreachable")
