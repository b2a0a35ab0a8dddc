"""Exactly one scheduler (Celery beat) per fleet: a Redis lock with an expiry, renewed while held.

`pipeline run` takes it before it starts its beat; a bare `celery -A worker beat` takes it
itself before its first tick and waits while another holds it. A holder that dies stops
renewing, and another takes over within `SCHEDULER_LOCK_SECONDS`.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time

import redis
from redis.exceptions import LockError

from pipeline.config import Config

log = logging.getLogger("pipeline.scheduler")

SCHEDULER_LOCK_SECONDS = 30
RENEW_EVERY = 10
# Set by `pipeline run` for the beat it starts: the parent holds the lock for it.
HELD_BY_PARENT_ENV = "PIPELINE_SCHEDULER_LOCK_HELD"


class SchedulerLock:
    def __init__(self, client: redis.Redis, config: Config) -> None:
        self._lock = client.lock(f"{config.settings.redis.key_prefix}lock:scheduler",
                                 timeout=SCHEDULER_LOCK_SECONDS, blocking=False)

    def try_acquire(self) -> bool:
        return bool(self._lock.acquire())

    def renew(self) -> bool:
        """Push the expiry out again; False when the lock was lost (expired and taken)."""
        try:
            self._lock.reacquire()
            return True
        except LockError:
            return False

    def release(self) -> None:
        try:
            self._lock.release()
        except LockError:
            pass  # not held, or expired


def hold_for_this_beat(client: redis.Redis, config: Config) -> SchedulerLock:
    """Block until this process holds the lock, then renew it from a thread for as long as it lives.

    If the lock is ever lost (Redis was unreachable longer than the expiry and another beat
    took over) this beat stops itself, so that two never schedule at once.
    """
    lock = SchedulerLock(client, config)
    waiting_said = False
    while not lock.try_acquire():
        if not waiting_said:
            log.warning("another beat holds the fleet's scheduler lock; waiting to take over")
            waiting_said = True
        time.sleep(RENEW_EVERY / 2)
    log.info("this beat holds the fleet's scheduler lock")

    def renew() -> None:
        while True:
            time.sleep(RENEW_EVERY)
            try:
                held = lock.renew()
            except redis.RedisError as exc:
                log.warning("cannot renew the scheduler lock: %s", exc)
                continue  # it expires on its own if Redis stays away; checked again next turn
            if not held:
                log.error("lost the fleet's scheduler lock; stopping this beat")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=renew, name="scheduler-lock", daemon=True).start()
    atexit.register(lock.release)  # a beat stopped cleanly hands over at once, not after the expiry
    return lock
