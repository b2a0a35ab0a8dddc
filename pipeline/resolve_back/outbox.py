"""The resolve-back outbox: a row written with the completion, claimed under a lease, its outcome recorded.

As for notifications (pipeline/notify/send.py): the row is written in the transaction that
completes the ticket, so a call is never made for a change that was rolled back, and never
lost for one that was committed. It is claimed atomically (`pending` → `calling`, with a
lease) before the call, so two workers never both make it; a worker killed mid-call leaves
it `calling` until the lease runs out, and the sweep hands it out again. Delivery is
therefore at least once: only a kill between the RMM's answer and our commit calls twice.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session, load_only

from pipeline.store import leases
from pipeline.store.db import Store
from pipeline.store.models import JournalEntry, ResolveBackCall, Ticket, TimelineEntry
from pipeline.store.rows import append

log = logging.getLogger("pipeline.resolve_back")

# The statuses that complete a ticket: a move into one of them from an open status is told back.
COMPLETED = ("Resolved", "Closed")
# After a transient failure the sweep tries again after 30 s, 60 s, … at most an hour apart.
BACKOFF_BASE_SECONDS = 30
BACKOFF_MAX_SECONDS = 3600
# How far back in a ticket's timeline the latest alert mail is looked for.
ALERT_MAIL_LOOKBACK = 50
# Who the timeline names for the outcome of a call.
WHO = "system"
# The ids written in a session, enqueued once it commits (see `_enqueue_after_commit`).
_AFTER_COMMIT = "mailloop.resolve_back.ids"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def vendor_of(alert_key: str) -> str:
    """The RMM stage that claimed an alert: the first part of its key (`AlertRecord.key`, vendor:device:alert)."""
    return alert_key.split(":", 1)[0]


# -- written with the completion (called by pipeline.lifecycle.apply_move) ------------------------

def record_completion(session: Session, ticket: Ticket, configured: frozenset[str], *, resolution: str,
                      journal_id: int | None) -> ResolveBackCall | None:
    """Write the call for an alert ticket just completed, when its mailbox configures one for its vendor.

    Runs in the caller's transaction, right after the status change; the caller decides that
    the move completes the ticket and that it was not the monitor's own recovery.
    """
    if not ticket.alert_key:
        return None
    vendor = vendor_of(ticket.alert_key)
    if vendor not in configured:
        return None
    row = ResolveBackCall(
        ticket_id=ticket.id, mailbox=ticket.source_mailbox or "", vendor=vendor, journal_id=journal_id,
        alert_journal_id=latest_alert_mail(session, ticket.id, vendor),
        ticket_values=_ticket_values(ticket, resolution), status="pending", attempts=0,
    )
    session.add(row)
    session.flush()
    session.info.setdefault(_AFTER_COMMIT, []).append(row.id)
    return row


def _ticket_values(ticket: Ticket, resolution: str) -> dict[str, Any]:
    resolved_at = ticket.resolved_at if ticket.status == "Resolved" else ticket.status_changed_at
    return {
        "number": ticket.number, "title": ticket.title, "status": ticket.status, "priority": ticket.priority,
        "resolution": resolution,
        "resolved_by": ticket.resolved_by if ticket.status == "Resolved" else None,
        "resolved_at": _iso(resolved_at),
    }


def latest_alert_mail(session: Session, ticket_id: int, vendor: str) -> int | None:
    """The journal id of the newest alert mail (not a recovery) that changed this ticket.

    Found through the ticket's timeline (indexed by ticket) and the traces of those mails: the
    alert stage noted "alert" there. Repeats that were only counted left no timeline entry;
    they are the same firing as the mail before them.
    """
    journal_ids = session.scalars(
        select(TimelineEntry.journal_id).where(TimelineEntry.entity_type == "ticket",
                                               TimelineEntry.entity_id == ticket_id,
                                               TimelineEntry.journal_id.is_not(None))
        .order_by(TimelineEntry.id.desc()).limit(ALERT_MAIL_LOOKBACK * 3))
    for journal_id in list(dict.fromkeys(journal_ids))[:ALERT_MAIL_LOOKBACK]:
        # Through the session, not a SELECT: a mail of the same batch has its trace only on its
        # loaded row until the batch writes the outcomes before committing (MailProcessor._attempt).
        entry = session.get(JournalEntry, journal_id, options=[load_only(JournalEntry.trace)])
        trace = entry.trace if entry is not None else None
        if any(isinstance(step, dict) and step.get("stage") == vendor and step.get("decision") == "alert"
               for step in trace or []):
            return journal_id
    return None


@event.listens_for(Session, "after_commit")
def _enqueue_after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint: the rows are committed only with the transaction around it
    ids = session.info.pop(_AFTER_COMMIT, None)
    if ids:
        _hand_over(list(dict.fromkeys(ids)))  # SQLite may reuse the id of a row a savepoint took back


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    # Rolled back, the rows are gone with it. A savepoint's rollback keeps the list: ids it took
    # away are merely not found by the call task, while the others' rows are still to commit.
    if not session.in_nested_transaction():
        session.info.pop(_AFTER_COMMIT, None)


def _hand_over(ids: list[int]) -> None:
    """Committed: hand the rows to the notify queue, when this runs inside a Celery worker.

    Elsewhere (`pipeline ingest`, a test calling the processor) there is no broker to speak
    to; the sweep takes the rows within a minute or two. Best effort inside a worker too:
    an enqueue that fails leaves the rows to the sweep, never costs the mail its outcome.
    """
    from celery import current_task

    if not current_task or current_task.request.called_directly:
        return
    try:
        from pipeline.tasks.resolve_back import enqueue

        enqueue(ids)
    except Exception as exc:
        log.warning("resolve-back call(s) %s left to the sweep: %s", ids, exc)


# -- claiming and recording (each its own short transaction) --------------------------------------

def claim(store: Store, ids: list[int], now: datetime, lease_seconds: float) -> list[int]:
    """Take the rows among `ids` that nobody is calling; returns the ids now ours."""
    return leases.claim(store, ResolveBackCall, "calling", ids, now, lease_seconds)


def mark_done(store: Store, call_id: int, status_code: int, now: datetime | None = None) -> None:
    now = now or utcnow()
    with store.transaction() as session:
        row = _finish(session, call_id, status="done", done_at=now, last_error=None, response_status=status_code)
        if row is not None:
            _timeline(session, row, f"resolved back to {row.vendor}", f"HTTP {status_code}", now)


def mark_failed(store: Store, call_id: int, error: str, status_code: int | None = None,
                now: datetime | None = None) -> None:
    now = now or utcnow()
    with store.transaction() as session:
        row = _finish(session, call_id, status="failed", last_error=error[:2000], response_status=status_code)
        if row is not None:
            _timeline(session, row, f"resolving back to {row.vendor} failed", error, now)
    log.error("resolve-back call %s failed for good: %s", call_id, error)


def mark_retry(store: Store, call_id: int, error: str, *, max_attempts: int, status_code: int | None = None,
               now: datetime | None = None) -> str:
    """Back to pending with a backoff for the sweep; failed once out of attempts. Returns the new status."""
    now = now or utcnow()
    with store.transaction() as session:
        attempts = session.scalar(select(ResolveBackCall.attempts).where(ResolveBackCall.id == call_id)) or 0
        if attempts >= max_attempts:
            error = f"gave up after {attempts} attempts: {error}"
            row = _finish(session, call_id, status="failed", last_error=error[:2000], response_status=status_code)
            if row is not None:
                _timeline(session, row, f"resolving back to {row.vendor} failed", error, now)
                log.error("resolve-back call %s failed for good: %s", call_id, error)
            return "failed"
        delay = min(BACKOFF_BASE_SECONDS * 2 ** max(attempts - 1, 0), BACKOFF_MAX_SECONDS)
        _finish(session, call_id, status="pending", last_error=error[:2000], response_status=status_code,
                next_attempt_at=now + timedelta(seconds=delay))
    return "pending"


def _finish(session: Session, call_id: int, **values: Any) -> ResolveBackCall | None:
    """Leave `calling` for the given status; None when the row is not ours to record (any more)."""
    values.setdefault("next_attempt_at", None)
    changed = session.execute(
        update(ResolveBackCall).where(ResolveBackCall.id == call_id, ResolveBackCall.status == "calling")
        .values(lease_until=None, **values)
    ).rowcount
    return session.get(ResolveBackCall, call_id) if changed == 1 else None


def _timeline(session: Session, row: ResolveBackCall, what: str, to_value: str, now: datetime) -> None:
    # On the ticket's timeline, so `pipeline tickets show` says whether the RMM was told, and why not.
    append(session, TimelineEntry, entity_type="ticket", entity_id=row.ticket_id, who=WHO, what=what[:100],
           from_value=None, to_value=to_value[:200], at=now, journal_id=None)


def due(session: Session, now: datetime, grace_seconds: float = 30, limit: int = 1000) -> list[int]:
    """Rows the sweep should hand to a caller: pending and due, or left `calling` past their lease."""
    return leases.due(session, ResolveBackCall, "calling", now, grace_seconds, limit)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()
