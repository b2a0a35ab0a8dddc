"""Celery tasks (D9): thin wrappers that move journal ids between the plain stages.

Each module is one kind of work and one queue — `fetch` (I/O), `process` (CPU),
`maintenance` — with routes, time limits and the retry policy declared once, in
`pipeline.tasks.policy`. Tasks pass journal ids and mailbox names, never mail bodies
or ORM objects.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

from celery.signals import (
    beat_init,
    setup_logging,
    task_retry,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from pipeline import logs, metrics
from pipeline.runtime import Runtime

_runtime: Runtime | None = None


def clock(now: str | None) -> datetime:
    """A task's clock: `now` (ISO 8601) when a test or a catch-up sets it, else the wall clock."""
    return datetime.fromisoformat(now) if now else datetime.now(timezone.utc)


@contextmanager
def store_or_retry(what: str) -> Iterator[None]:
    """The database or Redis being down is no task's fault: turn it into `Unavailable`, which
    every task retries under the bounded policy."""
    from pipeline.errors import CannotRun
    from pipeline.process import TRANSIENT, Unavailable

    try:
        yield
    except Unavailable:
        raise
    except (*TRANSIENT, CannotRun) as exc:  # CannotRun: the store was unreachable when first opened
        raise Unavailable(f"{what} waits for the store: {exc}") from None


def runtime() -> Runtime:
    """This worker process's configuration, store, Redis and processor (opened on first use)."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(None)  # $PIPELINE_CONFIG, else ./mailboxes.toml
    return _runtime


@worker_init.connect
def _import_before_fork(**_: object) -> None:
    # The database driver is imported by the first engine, so each pool process paid for it at its
    # first task (0.1–0.2 s of CPU, 2% of a fleet burst); imported here, every fork inherits it.
    # Nothing is opened: connections stay per process.
    import psycopg  # noqa: F401


@worker_process_init.connect
def _fresh_after_fork(**_: object) -> None:
    # A forked child must not reuse its parent's database pool or Redis socket.
    global _runtime
    _runtime = None


@worker_process_shutdown.connect
def _close(**_: object) -> None:
    if _runtime is not None:
        _runtime.close()


@setup_logging.connect
def _structured_logs(loglevel: int | str | None = None, **_: object) -> None:
    # Connected, this replaces Celery's own logging set-up: every line is JSON with the mail's fields.
    level = logging.getLevelName(loglevel) if isinstance(loglevel, str) else (loglevel or logging.INFO)
    logs.configure(level)


@task_retry.connect
def _count_retry(sender: object = None, **_: object) -> None:
    metrics.RETRIES.labels(getattr(sender, "name", "unknown")).inc()


@worker_ready.connect
def _serve_metrics(**_: object) -> None:
    """A fleet worker started with PIPELINE_METRICS_PORT serves /metrics from its main process,
    on 127.0.0.1 unless PIPELINE_METRICS_BIND names another address.

    Started once the pool has forked, after one read that imports everything a scrape
    needs: a pool process forked while the server thread held an import lock would hang.
    """
    from pipeline.errors import CannotRun

    port = os.environ.get("PIPELINE_METRICS_PORT")
    if not port:
        return
    log = logging.getLogger("pipeline.metrics")
    # A bad setting is one line, and the worker goes on working: the mail matters more than its metrics.
    if not port.isdigit() or not 0 < int(port) < 65536:
        log.error("metrics not served: PIPELINE_METRICS_PORT: %r is not a port number", port)
        return
    try:
        bind = metrics.bind_address(os.environ.get("PIPELINE_METRICS_BIND") or metrics.DEFAULT_BIND)
    except ValueError as exc:
        log.error("metrics not served: PIPELINE_METRICS_BIND: %s", exc)
        return
    rt = Runtime(None)
    try:
        read_status(rt)
    except Exception as exc:  # down now is fine: the scrape reports it
        log.warning("metrics: first status read failed: %s", exc)
    try:
        metrics.serve(int(port), lambda: read_status(rt), bind=bind)
    except CannotRun as exc:  # port in use, or the address is not this machine's
        log.error("metrics not served: %s", exc)


def read_status(rt: Runtime, with_queues: bool = True):  # -> pipeline.status.Status
    from pipeline.status import collect

    with rt.store(migrate_sqlite=False).sessions() as session:
        return collect(rt.config, session, rt.redis(), with_queues=with_queues)


@beat_init.connect
def _one_beat_per_fleet(**_: object) -> None:
    """A bare `celery -A worker beat` waits for the fleet's scheduler lock before its first tick."""
    from pipeline.scheduler_lock import HELD_BY_PARENT_ENV, hold_for_this_beat

    if os.environ.get(HELD_BY_PARENT_ENV) == "1":
        return  # `pipeline run` holds the lock for the beat it started
    rt = runtime()
    hold_for_this_beat(rt.redis(), rt.config)
