"""The ticket lifecycle (D2): the one place that says which status may follow which, and who may move it.

Three kinds of actor move a ticket:
- a **resource** whose mail passed the trust policy (its first update, `#status`,
  `#resolve`, `#wait until`, `#unassign`);
- a **customer** (a contact, or another sender allowed to write into the ticket): a reply,
  or the words `accept`, `reject: <reason>`, `close`. A reply and `reject` only reopen, so
  they need no authentication; `accept` and `close` end the ticket for good (nobody reopens
  a Closed ticket), so they count only from a mail that is vouched for (`ENDING_WORDS`);
- the **system**, on a clock: a `Waiting Until` date, the end of the feedback window,
  the optional auto-close after N days in `Waiting Customer`.

The decisions are plain functions of a ticket's state and a clock (`first_update`,
`resource_move`, `customer_move`, `due_move`); `apply_move` writes a decided move to a
ticket with its side effects (resolution who/when, wait date, SLA pause) and timeline
entries; `run_scheduled_transitions` is the maintenance job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.commands import DEFAULT_RESOLUTION, CustomerAnswer
from pipeline.config import STATUSES, Config, MailboxConfig
from pipeline.resolve_back.outbox import COMPLETED, record_completion
from pipeline.store.models import Resource, Ticket, TimelineEntry
from pipeline.store.rows import append_later

Actor = Literal["resource", "customer", "system", "monitor"]

OPEN = ("New", "In Progress", "Waiting Customer", "Waiting Until")
SYSTEM = "system"  # the `who` of scheduled transitions in the timeline
NO_RESPONSE = "no response from customer"

# Who may move a ticket from which status to which (D2). Nobody moves a Closed ticket:
# mail to it opens a new ticket linked to it.
TRANSITIONS: dict[Actor, dict[str, frozenset[str]]] = {
    # A verified resource works the ticket: any status to any other.
    "resource": {s: frozenset(t for t in STATUSES if t != s) for s in STATUSES if s != "Closed"},
    "customer": {
        "Waiting Customer": frozenset({"New", "Closed"}),  # their answer; `close`
        # A reply in the feedback window reopens; `reject` → In Progress; `accept`/`close` → Closed.
        "Resolved": frozenset({"New", "In Progress", "Closed"}),
        "New": frozenset({"Closed"}),  # `close`: a customer may close their own ticket
        "In Progress": frozenset({"Closed"}),
        "Waiting Until": frozenset({"Closed"}),
    },
    "system": {
        "Waiting Until": frozenset({"New"}),  # the date came
        "Resolved": frozenset({"Closed"}),  # the feedback window ended
        "Waiting Customer": frozenset({"Closed"}),  # auto-close: no answer for N days
    },
    # An RMM's alert mail on its own ticket (D9): a recovery completes it; the alert firing
    # again soon after (flapping) reopens it. Never a Closed ticket.
    "monitor": {
        **{s: frozenset({"Resolved"}) for s in OPEN},
        "Resolved": frozenset({"New"}),
    },
}


def refusal(actor: Actor, from_status: str, to_status: str) -> str | None:
    """Why `actor` may not move a ticket from `from_status` to `to_status`, or None when it may."""
    allowed = TRANSITIONS[actor].get(from_status, frozenset())
    if to_status in allowed:
        return None
    if from_status == "Closed":
        return "the ticket is Closed"
    return f"a {actor} may not move a ticket from {from_status} to {to_status}"


@dataclass(frozen=True)
class LifecycleSettings:
    """A mailbox's lifecycle settings (see MailboxConfig for what each means)."""

    feedback_window_days: float = 3
    auto_close_days: float = 0  # 0: never
    sla_pause_in_waiting_customer: bool = False
    # The RMM stages whose alert tickets are told back to the RMM when completed ([mailbox.resolve_back]).
    resolve_back: frozenset[str] = frozenset()

    @classmethod
    def of(cls, box: MailboxConfig | None) -> "LifecycleSettings":
        if box is None:
            return cls()
        return cls(box.feedback_window_days, box.auto_close_days, box.sla_pause_in_waiting_customer,
                   frozenset(box.resolve_back))


def settings_for(config: Config, mailbox: str | None) -> LifecycleSettings:
    """The settings of a ticket's source mailbox; the defaults when it is no longer configured."""
    box = next((b for b in config.mailboxes if b.name == mailbox), None)
    return LifecycleSettings.of(box)


@dataclass(frozen=True)
class TicketState:
    status: str
    status_changed_at: datetime | None = None
    wait_until: datetime | None = None
    resolved_at: datetime | None = None
    assigned: bool = False


@dataclass(frozen=True)
class Move:
    """A decided status change: where to, the timeline words, and what it carries."""

    to: str
    what: str
    actor: Actor
    resolution: str | None = None  # the resolution method, when it resolves (or auto-closes)
    until: datetime | None = None  # aware; for Waiting Until
    kind: str = ""  # the scheduler's count key


# -- decisions (plain functions) ----------------------------------------------------------------

def first_update(state: TicketState) -> Move | None:
    """A resource's first authenticated update of a New ticket moves it to In Progress (D2)."""
    if state.status != "New":
        return None
    return Move("In Progress", "first update by a resource", "resource")


def resource_move(state: TicketState, to: str, *, resolution: str | None = None,
                  until: datetime | None = None, now: datetime | None = None) -> Move | str | None:
    """`#status`, `#resolve`, `#wait until` as a Move, why it cannot be made, or None when it already holds.

    Asking for the status a ticket already has is no mistake (a first update just made it
    In Progress, say): nothing to do, and nothing to tell the sender.
    """
    if to == "Waiting Until":
        if until is None:
            return "Waiting Until needs a date"
        if now is not None and until <= now:
            return f"{until:%Y-%m-%d %H:%M %Z} has already passed"
    if to == state.status and to not in ("Resolved", "Waiting Until"):
        return None
    if to != state.status:
        why = refusal("resource", state.status, to)
        if why:
            return why
    if to == "Resolved":
        method = resolution or DEFAULT_RESOLUTION
        return Move("Resolved", f"resolved ({method})", "resource", resolution=method)
    if to == "Waiting Until":
        return Move("Waiting Until", f"waiting until {until:%Y-%m-%d %H:%M %Z}".strip(), "resource", until=until)
    return Move(to, "status changed", "resource")


def unassign_move(state: TicketState) -> Move | None:
    """Unassigning returns an open ticket to New, where the queue picks it up again (D2)."""
    if state.status in OPEN and state.status != "New":
        return Move("New", "returned to New (unassigned)", "resource")
    return None


def window_open(resolved_at: datetime | None, days: float, now: datetime) -> bool:
    """Is a Resolved ticket still in its feedback window at `now`?"""
    return resolved_at is not None and now < aware(resolved_at) + timedelta(days=days)


# The customer's words that close a ticket, which no mail can reopen: they count only from a mail
# that passed the trust policy (D8) or answers one of our notifications on that ticket (D2).
# Anyone can put the contact's address in a From: line.
ENDING_WORDS = frozenset({"accept", "close"})


def unvouched(word: str, status: str) -> str:
    """Why a customer's `accept` or `close` changed nothing: the mail is not vouched for."""
    return (f"`{word}` counts only from a mail that passed the trust policy or answers our notification "
            f"on this ticket; recorded as a note, the ticket stays {status}")


def customer_move(state: TicketState, answer: CustomerAnswer | None, settings: LifecycleSettings,
                  now: datetime, *, vouched: bool) -> tuple[Move | None, str]:
    """What a customer's reply (or their `accept`, `reject: reason`, `close`) does, and why.

    `vouched`: the mail passed the trust policy or answers our notification on this ticket.
    Without it `accept` and `close` change nothing at all — not even the reopening an
    ordinary reply in the feedback window makes: a forged word must leave no trace but its note.
    """
    s = state.status
    if answer and answer.word == "close":
        if s == "Closed":
            return None, "the ticket is already Closed"
        if not vouched:
            return None, unvouched("close", s)
        return Move("Closed", "closed by the customer", "customer"), "the customer closed it"
    if s == "Resolved" and window_open(state.resolved_at, settings.feedback_window_days, now):
        if answer and answer.word == "accept":
            if not vouched:
                return None, unvouched("accept", s)
            return Move("Closed", "resolution accepted", "customer"), "the customer accepted the resolution"
        if answer and answer.word == "reject":
            reason = answer.reason or "no reason given"
            return (Move("In Progress", f"resolution rejected: {reason}"[:100], "customer"),
                    f"the customer rejected the resolution: {reason}")
        # Someone is (or was) on it: back to them; otherwise to the queue.
        to = "In Progress" if state.assigned else "New"
        return Move(to, "reopened by the customer's reply", "customer"), "a reply in the feedback window reopens it"
    if answer:
        return None, f"`{answer.word}` only answers a Resolved ticket in its feedback window; the ticket is {s}"
    if s == "Waiting Customer":
        return Move("New", "the customer answered", "customer"), "the customer answered while it waited for them"
    return None, f"a customer's reply leaves a ticket in {s} as it is"


def due_move(state: TicketState, settings: LifecycleSettings, now: datetime) -> Move | None:
    """The scheduled transition that is due at `now`, if any (D2)."""
    if state.status == "Waiting Until" and state.wait_until is not None and aware(state.wait_until) <= now:
        return Move("New", "waiting period ended", "system", kind="waiting_until_ended")
    if (state.status == "Resolved" and state.resolved_at is not None
            and not window_open(state.resolved_at, settings.feedback_window_days, now)):
        return Move("Closed", "feedback window ended", "system", kind="feedback_window_ended")
    if (state.status == "Waiting Customer" and settings.auto_close_days > 0 and state.status_changed_at is not None
            and aware(state.status_changed_at) + timedelta(days=settings.auto_close_days) <= now):
        return Move("Closed", f"auto-closed after {settings.auto_close_days:g} days without an answer", "system",
                    resolution=NO_RESPONSE, kind="auto_closed")
    return None


def effective_status(state: TicketState, settings: LifecycleSettings, now: datetime) -> str:
    """The status the ticket has at `now`, counting scheduled transitions the beat has not run yet.

    So whether a late reply reopens a ticket or opens a new one never depends on when the
    maintenance task last ran.
    """
    move = due_move(state, settings, now)
    return move.to if move else state.status


def state_of(ticket: Ticket) -> TicketState:
    return TicketState(ticket.status, ticket.status_changed_at, ticket.wait_until, ticket.resolved_at,
                       ticket.assigned_resource_id is not None)


# -- writing a decided move ---------------------------------------------------------------------

def apply_move(session: Session, ticket: Ticket, move: Move, *, who: str, now: datetime,
               settings: LifecycleSettings, journal_id: int | None = None) -> None:
    """Set the status and what goes with it; every change a timeline entry (D2)."""
    now = utc(now)
    before = ticket.status
    why = None if move.to == before else refusal(move.actor, before, move.to)
    if why:  # callers decide first; this guards the table against a caller's mistake
        raise ValueError(why)
    if before == "Waiting Customer" and move.to != before and ticket.sla_paused_at is not None:
        paused = now - aware(ticket.sla_paused_at)
        ticket.sla_paused_seconds = (ticket.sla_paused_seconds or 0) + max(0, int(paused.total_seconds()))
        ticket.sla_paused_at = None
        timeline(session, ticket, who, "SLA clock resumed", None, None, now, journal_id)
    ticket.status = move.to
    ticket.status_changed_at = now
    ticket.updated_at = now
    ticket.wait_until = move.until.astimezone(timezone.utc) if move.until else None
    if move.resolution:
        ticket.resolution_method = move.resolution
        ticket.resolved_at, ticket.resolved_by = now, who
        if ticket.first_resolved_at is None:  # reopened and resolved again: the first stays
            ticket.first_resolved_at, ticket.first_resolved_by = now, who
    timeline(session, ticket, who, move.what, before, move.to, now, journal_id)
    # An alert's ticket completed: tell its RMM, in this transaction (pipeline/resolve_back/). Not
    # when the monitor itself completed it: its recovery mail means the RMM knows already.
    if (ticket.alert_key and settings.resolve_back and move.actor != "monitor"
            and before in OPEN and move.to in COMPLETED):
        record_completion(session, ticket, settings.resolve_back, resolution=move.resolution or move.what,
                          journal_id=journal_id)
    if move.to == "Waiting Customer" and before != move.to and settings.sla_pause_in_waiting_customer:
        ticket.sla_paused_at = now
        timeline(session, ticket, who, "SLA clock paused", None, None, now, journal_id)


def assign(session: Session, ticket: Ticket, resource: Resource | None, *, who: str, now: datetime,
           journal_id: int | None = None) -> bool:
    """(Un)assign; returns False when nothing changed."""
    now = utc(now)
    old = ticket.assigned_resource
    if (old.id if old else None) == (resource.id if resource else None):
        return False
    ticket.assigned_resource_id = resource.id if resource else None
    ticket.assigned_resource = resource
    ticket.updated_at = now
    timeline(session, ticket, who, "assigned" if resource else "unassigned",
             old.email if old else None, resource.email if resource else None, now, journal_id)
    return True


def timeline(session: Session, ticket: Ticket, who: str, what: str, from_value: str | None,
             to_value: str | None, at: datetime, journal_id: int | None) -> None:
    # Nobody needs its id: held back with the mail's other entries where the batch holds rows back,
    # so the timeline's ids keep the order its entries came in.
    append_later(session, TimelineEntry, entity_type="ticket", entity_id=ticket.id, who=who, what=what[:100],
                 from_value=from_value, to_value=to_value, at=utc(at), journal_id=journal_id)


# -- the maintenance job ------------------------------------------------------------------------

SCHEDULED_KINDS = ("waiting_until_ended", "feedback_window_ended", "auto_closed")


def run_scheduled_transitions(session: Session, config: Config, now: datetime) -> dict[str, int]:
    """Make every scheduled transition due at `now`; returns counts by kind.

    Idempotent: a ticket moved once is no longer due, so a second run (or a second
    worker) at the same `now` moves nothing. Runs in the caller's transaction; rows are
    locked (and rows another worker holds skipped) on PostgreSQL. The clock is `now`,
    so tests move it instead of sleeping.
    """
    now = utc(now)
    counts = dict.fromkeys(SCHEDULED_KINDS, 0)
    windows = [settings_for(config, b.name).feedback_window_days for b in config.mailboxes]
    earliest_resolved = now - timedelta(days=min(windows + [LifecycleSettings().feedback_window_days]))
    closes = [b.auto_close_days for b in config.mailboxes if b.auto_close_days > 0]
    candidates = [
        (Ticket.status == "Waiting Until") & (Ticket.wait_until <= now),
        (Ticket.status == "Resolved") & (Ticket.resolved_at <= earliest_resolved),
    ]
    if closes:
        candidates.append((Ticket.status == "Waiting Customer")
                          & (Ticket.status_changed_at <= now - timedelta(days=min(closes))))
    for condition in candidates:
        query = select(Ticket).where(condition).order_by(Ticket.id).with_for_update(skip_locked=True)
        for ticket in session.scalars(query):
            settings = settings_for(config, ticket.source_mailbox)
            move = due_move(state_of(ticket), settings, now)
            if move is None:
                continue
            apply_move(session, ticket, move, who=SYSTEM, now=now, settings=settings)
            counts[move.kind] += 1
    session.flush()
    return counts


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything mailloop stores is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def utc(value: datetime) -> datetime:
    # SQLite keeps the wall-clock digits and drops the offset: store and compare in UTC only.
    return aware(value).astimezone(timezone.utc)
