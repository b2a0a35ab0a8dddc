"""Where every mail is: mailboxes, queues, lag and quarantine — for `pipeline status` and the metrics.

Everything here is read from the journal, Redis and the broker at the moment it is
asked for, so it is true for the whole fleet, not for one process.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import redis
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from pipeline.config import Config
from pipeline.store.journal import IMPORT_REF_PREFIXES
from pipeline.store.models import JournalEntry
from pipeline.tasks.policy import QUEUES

log = logging.getLogger("pipeline.status")

LAG_WINDOW = timedelta(hours=1)


@dataclass
class MailboxStatus:
    name: str
    source: str
    last_fetch: str | None
    failing: str | None
    outcomes: dict[str, int]
    waiting: int


@dataclass
class Status:
    mailboxes: list[MailboxStatus]
    queues: dict[str, int | None]  # None: the broker could not be asked
    quarantine: int
    waiting: int
    lag_p50_seconds: float | None
    lag_p99_seconds: float | None
    lag_samples: int
    broker_error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def last_fetch_key(config: Config) -> str:
    return f"{config.settings.redis.key_prefix}fetch:last"


def failing_key(config: Config) -> str:
    return f"{config.settings.redis.key_prefix}fetch:failing"


def record_fetch(client: redis.Redis, config: Config, mailbox: str, at: datetime) -> None:
    """A fetch of `mailbox` succeeded: remember when, and clear a failure recorded before."""
    pipe = client.pipeline()
    pipe.hset(last_fetch_key(config), mailbox, at.isoformat())
    pipe.hdel(failing_key(config), mailbox)
    pipe.execute()


def record_fetch_failure(client: redis.Redis, config: Config, mailbox: str, why: str) -> None:
    client.hset(failing_key(config), mailbox, why[:500])


def journal_counts(session: Session) -> dict[tuple[str, str | None], int]:
    rows = session.execute(select(JournalEntry.mailbox, JournalEntry.outcome, func.count())
                           .group_by(JournalEntry.mailbox, JournalEntry.outcome))
    return {(mailbox, outcome): n for mailbox, outcome, n in rows}


def recent_lags(session: Session, now: datetime) -> list[float]:
    """Seconds from receipt to outcome of mail processed in the last hour (imports excluded:
    their received time is the mail's own, possibly years old)."""
    since = now - LAG_WINDOW
    imported = or_(*(JournalEntry.source_ref.like(prefix + "%") for prefix in IMPORT_REF_PREFIXES))
    rows = session.execute(select(JournalEntry.received_at, JournalEntry.processed_at)
                           .where(JournalEntry.processed_at >= since,
                                  or_(JournalEntry.source_ref.is_(None), ~imported))
                           .limit(100_000))
    lags = []
    for received, processed in rows:
        if received is None or processed is None:
            continue
        lags.append(max(0.0, (_aware(processed) - _aware(received)).total_seconds()))
    return lags


def queue_depths(broker_url: str) -> tuple[dict[str, int | None], str | None]:
    """Messages waiting in each queue, asked of the broker (Redis or RabbitMQ) by a passive declare."""
    from kombu import Connection

    depths: dict[str, int | None] = {q: None for q in QUEUES}
    try:
        with Connection(broker_url, connect_timeout=3, transport_options={"max_retries": 0}) as conn:
            channel = conn.default_channel
            for queue in QUEUES:
                try:
                    depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                except conn.channel_errors:
                    depths[queue] = 0  # not declared yet: no worker has consumed from it
                    channel = conn.channel()
    except Exception as exc:  # the broker being down is something to show, not a crash
        return depths, f"{type(exc).__name__}: {exc}"
    return depths, None


def collect(config: Config, session: Session, client: redis.Redis, *, with_queues: bool = True,
            now: datetime | None = None) -> Status:
    now = now or datetime.now(timezone.utc)
    counts = journal_counts(session)
    last = {k.decode(): v.decode() for k, v in client.hgetall(last_fetch_key(config)).items()}
    failing = {k.decode(): v.decode() for k, v in client.hgetall(failing_key(config)).items()}
    boxes = []
    for box in config.mailboxes:
        outcomes = {o: n for (m, o), n in counts.items() if m == box.name and o is not None}
        boxes.append(MailboxStatus(box.name, box.source.kind, last.get(box.name), failing.get(box.name),
                                   outcomes, counts.get((box.name, None), 0)))
    lags = sorted(recent_lags(session, now))
    queues, broker_error = queue_depths(config.broker_url) if with_queues else ({}, None)
    return Status(
        mailboxes=boxes,
        queues=queues,
        quarantine=sum(n for (_, o), n in counts.items() if o == "quarantined"),
        waiting=sum(n for (_, o), n in counts.items() if o is None),
        lag_p50_seconds=_percentile(lags, 0.50),
        lag_p99_seconds=_percentile(lags, 0.99),
        lag_samples=len(lags),
        broker_error=broker_error,
    )


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
