"""What every fetching source shares: error kinds, the journal's memory of source references,
the per-mailbox fleet lock, and reporting a failing mailbox once.

A source journals a mail (D1.1) and only then tells the server it may forget it. The
journal's `source_ref` (`imap:<mailbox>:<uidvalidity>:<uid>`, `pop3:<mailbox>:<uidl>`,
`maildir:<name>`) is how a fetch after a crash recognises mail it journaled but could not
move or delete: it only finishes the move.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import redis
from redis.exceptions import LockError
from sqlalchemy import select

from pipeline.config import Config
from pipeline.process import Unavailable, by_bytes
from pipeline.status import failing_key, record_fetch_failure
from pipeline.store.db import Store
from pipeline.store.models import JournalEntry

log = logging.getLogger("pipeline.sources")

# A fetcher holds its mailbox's lock this long past its last sign of life, and renews it
# with every mail: one that is killed blocks the mailbox for at most this long.
LOCK_SECONDS = 30
LOCK_RENEW_SECONDS = 10  # renewing costs a round trip to Redis: not for every mail

T = TypeVar("T")


class SourceError(Exception):
    """A source cannot be read right now; the message is one line for an operator."""


class PermanentSourceError(SourceError):
    """Retrying will not help until someone acts: bad credentials, an expired token, a missing
    secret, a certificate that does not verify, a folder that does not exist."""


class TransientSourceError(SourceError):
    """A dropped connection, a timeout, throttling, a server restarting: retried with backoff."""


@dataclass
class Sink:
    """Where a source hands its mail: the journal, then processing, with a sign of life per mail."""

    journal: Callable[..., int]  # MailProcessor.journal(mailbox, raw, source_ref=…) -> journal id
    enqueue: Callable[[list[int]], None]  # hand journaled ids to processing
    keepalive: Callable[[], None] = field(default=lambda: None)  # renews the mailbox lock
    # MailProcessor.journal_many(mailbox, [(raw, source_ref), …]) -> journal ids: a fetched batch
    # in one commit. Without it, `journal_each` journals one mail a commit.
    journal_many: Callable[[str, Sequence[tuple[bytes, str | None]]], list[int]] | None = None

    def journal_each(self, mailbox: str, mails: Sequence[tuple[bytes, str]]) -> list[int | Exception]:
        """Journal a fetched batch: for each mail its journal id, or what the store refused it with.

        One commit for the batch: a commit a mail cost a fetch about 1 ms of CPU a mail
        (bench/README.md, issue 10). Should the store refuse the batch, it is journaled again
        one mail a commit, so that one mail it refuses does not hold back the others.
        `Unavailable` (the store is down) propagates: nothing of the batch may be let go.
        """
        done: list[int | Exception] = []
        # Split where big mails would make one statement too large to send (and to hold).
        for run in by_bytes(mails, lambda mail: len(mail[0])):
            done += self._journal_run(mailbox, run)
        return done

    def _journal_run(self, mailbox: str, mails: Sequence[tuple[bytes, str]]) -> list[int | Exception]:
        if self.journal_many is not None and len(mails) > 1:
            try:
                return list(self.journal_many(mailbox, mails))
            except Unavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - told apart below, one mail at a time
                log.warning("mailbox %s: a batch of %d mails was refused (%s: %s); journaling them one by one",
                            mailbox, len(mails), type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        done: list[int | Exception] = []
        for raw, ref in mails:
            try:
                done.append(self.journal(mailbox, raw, source_ref=ref))
            except Unavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - the caller deals with this mail alone
                done.append(exc)
            self.keepalive()
        return done


def known_refs(store: Store, mailbox: str, refs: Sequence[str]) -> dict[str, int]:
    """Journal ids of the references already journaled for this mailbox."""
    if not refs:
        return {}
    with store.sessions() as session:
        rows = session.execute(select(JournalEntry.source_ref, JournalEntry.id)
                               .where(JournalEntry.mailbox == mailbox, JournalEntry.source_ref.in_(list(refs))))
        return {ref: journal_id for ref, journal_id in rows}


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def report_failure(client: redis.Redis, config: Config, mailbox: str, why: str) -> None:
    """Mark the mailbox failing in `pipeline status`; log at ERROR only when the reason is new,
    so a mailbox whose password expired says so once, not every minute."""
    try:
        previous = client.hget(failing_key(config), mailbox)
        record_fetch_failure(client, config, mailbox, why)
    except redis.RedisError:  # Redis down too: the log line is all that is left
        previous = None
    if previous is not None and previous.decode(errors="replace") == why[:500]:
        log.info("mailbox %s: still failing: %s", mailbox, why)
    else:
        log.error("mailbox %s: %s", mailbox, why)


def lock_key(config: Config, mailbox: str) -> str:
    return f"{config.settings.redis.key_prefix}lock:fetch:{mailbox}"


class MailboxLock:
    """One fetcher per mailbox across the fleet: a Redis lock that expires unless renewed."""

    def __init__(self, client: redis.Redis, config: Config, mailbox: str) -> None:
        self.mailbox = mailbox
        self.lock = client.lock(lock_key(config, mailbox), timeout=LOCK_SECONDS, blocking=False)
        self.held = False
        self.renewed = 0.0

    def acquire(self) -> bool:
        self.held = bool(self.lock.acquire())
        self.renewed = time.monotonic()
        return self.held

    def renew(self) -> None:
        """Push the expiry out again (at most every LOCK_RENEW_SECONDS); raises LockError when
        the lock expired and another fetcher may have taken it over."""
        if time.monotonic() - self.renewed < LOCK_RENEW_SECONDS:
            return
        try:
            self.lock.reacquire()
        except LockError:
            self.held = False
            raise
        self.renewed = time.monotonic()

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            self.lock.release()
        except LockError:  # it expired: the journal's source_ref keeps a second fetcher safe
            log.warning("mailbox %s: fetch lock expired before the fetch ended", self.mailbox)
        except redis.RedisError as exc:
            log.warning("mailbox %s: could not release the fetch lock (%s); it expires by itself",
                        self.mailbox, exc)


def unique(items: Iterable[T]) -> list[T]:
    return list(dict.fromkeys(items))
