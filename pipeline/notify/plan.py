"""Which notifications a written mail causes (D1.7), planned in the mail's transaction.

The drafts are rendered here and stored in the outbox with their Message-ID; sending
them after commit is the notify task's job.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from pipeline.commands import CommandFailure
from pipeline.context import MailContext
from pipeline.lifecycle import (
    settings_for,
)
from pipeline.notify.outbox import Draft, draft, render, ticket_tag
from pipeline.store.models import (
    Contact,
    Note,
    Notification,
    NotificationRecipient,
    Project,
    Task,
    Ticket,
)


def plan_notifications(session: Session, ctx: MailContext, entity_type: str, entity_id: int, number: str,
                   title: str, note: Note | None, contact: Contact | None) -> list[Draft]:
    settings = ctx.mailbox.notifications
    numbering = ctx.config.settings.numbering
    tag = ticket_tag(numbering, number) if entity_type == "ticket" else f"[{entity_type.title()}#{number}]"
    drafts: list[Draft | None] = []
    common = dict(mailbox=ctx.mailbox, mail=ctx.parsed, entity_type=entity_type, entity_id=entity_id,
                  number=number, journal_id=ctx.journal_id)
    if ctx.no_answer:
        ctx.note("write", "no notification to the sender", ctx.no_answer)
    elif ctx.outcome == "ticket_created" and settings.ticket_created and (contact is None or contact.notifications):
        body = render("ticket_created", ticket={"number": number, "title": title}, tag=tag,
                      recipient_name=ctx.sender.name, mailbox=mailbox_view(ctx))
        drafts.append(draft("ticket_created", recipients=[(ctx.sender.address, "sender")],
                            subject=f"{tag} {title}", body=body, **common))
    if ctx.outcome == "note_added" and settings.note_added and entity_type == "ticket" and note is not None:
        ticket = session.get(Ticket, entity_id)
        assignee = ticket.assigned_resource
        if assignee and assignee.email != ctx.sender.address:
            body = render("note_added", author=ctx.sender.name or ctx.sender.address, note=note,
                          entity_label="ticket", number=number, title=ticket.title)
            drafts.append(draft("note_added", recipients=[(assignee.email, "primary_resource")],
                                subject=f"{tag} {ticket.title}", body=body, **common))
    return [d for d in drafts if d is not None]


def rejection_notice(ctx: MailContext) -> Draft | None:
    """A rejection goes only to a sender that passed authentication: never backscatter (D1.3)."""
    if not ctx.trust or not ctx.trust.passed or ctx.no_answer or not ctx.mailbox.notifications.sender_rejected:
        return None
    body = render("sender_rejected", subject=ctx.parsed.subject, mailbox=mailbox_view(ctx))
    return draft("sender_rejected", mailbox=ctx.mailbox, recipients=[(ctx.parsed.from_address, "sender")],
                 subject=f"Not accepted: {ctx.parsed.subject}", body=body, mail=ctx.parsed, entity_type=None,
                 entity_id=None, number=None, journal_id=ctx.journal_id)


def store_draft(session: Session, d: Draft, ctx: MailContext) -> Notification:
    n = Notification(
        event=d.event, entity_type=d.entity_type, entity_id=d.entity_id, journal_id=ctx.journal_id,
        mailbox=ctx.mailbox.name, from_address=ctx.mailbox.notifications.from_address or ctx.mailbox.address,
        subject=d.subject, body_text=d.body_text, message_id=d.message_id, in_reply_to=d.in_reply_to,
        references=d.references,
        recipients=[NotificationRecipient(email=a, role=r) for a, r in d.recipients],
    )
    session.add(n)
    ctx.note("write", f"notification {d.event}", "to " + ", ".join(a for a, _ in d.recipients))
    return n


def mailbox_view(ctx: MailContext) -> dict[str, str | None]:
    return {"name": ctx.mailbox.name, "address": ctx.mailbox.address,
            "from_name": ctx.mailbox.notifications.from_name}


def command_failed_notice(session: Session, ctx: MailContext, failures: list[CommandFailure]) -> None:
    """Tell the sender which line failed and why (D4); never to a sender we must not answer."""
    if ctx.no_answer or not ctx.mailbox.notifications.command_failed:
        ctx.note("apply", "sender not told", ctx.no_answer or "command_failed notifications are off")
        return
    w = ctx.written
    numbering = ctx.config.settings.numbering
    tag = ticket_tag(numbering, w.number) if w.entity_type == "ticket" else f"[{w.entity_type.title()}#{w.number}]"
    title = entity_title(session, w.entity_type, w.entity_id)
    failed = {(f.line, f.text) for f in failures}
    applied = [c.text for c in ctx.commands.commands if (c.line, c.text) not in failed]
    body = render("command_failed", recipient_name=ctx.sender.name, subject=ctx.parsed.subject, number=w.number,
                  entity_label=w.entity_type, failures=failures, applied=applied, mailbox=mailbox_view(ctx))
    d = draft("command_failed", mailbox=ctx.mailbox, recipients=[(ctx.sender.address, "sender")],
              subject=f"{tag} Command failed: {title}", body=body, mail=ctx.parsed, entity_type=w.entity_type,
              entity_id=w.entity_id, number=w.number, journal_id=ctx.journal_id)
    if d is not None:
        store_draft(session, d, ctx)


def resolved_notice(session: Session, ctx: MailContext, ticket: Ticket) -> None:
    """Tell the contact: the resolution, and how to accept or reject it in the feedback window (D2)."""
    contact = ticket.contact
    if ctx.no_answer or not ctx.mailbox.notifications.ticket_resolved or contact is None or not contact.notifications:
        return
    settings = settings_for(ctx.config, ticket.source_mailbox)
    body = render("ticket_resolved", recipient_name=contact.name, number=ticket.number, title=ticket.title,
                  resolver=ctx.sender.name or ctx.sender.address, note=ctx.written.text,
                  days=settings.feedback_window_days, mailbox=mailbox_view(ctx))
    tag = ticket_tag(ctx.config.settings.numbering, ticket.number)
    d = draft("ticket_resolved", mailbox=ctx.mailbox, recipients=[(contact.email, "contact")],
              subject=f"{tag} Resolved: {ticket.title}", body=body, mail=ctx.parsed, entity_type="ticket",
              entity_id=ticket.id, number=ticket.number, journal_id=ctx.journal_id)
    if d is not None:
        store_draft(session, d, ctx)


def entity_title(session: Session, entity_type: str, entity_id: int) -> str:
    if entity_type == "ticket":
        return session.get(Ticket, entity_id).title
    if entity_type == "task":
        return session.get(Task, entity_id).title
    return session.get(Project, entity_id).name
