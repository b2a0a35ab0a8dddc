"""The write stage's work (D1.6): everything a mail changes, in the caller's transaction."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.commands import Command, CommandFailure, not_applied_text, parse_commands
from pipeline.context import MailContext, Written
from pipeline.lifecycle import (
    SYSTEM,
    apply_move,
    assign,
    customer_move,
    due_move,
    first_update,
    resource_move,
    settings_for,
    state_of,
    unassign_move,
    utc,
)
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
    Project,
    Queue,
    Resource,
    Task,
    Ticket,
    TimeEntry,
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
        text = mail_text(ctx, mail.body_text)
        ticket = Ticket(
            number=allocate_number(session, "ticket", ctx.config.settings.numbering, now),
            title=title[:500],
            # An unverified mail never speaks to customers: its text goes to an internal note.
            description="" if target.internal else text,
            status=defaults.status,
            status_changed_at=utc(ctx.received_at),
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
            note = _note(session, ctx, entity_type, entity_id, text, internal=True)
        ctx.outcome = "ticket_created"
    else:
        entity_type, entity_id, number = target.entity_type, target.entity_id, target.number
        text = mail_text(ctx, mail.body_new)
        note = _note(session, ctx, entity_type, entity_id, text, internal=target.internal)
        _timeline(session, ctx, entity_type, entity_id, who, "note added", None, None)
        if entity_type == "ticket":
            session.get(Ticket, entity_id).updated_at = now
        ctx.outcome = "note_added"
    ctx.entity = {"type": entity_type, "number": number}
    # A time entry's summary is what the sender newly wrote, without the command lines (D4).
    summary = ctx.commands.text if ctx.commands and ctx.commands.found else mail.body_new
    ctx.written = Written(entity_type, entity_id, number, note.id if note else None,
                          created=target.kind == "new_ticket", text=summary.strip())

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


def mail_text(ctx: MailContext, body: str) -> str:
    """`body` without the command lines at its top; with them listed, and why, when they did not apply (D4)."""
    if not ctx.commands or not ctx.commands.found:
        return body
    remaining = parse_commands(body).text  # the same lines sit at the top of the whole body
    if ctx.commands_apply:
        return remaining
    return not_applied_text(remaining, ctx.commands, ctx.commands_why)


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
              from_value: str | None, to_value: str | None, at: datetime | None = None) -> None:
    session.add(TimelineEntry(entity_type=entity_type, entity_id=entity_id, who=who, what=what,
                              from_value=from_value, to_value=to_value, journal_id=ctx.journal_id,
                              # The mail's time, as for the lifecycle's entries: one clock per mail.
                              at=utc(at or ctx.received_at)))


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


# -- the lifecycle and commands of one mail (D2, D4), after the note is written -------------------

def apply_changes(session: Session, ctx: MailContext) -> None:
    """Scheduled moves that were due, a resource's first update, commands, a customer's answer.

    In this order, so that `#status` in a resource's first update has the last word (D2).
    Every failed command is told to its sender in a `command_failed` notification, in
    this same transaction.
    """
    w = ctx.written
    now = utc(ctx.received_at)  # the mail's clock decides (and an import's clock is the mail's date)
    linked = session.get(Ticket, ctx.target.link_to_ticket_id) if ctx.target.link_to_ticket_id else None
    if linked is not None:
        _catch_up(session, ctx, linked, now)  # e.g. its feedback window ended: close it now
    ticket = session.get(Ticket, w.entity_id) if w.entity_type == "ticket" else None
    existing = ticket if ticket is not None and not w.created else None
    if existing is not None:
        _catch_up(session, ctx, existing, now)
    before = ticket.status if ticket is not None else None
    authenticated = ctx.sender.kind == "resource" and ctx.trust.passed
    if existing is not None and authenticated:
        _first_update(session, ctx, existing, now)
    failures: list[CommandFailure] = []
    if ctx.commands_apply and ctx.commands is not None:
        failures = list(ctx.commands.failures) + _apply_commands(session, ctx, ticket, now)
        for f in failures:
            ctx.note("apply", f"failed: line {f.line}", f"{f.text}: {f.why}")
        if ticket is not None and ticket.status == "Resolved" and before != "Resolved":
            _resolved_notice(session, ctx, ticket)
    elif existing is not None and ctx.sender.kind != "resource":
        _customer(session, ctx, existing, now)
    if failures:
        _command_failed(session, ctx, failures)


def _catch_up(session: Session, ctx: MailContext, ticket: Ticket, now: datetime) -> None:
    settings = settings_for(ctx.config, ticket.source_mailbox)
    move = due_move(state_of(ticket), settings, now)
    if move is not None:
        apply_move(session, ticket, move, who=SYSTEM, now=now, settings=settings, journal_id=ctx.journal_id)
        ctx.note("apply", f"{ticket.number}: {move.to}", f"{move.what} (due before this mail)")


def _first_update(session: Session, ctx: MailContext, ticket: Ticket, now: datetime) -> None:
    move = first_update(state_of(ticket))
    if move is None:
        return
    who = ctx.sender.address
    # An assignee chosen before (by #assign) keeps the ticket; otherwise it is the updater's.
    if ticket.assigned_resource_id is None:
        assign(session, ticket, session.get(Resource, ctx.sender.resource_id), who=who, now=now,
               journal_id=ctx.journal_id)
    apply_move(session, ticket, move, who=who, now=now, settings=settings_for(ctx.config, ticket.source_mailbox),
               journal_id=ctx.journal_id)
    ctx.note("apply", "In Progress", f"first authenticated update by a resource: assigned to "
             f"{ticket.assigned_resource.email}")


def _customer(session: Session, ctx: MailContext, ticket: Ticket, now: datetime) -> None:
    settings = settings_for(ctx.config, ticket.source_mailbox)
    answer = ctx.customer_answer
    s = ctx.sender
    own = s.contact_id is not None and (s.contact_id == ticket.contact_id
                                        or (s.account_id == ticket.account_id and not s.account_is_default))
    if answer and not own:
        # Someone merely copied on the ticket may reply, but accepting or closing is the customer's word.
        ctx.note("apply", f"`{answer.word}` read as a reply", "the sender is not the ticket's contact or of its account")
        answer = None
    move, why = customer_move(state_of(ticket), answer, settings, now)
    if move is None:
        ctx.note("apply", "no status change", why)
        return
    apply_move(session, ticket, move, who=ctx.sender.address, now=now, settings=settings, journal_id=ctx.journal_id)
    ctx.note("apply", move.to, why)


def _apply_commands(session: Session, ctx: MailContext, ticket: Ticket | None, now: datetime) -> list[CommandFailure]:
    """Apply a resource's parsed commands in line order; returns the ones that failed, and why."""
    commands = ctx.commands.commands
    roles = _RoleCheck(session, session.get(Resource, ctx.sender.resource_id))
    mail_role, role_failed, failures = _mail_role(commands, roles)
    settings = settings_for(ctx.config, ticket.source_mailbox) if ticket else None
    for c in commands:
        if c.name == "role":
            continue  # read above: it only says which role this mail's time entries take
        if c.name == "time":
            why = _time_entry(session, ctx, c, roles, mail_role, role_failed, now)
        elif ticket is None:
            why = f"{_SPELLING[c.name]} applies to tickets; on a {ctx.written.entity_type} only #time and #role apply"
        elif c.name in ("status", "resolve", "wait_until"):
            why = _status(session, ctx, ticket, c, settings, now)
        elif c.name == "assign":
            why = _assign(session, ctx, ticket, c.value, now)
        elif c.name == "unassign":
            why = _unassign(session, ctx, ticket, settings, now)
        else:  # priority
            why = _priority(session, ctx, ticket, c.value, now)
        if why is None:
            ctx.note("apply", f"applied line {c.line}", c.text)
        else:
            failures.append(CommandFailure(c.line, c.text, why))
    return sorted(failures, key=lambda f: f.line)


def _mail_role(commands: list[Command], roles: "_RoleCheck") -> tuple[str | None, CommandFailure | None,
                                                                       list[CommandFailure]]:
    """The role of this mail's time entries: the last `#role`/`#R=`, else the resource's default (D4).

    Returns the role, the failure of the last `#role` if it named no role (its entries are
    then not logged: a role is never guessed), and every failure found.
    """
    role_cmds = [c for c in commands if c.name == "role"]
    mail_role, role_failed, failures = roles.default, None, []
    for c in role_cmds:
        role, why = roles.canonical(c.value)
        if role is None:
            role_failed = CommandFailure(c.line, c.text, why)
            failures.append(role_failed)
        else:
            mail_role, role_failed = role, None
    if role_cmds and not any(c.name == "time" for c in commands):
        last = role_cmds[-1]
        failures.append(CommandFailure(last.line, last.text,
                                       "a role is for this mail's time entry, and it logs no time (add #time)"))
    return mail_role, role_failed, failures


def _assign(session: Session, ctx: MailContext, ticket: Ticket, address: str, now: datetime) -> str | None:
    resource = session.scalar(select(Resource).where(Resource.email == address))
    if resource is None:
        return f"no resource has the address {address}"
    if not assign(session, ticket, resource, who=ctx.sender.address, now=now, journal_id=ctx.journal_id):
        ctx.note("apply", "nothing to do", f"the ticket is already assigned to {address}")
    return None


_SPELLING = {"status": "#status", "resolve": "#resolve", "wait_until": "#wait until", "assign": "#assign",
             "unassign": "#unassign", "priority": "#priority"}


class _RoleCheck:
    """Does a role exist for this resource? Its own roles, else any resource's (D3, D4)."""

    def __init__(self, session: Session, resource: Resource) -> None:
        self.own = list(resource.roles or [])
        self.known = self.own or sorted({r for roles in session.scalars(select(Resource.roles)) for r in roles or []})
        self.email = resource.email
        self.default = resource.default_role

    def canonical(self, value: str) -> tuple[str | None, str]:
        if not self.known:  # a directory without roles: nothing to check against
            return value, ""
        for role in self.known:
            if role.lower() == " ".join(value.split()).lower():
                return role, ""
        return None, f"no role {value!r} for {self.email} (roles: {', '.join(self.known)})"


def _time_entry(session: Session, ctx: MailContext, c: Command, roles: _RoleCheck, mail_role: str | None,
                role_failed: CommandFailure | None, now: datetime) -> str | None:
    if c.role is not None:
        role, why = roles.canonical(c.role)
        if role is None:
            return f"not logged: {why}"
    elif role_failed is not None:  # never guess another role for a role that failed
        return f"not logged: the role on line {role_failed.line} does not exist"
    else:
        role = mail_role
    w = ctx.written
    billable = True if c.billable is None else c.billable
    session.add(TimeEntry(entity_type=w.entity_type, entity_id=w.entity_id, resource_id=ctx.sender.resource_id,
                          hours=c.hours, role=role, billable=billable, summary=w.text, date=now, note_id=w.note_id))
    _timeline(session, ctx, w.entity_type, w.entity_id, ctx.sender.address, "time entry", None,
              f"{c.hours:g} h" + (f" {role}" if role else "") + ("" if billable else " (not billable)"), at=now)
    return None


def _status(session: Session, ctx: MailContext, ticket: Ticket, c: Command, settings, now: datetime) -> str | None:
    until = None
    if c.name == "wait_until":
        until = c.until.replace(tzinfo=ZoneInfo(ctx.config.settings.numbering.timezone))
    to = {"resolve": "Resolved", "wait_until": "Waiting Until"}.get(c.name, c.value)
    move = resource_move(state_of(ticket), to, resolution=c.value if c.name == "resolve" else None,
                         until=until, now=now)
    if move is None:
        ctx.note("apply", f"line {c.line}: nothing to do", f"the ticket is already {to}")
        return None
    if isinstance(move, str):
        return move
    apply_move(session, ticket, move, who=ctx.sender.address, now=now, settings=settings, journal_id=ctx.journal_id)
    return None


def _unassign(session: Session, ctx: MailContext, ticket: Ticket, settings, now: datetime) -> str | None:
    if not assign(session, ticket, None, who=ctx.sender.address, now=now, journal_id=ctx.journal_id):
        ctx.note("apply", "nothing to do", "the ticket is not assigned")
        return None
    move = unassign_move(state_of(ticket))
    if move is not None:
        apply_move(session, ticket, move, who=ctx.sender.address, now=now, settings=settings,
                   journal_id=ctx.journal_id)
    return None


def _priority(session: Session, ctx: MailContext, ticket: Ticket, priority: str, now: datetime) -> str | None:
    if ticket.priority == priority:
        ctx.note("apply", "nothing to do", f"the priority is already {priority}")
        return None
    _timeline(session, ctx, "ticket", ticket.id, ctx.sender.address, "priority changed", ticket.priority, priority,
              at=now)
    ticket.priority = priority
    ticket.updated_at = now
    return None


def _command_failed(session: Session, ctx: MailContext, failures: list[CommandFailure]) -> None:
    """Tell the sender which line failed and why (D4); never to a sender we must not answer."""
    if ctx.no_answer or not ctx.mailbox.notifications.command_failed:
        ctx.note("apply", "sender not told", ctx.no_answer or "command_failed notifications are off")
        return
    w = ctx.written
    numbering = ctx.config.settings.numbering
    tag = ticket_tag(numbering, w.number) if w.entity_type == "ticket" else f"[{w.entity_type.title()}#{w.number}]"
    title = _entity_title(session, w.entity_type, w.entity_id)
    failed = {(f.line, f.text) for f in failures}
    applied = [c.text for c in ctx.commands.commands if (c.line, c.text) not in failed]
    body = render("command_failed", recipient_name=ctx.sender.name, subject=ctx.parsed.subject, number=w.number,
                  entity_label=w.entity_type, failures=failures, applied=applied, mailbox=_mailbox_view(ctx))
    d = draft("command_failed", mailbox=ctx.mailbox, recipients=[(ctx.sender.address, "sender")],
              subject=f"{tag} Command failed: {title}", body=body, mail=ctx.parsed, entity_type=w.entity_type,
              entity_id=w.entity_id, number=w.number, journal_id=ctx.journal_id)
    if d is not None:
        store_draft(session, d, ctx)


def _resolved_notice(session: Session, ctx: MailContext, ticket: Ticket) -> None:
    """Tell the contact: the resolution, and how to accept or reject it in the feedback window (D2)."""
    contact = ticket.contact
    if ctx.no_answer or not ctx.mailbox.notifications.ticket_resolved or contact is None or not contact.notifications:
        return
    settings = settings_for(ctx.config, ticket.source_mailbox)
    body = render("ticket_resolved", recipient_name=contact.name, number=ticket.number, title=ticket.title,
                  resolver=ctx.sender.name or ctx.sender.address, note=ctx.written.text,
                  days=settings.feedback_window_days, mailbox=_mailbox_view(ctx))
    tag = ticket_tag(ctx.config.settings.numbering, ticket.number)
    d = draft("ticket_resolved", mailbox=ctx.mailbox, recipients=[(contact.email, "contact")],
              subject=f"{tag} Resolved: {ticket.title}", body=body, mail=ctx.parsed, entity_type="ticket",
              entity_id=ticket.id, number=ticket.number, journal_id=ctx.journal_id)
    if d is not None:
        store_draft(session, d, ctx)


def _entity_title(session: Session, entity_type: str, entity_id: int) -> str:
    if entity_type == "ticket":
        return session.get(Ticket, entity_id).title
    if entity_type == "task":
        return session.get(Task, entity_id).title
    return session.get(Project, entity_id).name
