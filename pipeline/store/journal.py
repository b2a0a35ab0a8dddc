"""Reads of the journal that sources and maintenance need."""

from __future__ import annotations

from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pipeline.store.models import JournalEntry


# `pipeline import` records file:, mbox: and maildir:/absolute/path references; their
# received time is the mail's own Date, so they say nothing about the pipeline's lag.
IMPORT_REF_PREFIXES = ("file:", "mbox:", "maildir:/")


def is_import_ref(source_ref: str | None) -> bool:
    return (source_ref or "").startswith(IMPORT_REF_PREFIXES)


def unprocessed_ids(session: Session, received_before: datetime, limit: int = 10_000) -> list[int]:
    """Journal ids still without an outcome that were received before `received_before`, oldest first."""
    rows = session.scalars(
        select(JournalEntry.id)
        .where(JournalEntry.outcome.is_(None), JournalEntry.received_at < received_before)
        .order_by(JournalEntry.id)
        .limit(limit)
    )
    return list(rows)


def quarantined(session: Session, limit: int = 1000) -> list[JournalEntry]:
    """Quarantined mail, newest first."""
    return list(session.scalars(
        select(JournalEntry).where(JournalEntry.outcome == "quarantined").order_by(JournalEntry.id.desc()).limit(limit)
    ))


def reopen_quarantined(session: Session, journal_id: int) -> bool:
    """Clear a quarantined mail's outcome so it is processed again; False if it is not in quarantine.

    The condition on the outcome makes a replay idempotent: of two replays racing, one
    reopens the mail and the other finds nothing to do.
    """
    result = session.execute(
        update(JournalEntry)
        .where(JournalEntry.id == journal_id, JournalEntry.outcome == "quarantined")
        .values(outcome=None, reason=None, failed_stage=None, error=None, trace=None, processed_at=None)
    )
    return result.rowcount == 1


def entry_json(entry: JournalEntry, *, with_error: bool = False) -> dict[str, Any]:
    """A journal row as `pipeline quarantine list|show --json` prints it."""
    headers = _headers(entry.raw)
    data: dict[str, Any] = {
        "id": entry.id,
        "mailbox": entry.mailbox,
        "received_at": entry.received_at.isoformat() if entry.received_at else None,
        "processed_at": entry.processed_at.isoformat() if entry.processed_at else None,
        "message_id": entry.message_id or headers.get("message-id"),
        "from": headers.get("from"),
        "subject": headers.get("subject"),
        "outcome": entry.outcome,
        "stage": entry.failed_stage,
        "reason": entry.reason,
        "size": len(entry.raw),
    }
    if with_error:
        data["error"] = entry.error
        data["trace"] = entry.trace or []
    return data


def _headers(raw: bytes) -> dict[str, str]:
    # Only for display: quarantined mail may be unparseable, so never raise here.
    try:
        msg = BytesHeaderParser(policy=compat32).parsebytes(raw[:65536])
        return {k.lower(): " ".join(str(v).split())[:300] for k, v in msg.items()
                if k.lower() in ("from", "subject", "message-id")}
    except Exception:
        return {}
