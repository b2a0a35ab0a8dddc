"""Running the pipeline on journaled mail: exactly one outcome per mail, committed with its effects.

`MailProcessor` is what every entry point uses — `ingest`, `import`, the demo and the
Celery process task: journal the raw mail first (D1.1), then run `PIPELINE` on it in one
transaction (a process task's batch shares one; a mail that fails is undone alone, by a
savepoint). A batch parses all its mails first and asks the store who their senders are,
whether it has seen them, and for their conversation locks, once for all of them
(`stages.AHEAD`, `stages.prefetch`); it writes the rows nobody needs the id of at the end, a
table at a time (`rows.append_later`). A stage that raises `StopMail` ends the mail with that
outcome; any other exception (a bug, a broken template) puts it in quarantine with the stage
and error, and the next mail goes on. Redis or the database being down is not the mail's
fault: it raises `Unavailable` and the mail stays journaled, unprocessed, for a retry.
"""

from __future__ import annotations

import logging
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from collections.abc import Callable, Iterable, Iterator
from typing import Sequence, TypeVar

import redis
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from pipeline import metrics
from pipeline.config import Config
from pipeline.context import MailContext, Result, StopMail, TraceStep
from pipeline.dedup.loop_guard import LoopGuard
from pipeline.errors import CannotRun
from pipeline.logs import mail_context, update_mail_context
from pipeline.notify.plan import rejection_notice, store_draft
from pipeline.stages import AHEAD, PIPELINE, Stage, StageEnv, prefetch
from pipeline.store.db import Store, changes
from pipeline.store.journal import is_import_ref, reopen_quarantined
from pipeline.store.locks import NO_WAIT, Busy
from pipeline.store.lookups import Lookups, forget
from pipeline.store.models import JournalEntry
from pipeline.store.new_contacts import discard_untaken
from pipeline.store.rows import flush_appended, highest_id, hold_back_appends, inserted_mark, mails_left, take_back

log = logging.getLogger("pipeline.process")

# Raw mail per batch transaction, at most (a single larger mail runs alone): what a worker holds
# in memory until the batch commits, twice over once the batch has parsed all its mails ahead.
BATCH_BYTES = 16 * 2**20

T = TypeVar("T")


def by_bytes(items: Iterable[T], size: Callable[[T], int], limit: int = BATCH_BYTES,
             count: int | None = None) -> Iterator[list[T]]:
    """Consecutive runs of `items` of at most `limit` bytes (and `count` items) together; a run
    has one item at least. Lazy: a run is handed on before the next item is taken."""
    run: list[T] = []
    held = 0
    for item in items:
        n = size(item)
        if run and (held + n > limit or (count is not None and len(run) >= count)):
            yield run
            run, held = [], 0
        run.append(item)
        held += n
    if run:
        yield run


# A pool with no connection free in time (the counters pool under a thread pool) is the database
# being busy, not the mail's fault: retried like a dropped connection.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, OperationalError, InterfaceError, PoolTimeout)


@dataclass
class _Ahead:
    """A mail of a batch after the store-free stages (`AHEAD`) ran on it with the others."""

    ctx: MailContext
    ran: int  # how many of them completed
    error: Exception | None = None  # what the next one raised, raised again in the mail's turn


class Unavailable(CannotRun):
    """Redis or the database is down; the mail stays journaled and is retried."""


@dataclass
class _Finished:
    """A mail's result, and what to count and log once its transaction has committed."""

    result: Result
    stage: str
    metrics: tuple
    message_id: str | None = None
    journal_row: dict | None = None  # the outcome's columns, written with the batch's others


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
        self.batch_bytes = BATCH_BYTES

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

    def journal_many(self, mailbox: str, mails: Sequence[tuple[bytes, str | None]],
                     received_at: datetime | None = None,
                     dates: Sequence[datetime | None] | None = None) -> list[int]:
        """Journal several raw mails (with their source references) in one commit; their ids in order.

        For a source that hands over a batch (a fetch): one commit instead of one per mail.
        `dates`, one per mail, are their own received times (a backlog's Date: headers); a
        mail without one takes `received_at`, else now.
        """
        self.config.mailbox(mailbox)
        at = received_at or datetime.now(timezone.utc)
        if not mails:
            return []
        own = list(dates) if dates is not None else [None] * len(mails)
        try:
            with self.store.transaction() as session:
                rows = [{"mailbox": mailbox, "raw": raw, "source_ref": ref, "received_at": date or at}
                        for (raw, ref), date in zip(mails, own, strict=True)]
                conn = session.connection()
                if conn.dialect.name == "sqlite":
                    # The ids past the highest are this transaction's (BEGIN IMMEDIATE holds the write
                    # lock): one executemany, where returning the ids in order takes a statement a row.
                    top = highest_id(conn, JournalEntry.__table__)
                    ids = list(range(top + 1, top + 1 + len(rows)))
                    conn.execute(insert(JournalEntry.__table__), [dict(row, id=i) for row, i in zip(rows, ids)])
                    return ids
                # One Core executemany (insertmanyvalues): the unit of work cost more than the inserts.
                return list(conn.execute(_JOURNAL, rows).scalars())
        except TRANSIENT as exc:
            raise Unavailable(f"cannot journal {len(mails)} mail(s): {_one_line(exc)}") from None

    def ingest(self, mailbox: str, raw: bytes, received_at: datetime | None = None,
               source_ref: str | None = None) -> Result:
        return self.process(self.journal(mailbox, raw, received_at, source_ref))

    def ingest_many(self, mailbox: str, mails: Sequence[tuple[bytes, str | None, datetime | None]]) -> list[Result]:
        """`ingest` for several mails (raw, source reference, received time or None for now): one
        journal commit, then one batch — a result per mail, in order, as one by one would give."""
        ids = self.journal_many(mailbox, [(raw, ref) for raw, ref, _ in mails], dates=[at for _, _, at in mails])
        return self.process_many(ids)

    # -- process --------------------------------------------------------------------------
    def process(self, journal_id: int) -> Result:
        """Run the pipeline on a journaled mail; running it again returns the same result."""
        return self.process_many([journal_id])[0]

    def process_many(self, journal_ids: Sequence[int]) -> list[Result]:
        """Run the pipeline on several journaled mails in one transaction; a result per id.

        One mail's failure (quarantine) or conflict rolls back only that mail: the batch runs
        again with a savepoint per mail (`_transaction`). A mail that needs a lock another
        transaction holds is not waited for inside the batch (two batches waiting on each other would
        deadlock): it is processed alone after the batch has committed, as is a mail whose
        write collided with a concurrent writer's. One commit for the batch instead of one
        per mail is most of why batches are faster (bench/README.md).
        """
        results: dict[int, Result] = {}
        later: dict[int, BaseException | None] = {}
        for group in self._by_size(list(dict.fromkeys(journal_ids))):
            if len(group) > 1:
                later.update(self._transaction(group, results, batch=True))
            else:
                later[group[0]] = None
        for journal_id in later:
            results[journal_id] = self._alone(journal_id)
        return [results[i] for i in journal_ids]

    def _by_size(self, journal_ids: list[int]) -> list[list[int]]:
        """The ids in groups of at most `batch_bytes` of raw mail (a group has one mail at least):
        a transaction holds its mails and their attachments in memory until it commits."""
        if len(journal_ids) < 2:
            return [journal_ids]
        try:
            with self.store.sessions() as session:
                sizes = dict(session.execute(select(JournalEntry.id, func.length(JournalEntry.raw))
                                             .where(JournalEntry.id.in_(journal_ids))).all())
        except TRANSIENT as exc:
            raise Unavailable(f"mail #{journal_ids[0]} and others stay journaled for a retry: "
                              f"{_one_line(exc)}") from None
        return list(by_bytes(journal_ids, lambda i: sizes.get(i) or 0, self.batch_bytes))

    def _alone(self, journal_id: int) -> Result:
        """One mail in its own transaction, waiting for locks; a write conflict is retried twice."""
        conflict: BaseException | None = None
        for _attempt in range(3):
            results: dict[int, Result] = {}
            conflict = self._transaction([journal_id], results, batch=False).get(journal_id)
            if journal_id in results:
                return results[journal_id]
        return self._quarantine(journal_id, "write", conflict or RuntimeError("write conflict"), [])

    def _transaction(self, journal_ids: list[int], results: dict[int, Result], *,
                     batch: bool) -> dict[int, BaseException | None]:
        """Process these ids in one transaction; returns the ids to run again alone (and why).

        The first attempt gives the mails no savepoints: SAVEPOINT and RELEASE are two of a
        mail's fifteen statements, and almost every mail succeeds (bench/README.md, issue 10).
        When a mail fails, or conflicts after it has changed something, that attempt is rolled
        back whole and the ids run again with a savepoint each, which undoes only that mail.
        """
        try:
            return self._attempt(journal_ids, results, batch=batch, savepoints=False)
        except _Redo:
            for journal_id in journal_ids:
                results.pop(journal_id, None)
            return self._attempt(journal_ids, results, batch=batch, savepoints=True)

    def _attempt(self, journal_ids: list[int], results: dict[int, Result], *, batch: bool,
                 savepoints: bool) -> dict[int, BaseException | None]:
        later: dict[int, BaseException | None] = {}
        finished: list[_Finished] = []
        env: StageEnv | None = None
        try:
            with self.store.sessions() as session, session.begin():
                session.info[NO_WAIT] = batch
                if batch and not savepoints:
                    hold_back_appends(session)  # a table's rows in one statement for the batch
                # The row locks make a second worker handed the same ids wait, then see the outcomes.
                entries = {e.id: e for e in session.scalars(
                    select(JournalEntry).where(JournalEntry.id.in_(journal_ids))
                    .order_by(JournalEntry.id).with_for_update())}
                env = StageEnv(session, Lookups(session), self.loop_guard)
                ahead = self._run_ahead(env, [entries[i] for i in journal_ids
                                              if i in entries and entries[i].outcome is None]) if batch else {}
                ids = journal_ids
                for last in ([False, True] if batch else [True]):
                    for index, journal_id in enumerate(ids):
                        mails_left(session, len(ids) - index)
                        entry = entries.get(journal_id)
                        with mail_context(journal_id=journal_id):
                            if entry is None:
                                results[journal_id] = Result("quarantined", None,
                                                             f"no journal entry #{journal_id}", [], journal_id)
                            elif entry.outcome is not None:
                                results[journal_id] = _stored_result(entry)
                            else:
                                done = self._one(session, env, entry, later, savepoints, ahead.pop(journal_id, None))
                                if done is not None:
                                    results[journal_id] = done.result
                                    finished.append(done)
                    if not last:
                        # A second pass for mails whose lock was busy: by the end of the batch the other
                        # transaction has often committed (the batches of an alert storm share keys).
                        ids = [i for i, why in later.items() if isinstance(why, Busy)]
                        for journal_id in ids:
                            del later[journal_id]
                try:
                    discard_untaken(session)
                    flush_appended(session)
                except TRANSIENT:
                    raise
                except DBAPIError as exc:
                    # A held-back row refused (a concurrent worker's copy of a mail, a trigger), a contact
                    # written ahead still referred to: only a savepoint per mail, which writes at once,
                    # tells whose it is.
                    raise _Redo from exc
                outcomes = [done.journal_row for done in finished if done.journal_row]
                if outcomes:
                    session.connection().execute(_RECORD_OUTCOME, outcomes)
        except TRANSIENT as exc:
            for done in finished:
                results.pop(done.result.journal_id, None)  # type: ignore[arg-type]
            raise Unavailable(f"mail #{journal_ids[0]}{' and others' if len(journal_ids) > 1 else ''} "
                              f"stay(s) journaled for a retry: {_one_line(exc)}") from None
        finally:
            if env is not None and env.asked_ahead is not None:
                env.asked_ahead.forget_unused()  # what mails that never reached the gate counted
        # Committed: only now are the outcomes facts worth counting.
        for done in finished:
            metrics.mail_done(*done.metrics)
            r = done.result
            with mail_context(journal_id=r.journal_id, mailbox=done.metrics[0], stage=done.stage,
                              message_id=done.message_id):
                log.info("mail #%s: %s after stage %s%s", r.journal_id, r.outcome, done.stage,
                         f" ({r.reason})" if r.reason else "")
        return later

    def _context(self, entry: JournalEntry) -> MailContext:
        return MailContext(config=self.config, mailbox=self.config.mailbox(entry.mailbox), raw=entry.raw,
                           received_at=_aware(entry.received_at), journal_id=entry.id)

    def _run_ahead(self, env: StageEnv, entries: list[JournalEntry]) -> dict[int, _Ahead]:
        """Run the store-free stages on every mail of a batch, then prefetch the batch's reads.

        What a stage raises here is kept and raised again in the mail's turn, so the mail
        ends exactly as it would have alone (quarantined at the same stage, say).
        """
        ahead: dict[int, _Ahead] = {}
        for entry in entries:
            state = ahead[entry.id] = _Ahead(self._context(entry), 0)
            with mail_context(journal_id=entry.id, mailbox=state.ctx.mailbox.name):
                for stage in AHEAD:
                    try:
                        _run_stage(stage, state.ctx, env)
                    except Exception as exc:
                        state.error = exc
                        break
                    state.ran += 1
        prefetch([a.ctx for a in ahead.values()], env)
        return ahead

    def _one(self, session: Session, env: StageEnv, entry: JournalEntry,
             later: dict[int, BaseException | None], savepoint: bool, ahead: _Ahead | None = None) -> _Finished | None:
        """Run the stages on one mail (in a savepoint if asked); None when it must run again alone.

        `ahead`: the mail's state after the batch ran the store-free stages on all its mails.
        Without a savepoint, a failure after the mail changed something raises `_Redo`: nothing
        but the whole transaction can take back what it wrote. A mail that fails, or finds a
        lock busy, before it changed anything needs nothing taken back.
        """
        ctx = ahead.ctx if ahead is not None else self._context(entry)
        box = ctx.mailbox
        update_mail_context(mailbox=box.name)
        stage_name = "journal"
        changes_before = None if savepoint else changes(session)
        inserted = inserted_mark(session)
        try:
            # A savepoint is rolled back on any exception, with what the mail created.
            with session.begin_nested() if savepoint else nullcontext():
                try:
                    for index, stage in enumerate(PIPELINE):
                        stage_name = stage.name
                        update_mail_context(stage=stage_name)
                        if ahead is not None and index < ahead.ran:
                            pass  # ran ahead, with the batch's other mails
                        elif ahead is not None and index == ahead.ran and ahead.error is not None:
                            raise ahead.error
                        else:
                            _run_stage(stage, ctx, env)
                        if ctx.mail is not None and stage_name == "parse":
                            update_mail_context(message_id=ctx.mail.message_id)
                    outcome, reason = ctx.outcome, None
                except StopMail as stop:
                    outcome, reason = stop.outcome, stop.reason
                    if outcome == "rejected":
                        notice = rejection_notice(ctx)
                        if notice:
                            store_draft(session, notice, ctx)
                session.flush()
                journal_row = _record_outcome(entry, ctx, outcome, reason,
                                              failed_stage=stage_name if outcome == "quarantined" else None)
        except (Busy, IntegrityError) as exc:
            # Busy: a lock another transaction holds. IntegrityError: a concurrent writer created
            # the same row (a contact, this mail's identity); the second run finds it.
            if changes_before is not None and (isinstance(exc, IntegrityError)
                                               or _changed(session, changes_before)):
                raise _Redo from exc
            if savepoint:  # else the mail changed nothing, and the batch's cache stays right
                forget(session)  # the cache may hold rows the savepoint created
            take_back(session, inserted)
            later[entry.id] = exc
            return None
        except TRANSIENT:
            raise
        except Exception as exc:  # a bug or bad data in one mail must not stop the others
            # Without a savepoint, only a mail that has changed nothing can be quarantined in place;
            # a database error may have aborted the transaction on PostgreSQL, so it redoes too.
            if changes_before is not None and (isinstance(exc, DBAPIError) or _changed(session, changes_before)):
                raise _Redo from exc
            log.exception("mail #%s failed in stage %s", entry.id, stage_name)
            forget(session)
            take_back(session, inserted)
            return self._quarantine_entry(session, entry, stage_name, exc, ctx.trace)
        result = _result(ctx, outcome, reason, entry.id)
        return _Finished(result, stage_name,
                         (box.name, outcome, reason, ctx.received_at, entry.processed_at, _imported(entry)),
                         ctx.mail.message_id if ctx.mail else None, journal_row)

    def _quarantine_entry(self, session: Session, entry: JournalEntry, stage: str, exc: BaseException,
                          trace: list[TraceStep]) -> _Finished:
        """Quarantine a mail of this transaction (its savepoint rolled back)."""
        values, trace = _quarantined(stage, exc, trace)
        for column, value in values.items():
            setattr(entry, column, value)
        session.flush()
        return _Finished(Result("quarantined", None, entry.reason, trace, entry.id), stage,
                         (entry.mailbox, "quarantined", entry.reason, _aware(entry.received_at), entry.processed_at,
                          _imported(entry)))

    def _quarantine(self, journal_id: int, stage: str, exc: BaseException, trace: list[TraceStep]) -> Result:
        """Quarantine a mail in a transaction of its own (unless it has an outcome meanwhile)."""
        values, trace = _quarantined(stage, exc, trace)
        with self.store.transaction() as session:
            row = session.execute(
                update(JournalEntry).where(JournalEntry.id == journal_id, JournalEntry.outcome.is_(None))
                .values(**values).returning(JournalEntry.mailbox, JournalEntry.received_at, JournalEntry.source_ref)
            ).first()
        if row is not None:
            metrics.mail_done(row.mailbox, "quarantined", values["reason"], _aware(row.received_at),
                              values["processed_at"], is_import_ref(row.source_ref))
        return Result("quarantined", None, values["reason"], trace, journal_id)

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


def _run_stage(stage: Stage, ctx: MailContext, env: StageEnv) -> None:
    started = time.perf_counter()
    try:
        stage(ctx, env)
    finally:
        metrics.stage_seconds(stage.name).observe(time.perf_counter() - started)


class _Redo(Exception):
    """A mail without a savepoint failed: roll the transaction back, run it again with savepoints."""


def _changed(session: Session, changes_before: int) -> bool:
    """Has this transaction changed rows, or objects not yet flushed, since `changes_before`?"""
    return changes(session) != changes_before or bool(session.new or session.dirty or session.deleted)


def _quarantined(stage: str, exc: BaseException, trace: list[TraceStep]) -> tuple[dict, list[TraceStep]]:
    """The journal columns of a mail quarantined by `exc` in `stage`, and its trace ending in the error."""
    reason = f"stage {stage} failed: {type(exc).__name__}: {_one_line(exc)}"
    trace = list(trace) + [TraceStep(stage, "error", reason)]
    return {"outcome": "quarantined", "reason": reason, "failed_stage": stage,
            "error": "".join(traceback.format_exception(exc))[-4000:],
            "trace": [t.as_json() for t in trace], "processed_at": datetime.now(timezone.utc)}, trace


def _record_outcome(entry: JournalEntry, ctx: MailContext, outcome: str, reason: str | None,
                    failed_stage: str | None = None) -> dict:
    """The mail's outcome for its journal row; the transaction writes it with its other mails' outcomes.

    One Core executemany for the batch (the unit of work costs more than the statement, and
    the statement a round trip per mail, bench/README.md). Until then the values are only on
    the loaded row, told them as committed (so the ORM writes nothing twice): code that reads a
    journal row inside a batch reads it through the session (`session.get`), never by a SELECT
    of its columns, as `resolve_back.outbox.latest_alert_mail` does.
    """
    values = {"outcome": outcome, "reason": reason, "failed_stage": failed_stage,
              "trace": [t.as_json() for t in ctx.trace], "processed_at": datetime.now(timezone.utc),
              "message_id": entry.message_id, "identity": entry.identity,
              "entity_type": entry.entity_type, "entity_number": entry.entity_number}
    if ctx.mail is not None:
        values["message_id"] = (ctx.mail.message_id or "")[:998] or None
        values["identity"] = ctx.identity
    if ctx.entity and outcome in ("ticket_created", "note_added"):
        values["entity_type"] = ctx.entity["type"]
        values["entity_number"] = ctx.entity["number"]
    for column, value in values.items():
        set_committed_value(entry, column, value)
    return {"journal_id": entry.id, **values}


_JOURNAL = (insert(JournalEntry.__table__)  # type: ignore[arg-type]
            .returning(JournalEntry.__table__.c.id, sort_by_parameter_order=True))
_RECORD_OUTCOME = update(JournalEntry.__table__).where(JournalEntry.__table__.c.id == bindparam("journal_id"))


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
