"""Reading tickets and notifications back out, in the JSON shapes of D6."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.store.models import Note, Notification, Ticket, TimeEntry, TimelineEntry


def _person(name: str | None, email: str | None) -> dict[str, str] | None:
    return {"name": name or "", "email": email} if email else None


def _iso(value: datetime | None) -> str | None:
    # SQLite hands datetimes back naive; everything is stored in UTC, so say so on every database.
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()


def list_tickets(session: Session, limit: int = 500) -> list[dict[str, Any]]:
    notes = (select(Note.entity_id, func.count().label("n")).where(Note.entity_type == "ticket")
             .group_by(Note.entity_id).subquery())
    rows = session.execute(
        select(Ticket, func.coalesce(notes.c.n, 0))
        .outerjoin(notes, notes.c.entity_id == Ticket.id)
        .order_by(Ticket.id.desc()).limit(limit)
    ).all()
    return [{
        "number": t.number, "title": t.title, "status": t.status, "priority": t.priority,
        "account": t.account.name, "contact": _person(t.contact.name, t.contact.email) if t.contact else None,
        "notes": n, "created_at": _iso(t.created_at), "updated_at": _iso(t.updated_at),
    } for t, n in rows]


def show_ticket(session: Session, number: str) -> dict[str, Any] | None:
    t = session.scalar(select(Ticket).where(Ticket.number == number.upper()))
    if t is None:
        return None
    notes = session.scalars(select(Note).where(Note.entity_type == "ticket", Note.entity_id == t.id)
                            .order_by(Note.id)).all()
    entries = session.scalars(select(TimeEntry).where(TimeEntry.entity_type == "ticket", TimeEntry.entity_id == t.id)
                              .order_by(TimeEntry.id)).all()
    timeline = session.scalars(select(TimelineEntry).where(TimelineEntry.entity_type == "ticket",
                                                           TimelineEntry.entity_id == t.id)
                               .order_by(TimelineEntry.id)).all()
    return {
        "number": t.number,
        "title": t.title,
        "description": t.description,
        "status": t.status,
        "priority": t.priority,
        "account": t.account.name,
        "contact": _person(t.contact.name, t.contact.email) if t.contact else None,
        "assigned_resource": (_person(t.assigned_resource.name, t.assigned_resource.email)
                              if t.assigned_resource else None),
        "notes": [{"author": _person(n.author_name, n.author_email), "body": n.body,
                   "created_at": _iso(n.created_at), "internal": n.internal} for n in notes],
        "time_entries": [{"resource": e.resource.email, "hours": e.hours, "role": e.role, "billable": e.billable,
                          "summary": e.summary} for e in entries],
        "timeline": [{"at": _iso(e.at), "who": e.who, "what": e.what, "from": e.from_value, "to": e.to_value}
                     for e in timeline],
    }


def notification_json(n: Notification, with_body: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": n.id, "event": n.event, "status": n.status, "mailbox": n.mailbox, "from": n.from_address,
        "to": [r.email for r in n.recipients], "subject": n.subject, "message_id": n.message_id,
        "in_reply_to": n.in_reply_to, "created_at": _iso(n.created_at), "sent_at": _iso(n.sent_at),
    }
    if with_body:
        out["references"] = n.references
        out["body_text"] = n.body_text
    return out


def list_notifications(session: Session, limit: int = 500) -> list[dict[str, Any]]:
    rows = session.scalars(select(Notification).order_by(Notification.id.desc()).limit(limit)).all()
    return [notification_json(n) for n in rows]


