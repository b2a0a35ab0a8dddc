"""The write stage's work (D1.6): everything a mail changes, in the caller's transaction."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.commands import not_applied_text, parse_commands
from pipeline.context import MailContext, Written
from pipeline.lifecycle import (
    OPEN,
    utc,
)
from pipeline.notify.plan import plan_notifications, store_draft
from pipeline.parsers.references import tag_pattern
from pipeline.parsers.rmm import AlertRecord, alert_of, priority_for_severity
from pipeline.parsers.subject import normalise_subject, ticket_title
from pipeline.store.locks import lock_entity
from pipeline.store.lookups import ContactInfo, Lookups, hold, remember, remembered
from pipeline.store.models import (
    Account,
    Attachment,
    Contact,
    Note,
    ProcessedMail,
    Queue,
    Ticket,
    TimelineEntry,
)
from pipeline.store.numbers import allocate_number
from pipeline.store.new_contacts import add_new_contact, expected
from pipeline.store.rows import add_inserted, add_inserted_with, add_new, append, append_later, append_many


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
    if target.kind == "existing":
        lock_entity(session, target.entity_type, target.entity_id)
        if target.entity_type == "ticket":
            # Read again under the lock: another transaction may have changed it since the resolve stage read it.
            hold(session, session.get(Ticket, target.entity_id, populate_existing=True))
    alert = alert_of(ctx)
    if alert is not None and target.kind == "existing" and _alert_repeat_counted(session, ctx, alert):
        return
    # A new sender's contact is written with their new ticket, in one statement where the store can.
    account_id, contact_id, new_contact = _sender_records(session, ctx, with_ticket=target.kind == "new_ticket")
    who = ctx.sender.address
    numbering = ctx.config.settings.numbering
    title = ticket_title(mail.subject, tag_pattern(numbering.ticket_tag, numbering.ticket))

    if target.kind == "new_ticket":
        defaults = ctx.mailbox.ticket_defaults
        text = mail_text(ctx, mail.body_text)
        ticket = Ticket(
            number=allocate_number(session, "ticket", ctx.config.settings.numbering, now),
            title=title[:500],
            # An unverified mail never speaks to customers: its text goes to an internal note.
            description="" if target.internal else text,
            description_html=None if target.internal else mail.body_html_sanitized,
            status=defaults.status,
            status_changed_at=utc(ctx.received_at),
            # An alert's own severity beats the mailbox default: a failed backup is not "Medium".
            priority=(alert and priority_for_severity(alert.severity)) or defaults.priority,
            queue_id=_queue_id(session, defaults.queue),
            account_id=account_id,
            contact_id=contact_id,
            source=defaults.source,
            source_mailbox=ctx.mailbox.name,
            category=defaults.category,
            subject_key=normalise_subject(mail.subject)[:500],
            linked_ticket_id=target.link_to_ticket_id,
            alert_key=alert.key if alert else None,
            alert_last_seen_at=utc(ctx.received_at) if alert else None,
        )
        if new_contact is None:
            hold(session, add_inserted(session, ticket))
        elif add_inserted_with(session, new_contact, ticket, "contact_id", unless_exists="email") is not None:
            hold(session, ticket)
            _contact_created(session, ctx, new_contact)
        else:  # another worker wrote this sender's contact after the batch asked: theirs is the one
            contact = _contact_found(session, ctx, new_contact.email)
            ticket.contact_id, ticket.account_id = contact.id, contact.account_id
            hold(session, add_inserted(session, ticket))
        entity_type, entity_id, number = "ticket", ticket.id, ticket.number
        timeline_entry(session, ctx, entity_type, entity_id, who, "created", None, ticket.status)
        if target.link_to_ticket_id:
            linked = session.get(Ticket, target.link_to_ticket_id)
            timeline_entry(session, ctx, entity_type, entity_id, who, "linked", None, linked.number)
        note = None
        if target.internal:
            note = _note(session, ctx, entity_type, entity_id, text, internal=True)
        ctx.outcome = "ticket_created"
    else:
        entity_type, entity_id, number = target.entity_type, target.entity_id, target.number
        text = mail_text(ctx, mail.body_new)
        note = _note(session, ctx, entity_type, entity_id, text, internal=target.internal)
        timeline_entry(session, ctx, entity_type, entity_id, who, "note added", None, None)
        if entity_type == "ticket":
            session.get(Ticket, entity_id).updated_at = now
        ctx.outcome = "note_added"
    ctx.entity = {"type": entity_type, "number": number}
    # A time entry's summary is what the sender newly wrote, without the command lines (D4).
    summary = ctx.commands.text if ctx.commands and ctx.commands.found else mail.body_new
    ctx.written = Written(entity_type, entity_id, number, note.id if note else None,
                          created=target.kind == "new_ticket", text=summary.strip())

    append_many(session, Attachment, [dict(
        entity_type=entity_type, entity_id=entity_id, note_id=note.id if note else None,
        journal_id=ctx.journal_id, filename=part.filename, content_type=part.content_type,
        size=part.size, content_id=part.content_id, data=b"" if part.skipped else part.data,
        skipped_reason=part.skipped, inline=part.inline,
    ) for part in mail.attachments])
    mark_processed(session, ctx)
    for d in plan_notifications(session, ctx, entity_type, entity_id, number, title, note):
        store_draft(session, d, ctx)
    ctx.note("write", f"{ctx.outcome.replace('_', ' ')}: {number}",
             f"{len(mail.attachments)} attachment(s)" + ("; internal note" if target.internal else ""))
    session.flush()


def _alert_repeat_counted(session: Session, ctx: MailContext, alert: AlertRecord) -> bool:
    """Count an alert's repeat on its ticket; True when that is all (no note): a storm is not a flood.

    The first repeat adds a note (someone should see that it is still firing), later ones only
    count, unless the mailbox asks for a note every Nth repeat. A recovery, and a repeat that
    reopens a recovered ticket (flapping), always add their note.
    """
    if alert.recovered:
        return False
    ticket = session.get(Ticket, ctx.target.entity_id)
    ticket.alert_repeat_count = (ticket.alert_repeat_count or 0) + 1
    ticket.alert_last_seen_at = utc(ctx.received_at)
    n, every = ticket.alert_repeat_count, ctx.mailbox.alerts.repeat_note_every
    if n == 1 or ticket.status not in OPEN or (every and n % every == 0):
        return False
    ctx.outcome, ctx.entity = "note_added", {"type": "ticket", "number": ticket.number}
    ctx.written = Written("ticket", ticket.id, ticket.number, None, created=False, text="")
    mark_processed(session, ctx)
    ctx.note("write", f"repeat {n} counted on {ticket.number}", "no note: repeats of an open alert only count")
    session.flush()
    return True


def mark_processed(session: Session, ctx: MailContext) -> None:
    """Record the mail's identity as processed. The store refuses the same mail twice (D1.5.1):
    a concurrent duplicate fails here, or where the batch writes its held-back rows (and the
    batch runs again); a later copy in this batch is told by the cache."""
    append_later(session, ProcessedMail, identity=ctx.identity, journal_id=ctx.journal_id)
    remember(session, ("processed", ctx.identity), ctx.journal_id)


def mail_text(ctx: MailContext, body: str) -> str:
    """`body` without the command lines at its top; with them listed, and why, when they did not apply (D4)."""
    if not ctx.commands or not ctx.commands.found:
        return body
    remaining = parse_commands(body).text  # the same lines sit at the top of the whole body
    if ctx.commands_apply:
        return remaining
    return not_applied_text(remaining, ctx.commands, ctx.commands_why)


def _sender_records(session: Session, ctx: MailContext, *,
                    with_ticket: bool) -> tuple[int, int | None, Contact | None]:
    """The account and contact the mail belongs to, creating what policy says to create.

    `with_ticket`: a contact to create is returned unwritten (the third value), for the caller to
    write with the new ticket (`add_inserted_with`) and then pass to `_contact_created` — unless
    the batch writes it with its other new senders' contacts (`new_contacts`).
    """
    s = ctx.sender
    if s.kind == "contact":
        return s.account_id, s.contact_id, None
    account_id = s.account_id
    if account_id is None:
        account_id = _default_account(session, ctx.mailbox.unknown_sender.default_account).id
    if s.kind == "new_contact":
        contact = Contact(email=s.address, name=s.name or "", account_id=account_id)
        if with_ticket and not expected(session, contact.email):
            return account_id, None, contact
        if add_new_contact(session, contact, Lookups(session).account_by_name) is None:
            contact = _contact_found(session, ctx, contact.email)
        else:
            _contact_created(session, ctx, contact)
        return contact.account_id, contact.id, None
    return account_id, None, None


def _contact_created(session: Session, ctx: MailContext, contact: Contact) -> None:
    _known_contact(session, contact, ctx.sender.account_name)
    ctx.note("write", "contact created", f"{ctx.sender.address} under {ctx.sender.account_name}")


def _known_contact(session: Session, contact: Contact, account_name: str | None) -> None:
    hold(session, contact)  # the ticket's contact, read by the notification plan
    # The notification plan reads it next (opted out?), and a later mail of the batch from the same address.
    remember(session, ("contact", contact.email.lower()),
             ContactInfo(contact.id, contact.name, contact.account_id, account_name, contact.notifications))


def _contact_found(session: Session, ctx: MailContext, email: str) -> Contact:
    """The contact another transaction wrote for `email` after this one asked, now committed.

    Two workers' batches can each hold a first mail from the same new sender; the second to
    write waits for the first to commit (`add_new`) and then takes its contact, instead of
    failing and running its whole batch again.
    """
    contact = session.scalars(select(Contact).where(Contact.email == email)).one()
    _known_contact(session, contact, contact.account.name)
    ctx.note("write", "contact found", f"{email}: written by another worker meanwhile")
    return contact


def _default_account(session: Session, name: str) -> Account:
    account = Lookups(session).account_by_name(name)
    if account is None:
        # Created on first use, maybe by two workers at once: the second takes the first's.
        account = add_new(session, Account(name=name), "name") \
            or session.scalars(select(Account).where(Account.name == name)).one()
        remember(session, ("account", name), hold(session, account))
    return account


def _queue_id(session: Session, name: str | None) -> int | None:
    if not name:
        return None
    queue = remembered(session, ("queue", name), lambda: session.scalar(select(Queue).where(Queue.name == name)))
    if queue is None:  # a queue named in mailboxes.toml is created on first use
        queue = Queue(name=name)
        session.add(queue)
        session.flush()
    return queue.id


def _note(session: Session, ctx: MailContext, entity_type: str, entity_id: int, body: str, internal: bool) -> Note:
    values = dict(entity_type=entity_type, entity_id=entity_id, author_name=ctx.sender.name or "",
                  author_email=ctx.sender.address, body=body, internal=internal, journal_id=ctx.journal_id,
                  body_html=ctx.parsed.body_html_sanitized)
    # A note is only appended; the notification plan reads it from this detached copy.
    return Note(id=append(session, Note, **values), **values)


def timeline_entry(session: Session, ctx: MailContext, entity_type: str, entity_id: int, who: str, what: str,
              from_value: str | None, to_value: str | None, at: datetime | None = None) -> None:
    append_later(session, TimelineEntry, entity_type=entity_type, entity_id=entity_id, who=who, what=what,
           from_value=from_value, to_value=to_value, journal_id=ctx.journal_id,
           # The mail's time, as for the lifecycle's entries: one clock per mail.
           at=utc(at or ctx.received_at))
