"""The write stage's work (D1.6): everything a mail changes, in the caller's transaction."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.context import MailContext
from pipeline.notify.outbox import Draft, draft, render, ticket_tag
from pipeline.parsers.references import tag_pattern
from pipeline.parsers.subject import normalise_subject, ticket_title
from pipeline.store.models import (
    Account,
    Attachment,
    Contact,
    Note,
    Notification,
    NotificationRecipient,
    ProcessedMail,
    Queue,
    Ticket,
    TimelineEntry,
)
from pipeline.store.numbers import allocate_number

def write_mail(session: Session, ctx: MailContext) -> None:
    """Create the ticket or note; set ctx.outcome and ctx.entity."""
    target = ctx.target
    mail = ctx.parsed
    if ctx.dry_run:
        if target.kind == "new_ticket":
            ctx.outcome, ctx.entity = "ticket_created", {"type": "ticket", "number": None}
            ctx.note("write", "would create a ticket", "dry run: nothing written")
        else:
            ctx.outcome, ctx.entity = "note_added", {"type": target.entity_type, "number": target.number}
            ctx.note("write", f"would add a note to {target.number}", "dry run: nothing written")
        return

    now = datetime.now(timezone.utc)
    account_id, contact = _sender_records(session, ctx)
    who = ctx.sender.address
    numbering = ctx.config.settings.numbering
    title = ticket_title(mail.subject, tag_pattern(numbering.ticket_tag, numbering.ticket))

    if target.kind == "new_ticket":
        defaults = ctx.mailbox.ticket_defaults
        ticket = Ticket(
            number=allocate_number(session, "ticket", ctx.config.settings.numbering, now),
            title=title[:500],
            # An unverified mail never speaks to customers: its text goes to an internal note.
            description="" if target.internal else mail.body_text,
            status=defaults.status,
            priority=defaults.priority,
            queue_id=_queue_id(session, defaults.queue),
            account_id=account_id,
            contact_id=contact.id if contact else None,
            source=defaults.source,
            source_mailbox=ctx.mailbox.name,
            category=defaults.category,
            subject_key=normalise_subject(mail.subject)[:500],
            linked_ticket_id=target.link_to_ticket_id,
        )
        session.add(ticket)
        session.flush()
        entity_type, entity_id, number = "ticket", ticket.id, ticket.number
        _timeline(session, ctx, entity_type, entity_id, who, "created", None, ticket.status)
        if target.link_to_ticket_id:
            linked = session.get(Ticket, target.link_to_ticket_id)
            _timeline(session, ctx, entity_type, entity_id, who, "linked", None, linked.number)
        note = None
        if target.internal:
            note = _note(session, ctx, entity_type, entity_id, mail.body_text, internal=True)
        ctx.outcome = "ticket_created"
    else:
        entity_type, entity_id, number = target.entity_type, target.entity_id, target.number
        note = _note(session, ctx, entity_type, entity_id, mail.body_new, internal=target.internal)
        _timeline(session, ctx, entity_type, entity_id, who, "note added", None, None)
        if entity_type == "ticket":
            session.get(Ticket, entity_id).updated_at = now
        ctx.outcome = "note_added"
    ctx.entity = {"type": entity_type, "number": number}

    for part in mail.attachments:
        session.add(Attachment(
            entity_type=entity_type, entity_id=entity_id, note_id=note.id if note else None,
            journal_id=ctx.journal_id, filename=part.filename, content_type=part.content_type,
            size=part.size, content_id=part.content_id, data=part.data,
        ))
    # The store refuses the same mail twice: a concurrent duplicate fails here (D1.5.1).
    session.add(ProcessedMail(identity=ctx.identity, journal_id=ctx.journal_id))
    for d in _notifications(session, ctx, entity_type, entity_id, number, title, note, contact):
        store_draft(session, d, ctx)
    ctx.note("write", f"{ctx.outcome.replace('_', ' ')}: {number}",
             f"{len(mail.attachments)} attachment(s)" + ("; internal note" if target.internal else ""))
    session.flush()


def _sender_records(session: Session, ctx: MailContext) -> tuple[int, Contact | None]:
    """The account and contact the mail belongs to, creating what policy says to create."""
    s = ctx.sender
    if s.kind == "contact":
        return s.account_id, session.get(Contact, s.contact_id)
    account_id = s.account_id
    if account_id is None:
        account_id = _default_account(session, ctx.mailbox.unknown_sender.default_account).id
    if s.kind == "new_contact":
        contact = Contact(email=s.address, name=s.name or "", account_id=account_id)
        session.add(contact)
        session.flush()
        ctx.note("write", "contact created", f"{s.address} under {s.account_name}")
        return account_id, contact
    return account_id, None


def _default_account(session: Session, name: str) -> Account:
    account = session.scalar(select(Account).where(Account.name == name))
    if account is None:
        account = Account(name=name)
        session.add(account)
        session.flush()
    return account


def _queue_id(session: Session, name: str | None) -> int | None:
    if not name:
        return None
    queue = session.scalar(select(Queue).where(Queue.name == name))
    if queue is None:  # a queue named in mailboxes.toml is created on first use
        queue = Queue(name=name)
        session.add(queue)
        session.flush()
    return queue.id


def _note(session: Session, ctx: MailContext, entity_type: str, entity_id: int, body: str, internal: bool) -> Note:
    note = Note(entity_type=entity_type, entity_id=entity_id, author_name=ctx.sender.name or "",
                author_email=ctx.sender.address, body=body, internal=internal, journal_id=ctx.journal_id)
    session.add(note)
    session.flush()
    return note


def _timeline(session: Session, ctx: MailContext, entity_type: str, entity_id: int, who: str, what: str,
              from_value: str | None, to_value: str | None) -> None:
    session.add(TimelineEntry(entity_type=entity_type, entity_id=entity_id, who=who, what=what,
                              from_value=from_value, to_value=to_value, journal_id=ctx.journal_id))


def _notifications(session: Session, ctx: MailContext, entity_type: str, entity_id: int, number: str,
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
                      recipient_name=ctx.sender.name, mailbox=_mailbox_view(ctx))
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
    body = render("sender_rejected", subject=ctx.parsed.subject, mailbox=_mailbox_view(ctx))
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


def _mailbox_view(ctx: MailContext) -> dict[str, str | None]:
    return {"name": ctx.mailbox.name, "address": ctx.mailbox.address,
            "from_name": ctx.mailbox.notifications.from_name}
