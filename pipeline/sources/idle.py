"""The long-running IMAP fetcher of one mailbox: IDLE where the server offers it, polling otherwise.

It runs in `pipeline run` (a child process per mailbox) or `pipeline listen`, never in a
worker slot (D9). It holds the mailbox's fleet lock while connected, renewing it as it
goes, so only one machine fetches a mailbox at a time; a second one waits for the lock.
A dropped connection, a timeout or a restarting server is retried with exponential
backoff capped at `BACKOFF_MAX_SECONDS` (tenacity); a permanent failure (bad password,
expired token) is reported once, marks the mailbox failing in `pipeline status`, and is
tried again every `PERMANENT_RETRY_SECONDS` in case someone fixed it.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

import redis
from imapclient import IMAPClient
from redis.exceptions import LockError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from pipeline.config import Config, MailboxConfig
from pipeline.sources.base import (
    MailboxLock,
    PermanentSourceError,
    Sink,
    TransientSourceError,
    report_failure,
)
from pipeline.sources.imap import ImapState, classify, connect, fetch_pass, logout
from pipeline.status import record_fetch
from pipeline.store.db import Store

log = logging.getLogger("pipeline.sources.idle")

BACKOFF_MAX_SECONDS = 60
# A mailbox is marked failing once this many connection attempts in a row failed.
REPORT_AFTER_ATTEMPTS = 3
PERMANENT_RETRY_SECONDS = 300
# Servers and NAT boxes drop an IDLE that is silent for long (RFC 2177: re-issue within 29 min).
IDLE_RENEW_SECONDS = 300
# How often the IDLE wait looks at the stop flag and renews the lock.
TICK_SECONDS = 1.0
LOCK_WAIT_SECONDS = 5


class LostLock(Exception):
    """Another fetcher holds the mailbox now (our lock expired): stop fetching and wait."""


class IdleFetcher:
    def __init__(self, box: MailboxConfig, config: Config, store: Store, client: redis.Redis, sink: Sink,
                 stop: threading.Event) -> None:
        self.box = box
        self.config = config
        self.store = store
        self.redis = client
        self.stop = stop
        self.lock = MailboxLock(client, config, box.name)
        self.sink = Sink(sink.journal, sink.enqueue, keepalive=self._renew, journal_many=sink.journal_many)
        self.state = ImapState(client, config, box.name)

    # -- the outer loop: lock, connect, serve, and what to do when that fails -------------
    def run(self) -> None:
        log.info("mailbox %s: IMAP fetcher started for %s on %s", self.box.name, self.box.source.folder,
                 self.box.source.host)
        while not self.stop.is_set():
            if not self._take_lock():
                self.stop.wait(LOCK_WAIT_SECONDS)
                continue
            try:
                imap = self._connect_and_catch_up()
                if imap is not None:
                    try:
                        self._serve(imap)
                    finally:
                        logout(imap)
            except PermanentSourceError as exc:
                report_failure(self.redis, self.config, self.box.name, str(exc))
                self._release()
                self.stop.wait(PERMANENT_RETRY_SECONDS)
            except (TransientSourceError, redis.RedisError) as exc:
                log.warning("mailbox %s: %s; reconnecting", self.box.name, exc)
                self.stop.wait(1)
            except LostLock:
                log.warning("mailbox %s: the fetch lock passed to another fetcher; waiting", self.box.name)
            except Exception:  # a bug must not silently end this mailbox's fetching
                log.exception("mailbox %s: the IMAP fetcher failed; starting again in %ss", self.box.name,
                              BACKOFF_MAX_SECONDS)
                self._release()
                self.stop.wait(BACKOFF_MAX_SECONDS)
        self._release()
        log.info("mailbox %s: IMAP fetcher stopped", self.box.name)

    def _connect_and_catch_up(self) -> IMAPClient | None:
        """Connect and run a first pass, retrying transient trouble with capped backoff until stopped."""
        retrying = Retrying(retry=retry_if_exception_type(TransientSourceError),
                            wait=wait_exponential_jitter(multiplier=1, max=BACKOFF_MAX_SECONDS),
                            stop=lambda _: self.stop.is_set(), sleep=self._sleep_renewing,
                            before_sleep=self._before_sleep, reraise=True)
        for attempt in retrying:
            with attempt:
                imap = connect(self.box, self.config)
                try:
                    self._pass(imap)
                except BaseException:
                    logout(imap)
                    raise
                return imap
        return None

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if state.attempt_number >= REPORT_AFTER_ATTEMPTS:
            report_failure(self.redis, self.config, self.box.name,
                           f"{exc} ({state.attempt_number} attempts; retrying)")
        else:
            log.warning("mailbox %s: %s; retrying", self.box.name, exc)

    def _sleep_renewing(self, seconds: float) -> None:
        # Sleep in ticks so a stop is noticed and the lock stays ours while we back off.
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            self._renew()
            self.stop.wait(min(TICK_SECONDS, max(0.0, deadline - time.monotonic())))

    # -- connected ---------------------------------------------------------------------------
    def _serve(self, imap: IMAPClient) -> None:
        idle = bool(imap.has_capability("IDLE"))
        if not idle:
            log.info("mailbox %s: the server offers no IDLE; polling every %ss", self.box.name,
                     self.box.source.poll_seconds)
        while not self.stop.is_set():
            try:
                if idle:
                    self._idle(imap)
                else:
                    self._sleep_renewing(self.box.source.poll_seconds)
                if not self.stop.is_set():
                    self._pass(imap)
            except (PermanentSourceError, TransientSourceError, LostLock):
                raise
            except Exception as exc:  # classify() re-raises what is not a source error
                raise classify(exc, self.box) from None

    def _idle(self, imap: IMAPClient) -> None:
        """Wait in IDLE until the server announces mail, IDLE needs renewing, or we are stopped."""
        imap.idle()
        try:
            deadline = time.monotonic() + IDLE_RENEW_SECONDS
            while not self.stop.is_set() and time.monotonic() < deadline:
                responses = imap.idle_check(timeout=TICK_SECONDS)
                self._renew()
                if any(len(r) > 1 and r[1] in (b"EXISTS", b"RECENT") for r in responses):
                    return
        finally:
            imap.idle_done()

    def _pass(self, imap: IMAPClient) -> None:
        try:
            result = fetch_pass(imap, self.box, self.store, self.state, self.sink)
        except (LostLock, PermanentSourceError, TransientSourceError):
            raise
        except Exception as exc:  # classify() re-raises what is not a source error
            raise classify(exc, self.box) from None
        record_fetch(self.redis, self.config, self.box.name, datetime.now(UTC))
        if result.journaled or result.failed:
            log.info("mailbox %s: journaled %d, moved %d to %s%s", self.box.name, result.journaled,
                     result.failed, self.box.source.failed_folder, " (full scan)" if result.full_scan else "")

    # -- the fleet lock ----------------------------------------------------------------------
    def _take_lock(self) -> bool:
        try:
            return self.lock.acquire()
        except redis.RedisError as exc:
            log.warning("mailbox %s: Redis unreachable, cannot take the fetch lock: %s", self.box.name, exc)
            return False

    def _renew(self) -> None:
        try:
            self.lock.renew()
        except LockError:
            raise LostLock() from None

    def _release(self) -> None:
        self.lock.release()
