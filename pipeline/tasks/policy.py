"""Queues, routes, time limits and the retry policy of every task — declared here, once.

Ops scale each queue on its own (`celery -A worker worker -Q process`). Late
acknowledgement is switched on only for tasks that are idempotent: processing a
journal id twice returns the recorded outcome, fetching twice finds the mail already
journaled, reconciling twice enqueues ids whose processing is idempotent.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from kombu import Queue

from pipeline.config import Config
from pipeline.sources.settings import polled_by_beat

QUEUES = ("fetch", "process", "notify", "maintenance")

ROUTES = {
    "pipeline.tasks.fetch.*": {"queue": "fetch"},
    "pipeline.tasks.process.*": {"queue": "process"},
    "pipeline.tasks.notify.*": {"queue": "notify"},
    # Resolving back to an RMM is outbound I/O like a notification: the same queue and workers.
    "pipeline.tasks.resolve_back.*": {"queue": "notify"},
    "pipeline.tasks.maintenance.*": {"queue": "maintenance"},
}

# How many journal ids one process task carries: large enough that the broker round
# trip is small against the work, small enough that a crash redoes little.
PROCESS_BATCH = 50
# How long an intake's journal ids wait for company before they go to the process queue
# (pipeline.tasks.process.Coalescer): bigger batches cost fewer transactions per mail.
COALESCE_SECONDS = 0.2

# Mail journaled but without an outcome after this long has lost its task (a worker
# killed before it acknowledged, a broker outage while enqueueing): reconcile enqueues it again.
RECONCILE_AFTER = timedelta(minutes=10)
RECONCILE_EVERY = timedelta(minutes=1)
TRANSITIONS_EVERY = timedelta(minutes=1)
# Outbox rows that their mail's commit did not get sent (a broker hiccup, a killed notify
# worker, SMTP down past the task's retries) are handed to senders again this often.
NOTIFY_SWEEP_EVERY = timedelta(minutes=1)
# Resolve-back calls that their commit did not get made are handed to callers again this often.
RESOLVE_BACK_SWEEP_EVERY = timedelta(minutes=1)
# Notification history older than 30 days is deleted; once a day is plenty.
NOTIFY_PURGE_EVERY = timedelta(days=1)

# One bounded policy for transient trouble (Redis, database, broker): exponential backoff
# with jitter, capped; never unbounded. A mail whose task gives up stays journaled and
# unprocessed, so reconcile picks it up once the outage is over.
RETRY = {
    "max_retries": 5,
    "retry_backoff": 2,          # 2 s, 4 s, 8 s, … before jitter
    "retry_backoff_max": 120,
    "retry_jitter": True,
}

# (soft, hard) seconds. The soft limit raises inside the task so it can stop cleanly.
TIME_LIMITS = {
    "fetch": (120, 180),
    "process": (240, 300),
    "notify": (60, 90),
    "maintenance": (120, 180),
}


# Redis broker: an unacknowledged (late-ack) task is handed out again after this long.
# It must exceed the longest hard time limit and retry countdown above.
VISIBILITY_TIMEOUT = 900

# Sources the fetch task polls on beat's schedule: Maildir, POP3, and IMAP without IDLE
# (`polled_by_beat`). IMAP with IDLE and SMTP/LMTP listeners are long-running processes instead.
POLLABLE_SOURCES = ("maildir", "pop3", "imap")


def celery_settings(config: Config, mailboxes: list[str] | None = None) -> dict[str, Any]:
    """The Celery configuration of a worker or beat for this mailloop configuration."""
    return {
        "broker_url": config.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT},
        "task_queues": [Queue(name) for name in QUEUES],
        "task_default_queue": "process",
        "task_routes": ROUTES,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Late-ack tasks are fetched one at a time, so a killed worker holds few unacked.
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "beat_schedule": beat_schedule(config, mailboxes),
        "timezone": "UTC",
    }


def beat_schedule(config: Config, mailboxes: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Fetch each polling mailbox at its interval; reconcile, scheduled transitions, the outbox sweeps and purge."""
    schedule: dict[str, dict[str, Any]] = {}
    for box in config.mailboxes:
        if mailboxes and box.name not in mailboxes:
            continue
        if polled_by_beat(box.source):
            schedule[f"fetch:{box.name}"] = {
                "task": "pipeline.tasks.fetch.fetch_mailbox",
                "schedule": float(box.source.poll_seconds),
                "args": (box.name,),
                # A fetch not started by the next tick is pointless: the next one covers it.
                "options": {"expires": float(box.source.poll_seconds)},
            }
    schedule["maintenance:reconcile"] = {
        "task": "pipeline.tasks.maintenance.reconcile",
        "schedule": RECONCILE_EVERY.total_seconds(),
        "options": {"expires": RECONCILE_EVERY.total_seconds()},
    }
    schedule["maintenance:scheduled_transitions"] = {
        "task": "pipeline.tasks.maintenance.scheduled_transitions",
        "schedule": TRANSITIONS_EVERY.total_seconds(),
        "options": {"expires": TRANSITIONS_EVERY.total_seconds()},
    }
    schedule["notify:sweep"] = {
        "task": "pipeline.tasks.notify.sweep",
        "schedule": NOTIFY_SWEEP_EVERY.total_seconds(),
        "options": {"expires": NOTIFY_SWEEP_EVERY.total_seconds()},
    }
    schedule["resolve_back:sweep"] = {
        "task": "pipeline.tasks.resolve_back.sweep",
        "schedule": RESOLVE_BACK_SWEEP_EVERY.total_seconds(),
        "options": {"expires": RESOLVE_BACK_SWEEP_EVERY.total_seconds()},
    }
    schedule["notify:purge_history"] = {
        "task": "pipeline.tasks.notify.purge_history",
        "schedule": NOTIFY_PURGE_EVERY.total_seconds(),
        "options": {"expires": NOTIFY_PURGE_EVERY.total_seconds()},
    }
    return schedule


def task_options(kind: str, *, idempotent: bool) -> dict[str, Any]:
    """Decorator options for a task of one kind: its limits and, if idempotent, late ack."""
    soft, hard = TIME_LIMITS[kind]
    options: dict[str, Any] = {"soft_time_limit": soft, "time_limit": hard}
    if idempotent:
        options.update(acks_late=True, reject_on_worker_lost=True)
    return options
