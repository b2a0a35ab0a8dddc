"""Reads of the journal that sources and maintenance need."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.store.models import JournalEntry


def unprocessed_ids(session: Session, received_before: datetime, limit: int = 10_000) -> list[int]:
    """Journal ids still without an outcome that were received before `received_before`, oldest first."""
    rows = session.scalars(
        select(JournalEntry.id)
        .where(JournalEntry.outcome.is_(None), JournalEntry.received_at < received_before)
        .order_by(JournalEntry.id)
        .limit(limit)
    )
    return list(rows)
