"""Who a notification goes to (D1.7): roles resolved to addresses, minus those we must never write to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Select, bindparam, func, literal, select
from sqlalchemy.orm import Session

from pipeline.config import Config
from pipeline.store.lookups import Lookups, cached, remember, remembered
from pipeline.store.models import (
    Account,
    Notification,
    NotificationRecipient,
    QueueMember,
    Resource,
    Ticket,
)

# Addresses that are machines, not people: answering them feeds bounces and loops.
_MACHINE = re.compile(
    r"^(?:mailer-daemon|mail-daemon|mailerdaemon|postmaster|bounces?|bounce[+-].*|.*-bounces?(?:\+.*)?"
    r"|no-?reply|do-?not-?reply|noreply[+-].*|no-reply[+-].*|auto-?reply|autoresponder|microsoftexchange[0-9a-f]*"
    r"|mail\.delivery\.system)@", re.IGNORECASE)

# The events that answer a mail automatically: the ones a loop with another system is made of.
ANSWERS = ("ticket_created", "sender_rejected", "command_failed")


@dataclass(frozen=True)
class Recipient:
    email: str
    role: str
    name: str = ""

    def view(self) -> dict[str, str]:
        return {"name": self.name, "email": self.email, "role": self.role}


def by_roles(session: Session, roles: list[str], *, sender: Recipient | None, ticket: Ticket | None) -> list[Recipient]:
    """The addresses behind each role (or explicit address), in the order the roles are listed."""
    out: list[Recipient] = []
    for role in roles:
        if "@" in role:
            out.append(Recipient(role, "explicit"))
        elif role == "sender" and sender is not None:
            out.append(sender)
        elif ticket is not None:
            out.extend(_ticket_role(session, role, ticket))
    return out


def _ticket_role(session: Session, role: str, ticket: Ticket) -> list[Recipient]:
    if role == "contact" and ticket.contact is not None:
        return [Recipient(ticket.contact.email, role, ticket.contact.name)]
    if role == "primary_resource" and ticket.assigned_resource is not None:
        return [Recipient(ticket.assigned_resource.email, role, ticket.assigned_resource.name)]
    if role == "queue_members" and ticket.queue_id is not None:
        members = session.scalars(select(Resource).join(QueueMember, QueueMember.resource_id == Resource.id)
                                  .where(QueueMember.queue_id == ticket.queue_id).order_by(Resource.email))
        return [Recipient(r.email, role, r.name) for r in members]
    if role == "account_manager":
        manager = session.scalar(select(Resource).join(Account, Account.manager_id == Resource.id)
                                 .where(Account.id == ticket.account_id))
        return [Recipient(manager.email, role, manager.name)] if manager else []
    return []


def own_addresses(config: Config) -> set[str]:
    """Every address mailloop receives or sends as: writing to one feeds mail back into a mailbox."""
    own = set()
    for box in config.mailboxes:
        own.add(box.address.lower())
        if box.notifications.from_address:
            own.add(box.notifications.from_address.lower())
    return own


def address_problem(config: Config, r: Recipient) -> str | None:
    """Why the address itself must never get a notification, or None."""
    if r.email in own_addresses(config):
        return "one of our own mailbox addresses"
    if _MACHINE.match(r.email):
        return "a machine address (bounces, auto-responders, no-reply)"
    return None


def opted_out(session: Session, email: str) -> str | None:
    contact = Lookups(session).contact(email)  # usually the mail's sender, read already
    return "the contact has opted out of notifications" if contact is not None and not contact.notifications else None


# Built once, run through Core: it runs for every answer planned (bench/README.md, issue 10).
_N, _R = Notification.__table__, NotificationRecipient.__table__


def _answers(columns: list[Any], to: Any, since: Any) -> Select:
    """Automatic answers to the addresses `to` selects, sent as replies to their own mail, since `since`."""
    return (
        select(*columns).select_from(_N.join(_R, _R.c.notification_id == _N.c.id))
        # The events as a list of binds, not one expanding IN: that is rendered again at every execution.
        .where(to, _R.c.role == "sender", _N.c.event.in_([literal(e) for e in ANSWERS]), _N.c.created_at >= since)
    )


def answers_to(email: str = "email") -> Select:
    """The count of automatic answers to the address bound as `email` since the time bound as `since`."""
    return _answers([func.count()], _R.c.email == bindparam(email), bindparam("since"))


_ANSWERS_TO = answers_to()


def answers_in_window(session: Session, email: str, window_seconds: int, now: datetime | None = None) -> int:
    """Automatic answers to mail from `email` in the last `window_seconds`, across all mailboxes.

    Only answers to the address as a mail's sender count: a technician copied on many new
    tickets as a queue member is no loop.
    """
    since = (now or datetime.now(timezone.utc)) - timedelta(seconds=window_seconds)
    return session.connection().execute(_ANSWERS_TO, {"email": email, "since": since}).scalar() or 0


def answers_so_far(session: Session, email: str, window_seconds: int) -> int:
    """`answers_in_window`, asked of the store once per transaction and address (for a batch's
    senders all at once, `prefetch_answers`); the transaction's own answers are added as it
    stores them (`count_answer`), so a batch's sixth answer is held back as the sixth mail alone is.

    The window's start is taken when the store is asked: an answer that ages out of it while the
    batch runs (a fraction of a second) still counts, which errs towards holding back.
    """
    def ask() -> int:
        from pipeline.store.rows import flush_appended

        flush_appended(session)  # recipient rows the batch holds back count as well
        return answers_in_window(session, email, window_seconds)

    return remembered(session, ("answers", email, window_seconds), ask)


def count_answer(session: Session, email: str, window_seconds: int) -> None:
    """An automatic answer to `email` was just stored in this transaction."""
    key = ("answers", email, window_seconds)
    known = cached(session, key)
    if known is not None:  # else the next `answers_so_far` asks the store, which has the row
        remember(session, key, known + 1)


def prefetch_answers(session: Session, asked: list[tuple[str, int]]) -> None:
    """`answers_so_far` of each (address, window) in one statement per window: a batch's senders."""
    by_window: dict[int, set[str]] = {}
    for email, window in asked:
        by_window.setdefault(window, set()).add(email)
    for window, emails in by_window.items():
        since = datetime.now(timezone.utc) - timedelta(seconds=window)
        counts = dict(session.connection().execute(
            _answers([_R.c.email, func.count()], _R.c.email.in_(sorted(emails)), since).group_by(_R.c.email)).all())
        for email in emails:
            remember(session, ("answers", email, window), counts.get(email, 0))


def unique(recipients: list[Recipient]) -> list[Recipient]:
    """First mention wins: one copy per address, lower-cased."""
    seen: set[str] = set()
    out = []
    for r in recipients:
        email = r.email.lower().strip()
        if email and email not in seen:
            seen.add(email)
            out.append(Recipient(email, r.role, r.name))
    return out
