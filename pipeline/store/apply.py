"""The lifecycle and commands of one mail (D2, D4), applied after its note is written, same transaction."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.commands import Command, CommandFailure
from pipeline.context import MailContext
from pipeline.lifecycle import (
    ENDING_WORDS,
    OPEN,
    SYSTEM,
    Move,
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
from pipeline.notify.plan import command_failed_notice, resolved_notice
from pipeline.parsers.rmm import AlertRecord, alert_of
from pipeline.store.models import (
    Resource,
    Ticket,
    TimeEntry,
)
from pipeline.store.write import timeline_entry


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
    alert = alert_of(ctx)
    if alert is not None:
        # A monitoring system's mail is no customer's answer and carries no commands (D9).
        if existing is not None:
            _alert_move(session, ctx, existing, alert, now)
        return
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
            resolved_notice(session, ctx, ticket)
    elif existing is not None and ctx.sender.kind != "resource":
        _customer(session, ctx, existing, now)
    if failures:
        command_failed_notice(session, ctx, failures)


def _alert_move(session: Session, ctx: MailContext, ticket: Ticket, alert: AlertRecord, now: datetime) -> None:
    """A recovery completes the alert's ticket; the alert firing again soon after reopens it (flapping)."""
    settings = settings_for(ctx.config, ticket.source_mailbox)
    who = ctx.sender.address
    if alert.recovered and ticket.status in OPEN:
        move = Move("Resolved", "alert recovered", "monitor", resolution="alert recovered")
        apply_move(session, ticket, move, who=who, now=now, settings=settings, journal_id=ctx.journal_id)
        ticket.recovered_at = now
        ctx.note("apply", f"{ticket.number}: Resolved", f"recovery of {alert.key}")
    elif not alert.recovered and ticket.status == "Resolved":
        move = Move("New", "alert fired again after recovery (flapping)", "monitor")
        apply_move(session, ticket, move, who=who, now=now, settings=settings, journal_id=ctx.journal_id)
        ctx.note("apply", f"{ticket.number}: New", f"{alert.key} fired again within the flap window")


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
    vouched = _vouched_by(ctx, ticket)
    move, why = customer_move(state_of(ticket), answer, settings, now, vouched=vouched is not None)
    if move is None:
        ctx.note("apply", "no status change", why)
        return
    apply_move(session, ticket, move, who=ctx.sender.address, now=now, settings=settings, journal_id=ctx.journal_id)
    ctx.note("apply", move.to, f"{why} ({vouched})" if answer and answer.word in ENDING_WORDS else why)


def _vouched_by(ctx: MailContext, ticket: Ticket) -> str | None:
    """What vouches for a customer's `accept` or `close` in this mail (D2), or None."""
    assert ctx.trust is not None and ctx.target is not None, "the authenticate and resolve stages have run"
    if ctx.trust.passed:
        return "the mail passed the trust policy"
    if ctx.target.answers_notification:  # the resolve stage asked the store (Resolve._vouch)
        return f"the mail answers our notification on {ticket.number}"
    return None


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
    timeline_entry(session, ctx, w.entity_type, w.entity_id, ctx.sender.address, "time entry", None,
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
    timeline_entry(session, ctx, "ticket", ticket.id, ctx.sender.address, "priority changed", ticket.priority, priority,
              at=now)
    ticket.priority = priority
    ticket.updated_at = now
    return None

