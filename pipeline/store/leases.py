"""Outbox rows taken under a lease, and swept when left behind (the notification and resolve-back outboxes).

A row is worked on by one sender at a time: claiming it sets the busy status and a lease.
A sender that dies gives its rows back when the lease runs out, and whoever claims them
next counts another attempt.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from pipeline.store.db import Store


def claimable(model: Any, busy: str, now: datetime):  # -> SQL condition
    """Pending, or `busy` under a lease that has run out."""
    return or_(model.status == "pending", and_(model.status == busy, model.lease_until < now))


def claim(store: Store, model: Any, busy: str, ids: list[int], now: datetime, lease_seconds: float) -> list[int]:
    """Take the rows among `ids` that nobody is working on; returns the ids now ours. Counts an attempt each."""
    if not ids:
        return []
    with store.transaction() as session:
        rows = session.execute(
            update(model).where(model.id.in_(ids), claimable(model, busy, now))
            .values(status=busy, lease_until=now + timedelta(seconds=lease_seconds), attempts=model.attempts + 1)
            .returning(model.id)
        ).scalars().all()
    return sorted(rows)


def due(session: Session, model: Any, busy: str, now: datetime, grace_seconds: float, limit: int) -> list[int]:
    """Rows a sweep should hand on: pending and due, or left `busy` past their lease.

    Rows younger than `grace_seconds` are left to the task their own commit enqueued.
    """
    rows = session.scalars(
        select(model.id).where(or_(
            and_(model.status == "pending",
                 or_(model.next_attempt_at.is_(None), model.next_attempt_at <= now),
                 model.created_at <= now - timedelta(seconds=grace_seconds)),
            and_(model.status == busy, model.lease_until < now),
        )).order_by(model.id).limit(limit))
    return list(rows)
