"""Running the pipeline for one journaled mail: one transaction, exactly one outcome.

`MailProcessor` is what every entry point uses — `ingest`, `import`, the demo and the
Celery process task: journal the raw mail first (D1.1), then run `PIPELINE` on it in one
transaction. A stage that raises `StopMail` ends the mail with that outcome; any other
exception (a bug, a broken template) puts it in quarantine with the stage and error, and
the next mail goes on. Redis or the database being down is not the mail's fault: it
raises `Unavailable` and the mail stays journaled, unprocessed, for a retry.
"""

from __future__ import annotations

import logging
import time
import traceback
from datetime import datetime, timezone

import redis
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from pipeline import metrics
from pipeline.config import Config
from pipeline.context import MailContext, Result, StopMail, TraceStep
from pipeline.dedup.loop_guard import LoopGuard
from pipeline.errors import CannotRun
from pipeline.logs import mail_context, update_mail_context
from pipeline.notify.plan import rejection_notice, store_draft
from pipeline.stages import PIPELINE, StageEnv
from pipeline.store.db import Store
from pipeline.store.journal import is_import_ref, reopen_quarantined
from pipeline.store.lookups import Lookups
from pipeline.store.models import JournalEntry

log = logging.getLogger("pipeline.process")

TRANSIENT = (redis.ConnectionError, redis.TimeoutError, OperationalError, InterfaceError)


class Unavailable(CannotRun):
    """Redis or the database is down; the mail stays journaled and is retried."""


class _Conflict(Exception):
    """A concurrent writer created the same row (a contact, an account); run the mail again."""


def connect_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)


def check_redis(client: redis.Redis, url: str) -> None:
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise CannotRun(
            f"Redis at {url} is unreachable ({exc}); start one with "
            "`redis-server --daemonize yes` or point REDIS_URL at a running server"
        ) from None


class MailProcessor:
    def __init__(self, config: Config, store: Store, redis_client: redis.Redis) -> None:
        self.config = config
        self.store = store
        self.redis = redis_client
        self.loop_guard = LoopGuard(redis_client, config.settings.redis.key_prefix)

    # -- journal --------------------------------------------------------------------------
    def journal(self, mailbox: str, raw: bytes, received_at: datetime | None = None,
                source_ref: str | None = None) -> int:
        """Write the raw mail to the journal and commit: from here on, nothing is lost."""
        self.config.mailbox(mailbox)  # refuse unknown mailboxes before writing
        try:
            with self.store.transaction() as session:
                entry = JournalEntry(mailbox=mailbox, raw=raw, source_ref=source_ref,
                                     received_at=received_at or datetime.now(timezone.utc))
                session.add(entry)
                session.flush()
                return entry.id
        except TRANSIENT as exc:
            raise Unavailable(f"cannot journal the mail: {_one_line(exc)}") from None

    def ingest(self, mailbox: str, raw: bytes, received_at: datetime | None = None,
               source_ref: str | None = None) -> Result:
        return self.process(self.journal(mailbox, raw, received_at, source_ref))

    # -- process --------------------------------------------------------------------------
    def process(self, journal_id: int) -> Result:
        """Run the pipeline on a journaled mail; running it again returns the same result."""
        try:
            for attempt in Retrying(stop=stop_after_attempt(3), retry=retry_if_exception_type(_Conflict),
                                    reraise=True):
                with attempt:
                    return self._process_once(journal_id)
        except TRANSIENT as exc:
            raise Unavailable(f"mail #{journal_id} stays journaled for a retry: {_one_line(exc)}") from None
        except _Conflict as exc:
            return self._quarantine(journal_id, "write", exc, [])
        raise AssertionError("unreachable")

    def _process_once(self, journal_id: int) -> Result:
        with mail_context(journal_id=journal_id):
            return self._process_in_context(journal_id)

    def _process_in_context(self, journal_id: int) -> Result:
        ctx: MailContext | None = None
        stage_name = "journal"
        with self.store.sessions() as session:
            try:
                with session.begin():
                    # The row lock makes a second worker handed the same id wait, then see the outcome.
                    entry = session.scalar(
                        select(JournalEntry).where(JournalEntry.id == journal_id).with_for_update()
                    )
                    if entry is None:
                        raise LookupError(f"no journal entry #{journal_id}")
                    if entry.outcome is not None:
                        return _stored_result(entry)
                    box = self.config.mailbox(entry.mailbox)
                    ctx = MailContext(config=self.config, mailbox=box, raw=entry.raw,
                                      received_at=_aware(entry.received_at), journal_id=journal_id)
                    env = StageEnv(session, Lookups(session), self.loop_guard)
                    update_mail_context(mailbox=box.name)
                    try:
                        for stage in PIPELINE:
                            stage_name = stage.name
                            update_mail_context(stage=stage_name)
                            started = time.perf_counter()
                            try:
                                stage(ctx, env)
                            finally:
                                metrics.STAGE_SECONDS.labels(stage_name).observe(time.perf_counter() - started)
                            if ctx.mail is not None and stage_name == "parse":
                                update_mail_context(message_id=ctx.mail.message_id)
                        outcome, reason = ctx.outcome, None
                    except StopMail as stop:
                        outcome, reason = stop.outcome, stop.reason
                        if outcome == "rejected":
                            notice = rejection_notice(ctx)
                            if notice:
                                store_draft(session, notice, ctx)
                    _finish(entry, ctx, outcome, reason, failed_stage=stage_name if outcome == "quarantined" else None)
                    session.flush()
                    result = _result(ctx, outcome, reason, journal_id)
                    done = (box.name, outcome, reason, ctx.received_at, entry.processed_at, _imported(entry))
                # Committed: only now is the outcome a fact worth counting.
                metrics.mail_done(*done)
                log.info("mail #%s: %s after stage %s%s", journal_id, outcome, stage_name,
                         f" ({reason})" if reason else "")
                return result
            except IntegrityError as exc:
                if ctx is not None and ctx.identity:
                    other = self._processed_by(ctx.identity, journal_id)
                    if other is not None:
                        return self._record(journal_id, ctx, "already_processed",
                                            f"same mail as journal #{other} (processed concurrently)")
                raise _Conflict(_one_line(exc)) from None
            except TRANSIENT:
                raise
            except Exception as exc:  # a bug or bad data in one mail must not stop the others
                log.exception("mail #%s failed in stage %s", journal_id, stage_name)
                return self._quarantine(journal_id, stage_name, exc, ctx.trace if ctx else [])

    def _processed_by(self, identity: str, journal_id: int) -> int | None:
        with self.store.sessions() as session:
            other = Lookups(session).processed_by(identity)
        return other if other != journal_id else None

    def _record(self, journal_id: int, ctx: MailContext, outcome: str, reason: str) -> Result:
        ctx.note("already_processed", "already processed", reason)
        with self.store.transaction() as session:
            entry = session.get(JournalEntry, journal_id)
            _finish(entry, ctx, outcome, reason)
            done = (entry.mailbox, outcome, reason, ctx.received_at, entry.processed_at, _imported(entry))
        metrics.mail_done(*done)
        return _result(ctx, outcome, reason, journal_id)

    def _quarantine(self, journal_id: int, stage: str, exc: BaseException, trace: list[TraceStep]) -> Result:
        reason = f"stage {stage} failed: {type(exc).__name__}: {_one_line(exc)}"
        trace = list(trace) + [TraceStep(stage, "error", reason)]
        now = datetime.now(timezone.utc)
        with self.store.transaction() as session:
            row = session.execute(
                update(JournalEntry).where(JournalEntry.id == journal_id, JournalEntry.outcome.is_(None)).values(
                    outcome="quarantined", reason=reason, failed_stage=stage,
                    error="".join(traceback.format_exception(exc))[-4000:],
                    trace=[t.as_json() for t in trace], processed_at=now,
                ).returning(JournalEntry.mailbox, JournalEntry.received_at, JournalEntry.source_ref)
            ).first()
        if row is not None:
            metrics.mail_done(row.mailbox, "quarantined", reason, _aware(row.received_at), now,
                              is_import_ref(row.source_ref))
        return Result("quarantined", None, reason, trace, journal_id)

    def replay(self, journal_id: int) -> Result | None:
        """Process a quarantined mail again; None when it is not (or no longer) in quarantine."""
        try:
            with self.store.transaction() as session:
                if not reopen_quarantined(session, journal_id):
                    return None
        except TRANSIENT as exc:
            raise Unavailable(_one_line(exc)) from None
        log.info("mail #%s: replaying from quarantine", journal_id)
        return self.process(journal_id)

    # -- dry run --------------------------------------------------------------------------
    def dry_run(self, mailbox: str, raw: bytes) -> Result:
        """Every stage's decision and why; nothing is written to the store or to Redis."""
        box = self.config.mailbox(mailbox)
        ctx = MailContext(config=self.config, mailbox=box, raw=raw, received_at=datetime.now(timezone.utc),
                          dry_run=True)
        try:
            with self.store.sessions() as session, session.begin():
                env = StageEnv(session, Lookups(session), self.loop_guard)
                try:
                    for stage in PIPELINE:
                        stage(ctx, env)
                    outcome, reason = ctx.outcome, None
                except StopMail as stop:
                    outcome, reason = stop.outcome, stop.reason
                session.rollback()
        except TRANSIENT as exc:
            raise Unavailable(_one_line(exc)) from None
        return _result(ctx, outcome, reason, None)


def _finish(entry: JournalEntry, ctx: MailContext, outcome: str, reason: str | None,
            failed_stage: str | None = None) -> None:
    entry.outcome = outcome
    entry.reason = reason
    entry.failed_stage = failed_stage
    entry.trace = [t.as_json() for t in ctx.trace]
    entry.processed_at = datetime.now(timezone.utc)
    if ctx.mail is not None:
        entry.message_id = (ctx.mail.message_id or "")[:998] or None
        entry.identity = ctx.identity
    if ctx.entity and outcome in ("ticket_created", "note_added"):
        entry.entity_type = ctx.entity["type"]
        entry.entity_number = ctx.entity["number"]


def _result(ctx: MailContext, outcome: str, reason: str | None, journal_id: int | None) -> Result:
    entity = ctx.entity if outcome in ("ticket_created", "note_added") else None
    return Result(outcome, entity, reason, list(ctx.trace), journal_id)  # type: ignore[arg-type]


def _stored_result(entry: JournalEntry) -> Result:
    entity = {"type": entry.entity_type, "number": entry.entity_number} if entry.entity_number else None
    trace = [TraceStep(t["stage"], t["decision"], t["why"]) for t in entry.trace or []]
    return Result(entry.outcome, entity, entry.reason, trace, entry.id)  # type: ignore[arg-type]


def _imported(entry: JournalEntry) -> bool:
    return is_import_ref(entry.source_ref)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
