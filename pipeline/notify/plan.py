"""Which notifications a written mail causes (D1.7), planned in the mail's transaction.

Every event goes through `plan_event`: is it switched on, is the mail one we may answer,
who gets it (roles minus opted-out contacts, our own addresses, machines), is the
recipient within the loop breaker's limit — then one rendered draft per recipient. The
drafts are stored in the outbox with their Message-ID; the notify task sends them after commit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.commands import CommandFailure
from pipeline.context import MailContext
from pipeline.lifecycle import settings_for
from pipeline.notify.outbox import Draft, draft, entity_tag, insert_outbox_row, sender_address, threading
from pipeline.notify.recipients import (
    ANSWERS,
    Recipient,
    address_problem,
    answers_in_window,
    answers_so_far,
    by_roles,
    count_answer,
    opted_out,
    unique,
)
from pipeline.notify.templates import render_safely
from pipeline.store.models import (
    Note,
    Notification,
    NotificationRecipient,
    Project,
    Task,
    Ticket,
    TimelineEntry,
    utcnow,
)
from pipeline.store.rows import append, append_later, holding_back

# Roles that reach customers: an internal note never goes to them (D8).
CUSTOMER_ROLES = ("sender", "contact")


@dataclass
class About:
    """What a notification is about: the entity, its ticket (if it is one) and the note or text."""

    entity_type: str | None = None
    entity_id: int | None = None
    number: str | None = None
    title: str = ""
    ticket: Ticket | None = None
    note: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    created: bool = False  # created by this mail: no notification about it can exist yet


def plan_event(session: Session, ctx: MailContext, event: str, about: About, *,
               skip_sender: bool = False, internal: bool = False) -> list[Draft]:
    """The drafts of one event caused by this mail (none when it is off or nobody may get it)."""
    settings = ctx.mailbox.notifications
    if not getattr(settings, event):
        ctx.note("notify", f"no {event}", f"{event} notifications are off for this mailbox")
        return []
    mail = ctx.parsed
    if mail.is_auto_reply or mail.is_bounce:
        # Never answered, and nobody else is told either: a machine's mail must not start an exchange.
        ctx.note("notify", f"no {event}", f"the mail is an {'auto-reply' if mail.is_auto_reply else 'bounce'}")
        return []
    sender = Recipient(mail.from_address.lower(), "sender", ctx.sender.name if ctx.sender else mail.from_name)
    wanted = unique(by_roles(session, getattr(settings.recipients, event), sender=sender, ticket=about.ticket))
    drafts = []
    threads = threading(session, mail, about.entity_type, None if about.created else about.entity_id)
    for r in wanted:
        why = _why_not(session, ctx, event, r, sender, skip_sender=skip_sender, internal=internal)
        if why:
            ctx.note("notify", f"no {event} to {r.email}", why)
            continue
        values = _values(ctx, about, r)
        rendered, fallback = render_safely(event, values, _folder(ctx))
        if fallback:
            ctx.note("notify", f"{event}: shipped template", fallback)
        drafts.append(draft(event, mailbox=ctx.mailbox, recipient=r, rendered=rendered, threads=threads,
                            entity_type=about.entity_type, entity_id=about.entity_id, number=about.number,
                            journal_id=ctx.journal_id))
    return drafts


def _why_not(session: Session, ctx: MailContext, event: str, r: Recipient, sender: Recipient, *,
             skip_sender: bool, internal: bool) -> str | None:
    if r.role in CUSTOMER_ROLES and ctx.no_answer and r.email == sender.email:
        return ctx.no_answer
    if skip_sender and r.email == sender.email:
        return "the sender wrote it"
    if internal and r.role in CUSTOMER_ROLES and not _is_resource(ctx, r):
        return "an internal note is never sent to customers"
    return address_problem(ctx.config, r) or opted_out(session, r.email)


def _is_resource(ctx: MailContext, r: Recipient) -> bool:
    return r.role == "sender" and ctx.sender is not None and ctx.sender.kind == "resource"


def _folder(ctx: MailContext) -> str | None:
    folder = ctx.mailbox.notifications.templates
    return str(ctx.config.resolve_path(folder)) if folder else None


def _values(ctx: MailContext, about: About, r: Recipient) -> dict[str, Any]:
    t = about.ticket
    box = ctx.mailbox
    values: dict[str, Any] = {
        "ticket": None, "account": None, "contact": None, "resource": None,
        "entity": None, "tag": "",
        "mailbox": {"name": box.name, "address": box.address, "from_name": box.notifications.from_name},
        "note": about.note,
        "recipient": r.view(),
    }
    if about.entity_type and about.number:
        values["entity"] = {"type": about.entity_type, "number": about.number, "title": about.title,
                            "label": about.entity_type}
        values["tag"] = entity_tag(ctx.config.settings.numbering, about.entity_type, about.number)
    if t is not None:
        values["ticket"] = {"number": t.number, "title": t.title, "status": t.status, "priority": t.priority,
                            "queue": t.queue.name if t.queue else None}
        values["account"] = {"name": t.account.name}
        values["contact"] = {"name": t.contact.name, "email": t.contact.email} if t.contact else None
        values["resource"] = ({"name": t.assigned_resource.name, "email": t.assigned_resource.email}
                              if t.assigned_resource else None)
    values.update(about.extra)
    return values


def _note_view(note: Note | None, text: str | None = None, ctx: MailContext | None = None) -> dict[str, Any] | None:
    if note is not None:
        return {"body": note.body, "author_name": note.author_name, "author_email": note.author_email,
                "internal": note.internal}
    if text is not None and ctx is not None:
        return {"body": text, "author_name": ctx.sender.name, "author_email": ctx.sender.address, "internal": False}
    return None


# -- the events -------------------------------------------------------------------------------

def plan_notifications(session: Session, ctx: MailContext, entity_type: str, entity_id: int, number: str,
                       title: str, note: Note | None) -> list[Draft]:
    """Ticket created (to the sender, by default) or note added (to the primary resource)."""
    ticket = session.get(Ticket, entity_id) if entity_type == "ticket" else None
    if ctx.outcome == "ticket_created":
        about = About(entity_type, entity_id, number, ticket.title if ticket else title, ticket,
                      _note_view(note, ticket.description if ticket else "", ctx), created=True)
        return plan_event(session, ctx, "ticket_created", about, internal=bool(note and note.internal))
    if ctx.outcome == "note_added" and note is not None:
        about = About(entity_type, entity_id, number, entity_title(session, entity_type, entity_id), ticket,
                      _note_view(note))
        # The author knows what they wrote; an internal note stays with resources.
        return plan_event(session, ctx, "note_added", about, skip_sender=True, internal=note.internal)
    return []


def rejection_notice(ctx: MailContext) -> Draft | None:
    """The sender_rejected notice, only for a sender that passed authentication: never backscatter (D1.3).

    Planned without the session (the caller stores it with `store_draft`, which applies the
    loop breaker): a rejected sender is unknown, so no contact's opt-out can apply.
    """
    if not ctx.mailbox.notifications.sender_rejected:
        return None
    if not ctx.trust or not ctx.trust.passed:
        ctx.note("notify", "no sender_rejected", "the sender did not pass authentication: no backscatter")
        return None
    mail = ctx.parsed
    r = Recipient(mail.from_address.lower(), "sender", mail.from_name)
    why = ctx.no_answer or ("the mail is an auto-reply or bounce" if mail.is_auto_reply or mail.is_bounce
                            else address_problem(ctx.config, r))
    if why:
        ctx.note("notify", "no sender_rejected", why)
        return None
    about = About(extra={"original_subject": mail.subject})
    rendered, fallback = render_safely("sender_rejected", _values(ctx, about, r), _folder(ctx))
    if fallback:
        ctx.note("notify", "sender_rejected: shipped template", fallback)
    threads = (mail.message_id, mail.message_id) if mail.message_id else (None, None)
    return draft("sender_rejected", mailbox=ctx.mailbox, recipient=r, rendered=rendered, threads=threads,
                 entity_type=None, entity_id=None, number=None, journal_id=ctx.journal_id)


def store_draft(session: Session, d: Draft, ctx: MailContext) -> int | None:
    """Put a draft in the outbox (its id), unless the loop breaker holds it back (then None, and the trace says why)."""
    settings = ctx.mailbox.notifications
    guarded = [a for a, role in d.recipients if role == "sender"] if d.event in ANSWERS else []
    values = dict(
        event=d.event, entity_type=d.entity_type, entity_id=d.entity_id, journal_id=ctx.journal_id,
        mailbox=ctx.mailbox.name, from_address=sender_address(ctx.mailbox),
        subject=d.subject, body_text=d.body_text, body_html=d.body_html, message_id=d.message_id,
        in_reply_to=d.in_reply_to, references=d.references,
    )
    if d.recipients and session.get_bind().dialect.name == "postgresql" and not holding_back(session):
        now = utcnow()
        values.update(status="pending", attempts=0, created_at=now)
        notification_id = insert_outbox_row(session, values, d.recipients, guarded, settings.answer_limit,
                                            now - timedelta(seconds=settings.answer_window_seconds))
        if notification_id is None:
            if not _held_back(session, ctx, d, guarded):  # the count moved between the two statements
                ctx.note("notify", f"no {d.event}", f"loop breaker: limit {settings.answer_limit} reached")
            return None
    else:
        # SQLite has one writer at a time, so the counts asked once per batch stay right. A PostgreSQL
        # batch holding its rows back counts from the batch's start (and its own answers as it goes):
        # answers another worker commits while the batch runs, a fraction of a second, are not
        # counted, where the one-statement count would see them. A loop is a sequence of mails,
        # each answered before the next arrives, so that window cannot feed one.
        if _held_back(session, ctx, d, guarded, answers_so_far):
            return None
        notification_id = append(session, Notification, **values)
        for a, r in d.recipients:
            append_later(session, NotificationRecipient, notification_id=notification_id, email=a, role=r)
        for address in guarded:
            count_answer(session, address, settings.answer_window_seconds)
    ctx.note("write", f"notification {d.event}", "to " + ", ".join(a for a, _ in d.recipients))
    return notification_id


def _held_back(session: Session, ctx: MailContext, d: Draft, guarded: list[str],
               answers: Callable[[Session, str, int], int] = answers_in_window) -> bool:
    """Whether the loop breaker holds `d` back: one of the `guarded` senders had its automatic answers
    for the window already (the trace says which)."""
    settings = ctx.mailbox.notifications
    for address in guarded:
        sent = answers(session, address, settings.answer_window_seconds)
        if sent >= settings.answer_limit:
            ctx.note("notify", f"no {d.event} to {address}",
                     f"loop breaker: {sent} automatic answers to {address} in the last "
                     f"{settings.answer_window_seconds}s (limit {settings.answer_limit})")
            return True
    return False


def command_failed_notice(session: Session, ctx: MailContext, failures: list[CommandFailure]) -> None:
    """Tell the sender which line failed and why (D4); never to a sender we must not answer."""
    w = ctx.written
    failed = {(f.line, f.text) for f in failures}
    applied = [c.text for c in ctx.commands.commands if (c.line, c.text) not in failed]
    ticket = session.get(Ticket, w.entity_id) if w.entity_type == "ticket" else None
    about = About(w.entity_type, w.entity_id, w.number, entity_title(session, w.entity_type, w.entity_id), ticket,
                  _note_view(None, w.text, ctx), extra={
                      "original_subject": ctx.parsed.subject, "applied": applied,
                      "failures": [{"line": f.line, "text": f.text, "why": f.why} for f in failures]})
    for d in plan_event(session, ctx, "command_failed", about):
        store_draft(session, d, ctx)


def resolved_notice(session: Session, ctx: MailContext, ticket: Ticket) -> None:
    """Tell the contact: the resolution, and how to accept or reject it in the feedback window (D2)."""
    settings = settings_for(ctx.config, ticket.source_mailbox)
    about = About("ticket", ticket.id, ticket.number, ticket.title, ticket, _note_view(None, ctx.written.text, ctx),
                  extra={"resolver": ctx.sender.name or ctx.sender.address,
                         "feedback_days": settings.feedback_window_days})
    for d in plan_event(session, ctx, "ticket_resolved", about):
        store_draft(session, d, ctx)


def status_changed_notice(session: Session, ctx: MailContext) -> None:
    """Tell the contact when a technician's commands changed the status (Resolved has its own notice).

    Only explicit commands count: the automatic In Progress of a first update, and the
    customer's own reopen, accept or close, are not news to anyone who would get this.
    """
    w = ctx.written
    if w is None or w.entity_type != "ticket" or not ctx.commands_apply or ctx.sender.kind != "resource":
        return
    moves = session.scalars(select(TimelineEntry).where(
        TimelineEntry.journal_id == ctx.journal_id, TimelineEntry.entity_type == "ticket",
        TimelineEntry.entity_id == w.entity_id, TimelineEntry.to_value.is_not(None),
        (TimelineEntry.what == "status changed") | TimelineEntry.what.startswith("waiting until"),
    ).order_by(TimelineEntry.id)).all()
    ticket = session.get(Ticket, w.entity_id)
    if not moves or ticket.status in ("Resolved", "Closed"):
        return
    wait = ticket.wait_until.strftime("%Y-%m-%d %H:%M UTC") if ticket.wait_until else None
    about = About("ticket", ticket.id, ticket.number, ticket.title, ticket, _note_view(None, w.text, ctx),
                  extra={"old_status": moves[0].from_value, "new_status": ticket.status, "wait_until": wait})
    for d in plan_event(session, ctx, "status_changed", about, skip_sender=True):
        store_draft(session, d, ctx)


def entity_title(session: Session, entity_type: str, entity_id: int) -> str:
    if entity_type == "ticket":
        return session.get(Ticket, entity_id).title
    if entity_type == "task":
        return session.get(Task, entity_id).title
    return session.get(Project, entity_id).name
