"""Celery tasks (D9): thin wrappers that move journal ids between the plain stages.

Each module is one kind of work and one queue — `fetch` (I/O), `process` (CPU),
`maintenance` — with routes, time limits and the retry policy declared once, in
`pipeline.tasks.policy`. Tasks pass journal ids and mailbox names, never mail bodies
or ORM objects.
"""

from __future__ import annotations

from celery.signals import worker_process_init, worker_process_shutdown

from pipeline.runtime import Runtime

_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This worker process's configuration, store, Redis and processor (opened on first use)."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(None)  # $PIPELINE_CONFIG, else ./mailboxes.toml
    return _runtime


@worker_process_init.connect
def _fresh_after_fork(**_: object) -> None:
    # A forked child must not reuse its parent's database pool or Redis socket.
    global _runtime
    _runtime = None


@worker_process_shutdown.connect
def _close(**_: object) -> None:
    if _runtime is not None:
        _runtime.close()
