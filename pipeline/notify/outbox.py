"""Drafts for the outbox (D1.6–7): one per recipient, with its Message-ID fixed before anything is sent.

Sending them after commit is the notify task's job (pipeline/notify/send.py); a resend
reuses the Message-ID recorded here, so a client can drop the rare duplicate.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Insert, bindparam, insert, select, union_all
from sqlalchemy.orm import Session

from pipeline.config import MailboxConfig, NumberingSettings
from pipeline.notify.recipients import Recipient, answers_to
from pipeline.notify.templates import Rendered
from pipeline.parsers.mime import ParsedMail
from pipeline.parsers.references import outbound_message_id
from pipeline.store.models import Notification, NotificationRecipient

_N, _R = Notification.__table__, NotificationRecipient.__table__

# How many References a notification carries: enough to thread, short enough for any server.
MAX_REFERENCES = 20


@dataclass
class Draft:
    event: str
    recipients: list[tuple[str, str]]  # (address, role); one per draft
    subject: str
    body_text: str
    message_id: str
    in_reply_to: str | None
    references: str | None
    entity_type: str | None = None
    entity_id: int | None = None
    body_html: str | None = None
    extra: dict = field(default_factory=dict)


def ticket_tag(numbering: NumberingSettings, number: str) -> str:
    return numbering.ticket_tag.format(number=number)


def entity_tag(numbering: NumberingSettings, entity_type: str, number: str) -> str:
    """The subject tag the extract stage recognises: the configured ticket tag, or [Task#…]/[Project#…]."""
    return ticket_tag(numbering, number) if entity_type == "ticket" else f"[{entity_type.title()}#{number}]"


def sender_address(mailbox: MailboxConfig) -> str:
    return (mailbox.notifications.from_address or mailbox.address).lower()


def new_message_id(mailbox: MailboxConfig, event: str, entity_type: str | None, number: str | None,
                   journal_id: int | None) -> str:
    """Ours, recognisable in a reply's In-Reply-To/References (D1.4), and unguessable (D8)."""
    domain = sender_address(mailbox).rsplit("@", 1)[-1]
    token = secrets.token_hex(8)
    if entity_type and number:
        return outbound_message_id(entity_type, number, journal_id or 0, token, domain)  # type: ignore[arg-type]
    return f"<mailloop+{event}+n{journal_id or 0}+{token}@{domain}>"


def threading(session: Session, mail: ParsedMail | None, entity_type: str | None,
              entity_id: int | None) -> tuple[str | None, str | None]:
    """In-Reply-To and References: the mail answered, after the entity's first notification.

    The first notification leads, so that a notice caused by someone else's mail (a
    technician resolving the ticket) still threads under the customer's first answer from us.
    """
    refs: list[str] = []
    if entity_type and entity_id is not None:
        first = session.scalar(select(Notification.message_id).where(
            Notification.entity_type == entity_type, Notification.entity_id == entity_id).order_by(
            Notification.id).limit(1))
        if first:
            refs.append(first)
    in_reply_to = None
    if mail is not None and mail.message_id:
        in_reply_to = mail.message_id
        refs += [r for r in mail.references if r != mail.message_id] + [mail.message_id]
    refs = list(dict.fromkeys(refs))
    if len(refs) > MAX_REFERENCES:
        refs = refs[:1] + refs[-(MAX_REFERENCES - 1):]
    return in_reply_to, " ".join(refs) or None


def draft(event: str, *, mailbox: MailboxConfig, recipient: Recipient, rendered: Rendered,
          threads: tuple[str | None, str | None], entity_type: str | None, entity_id: int | None,
          number: str | None, journal_id: int | None) -> Draft:
    in_reply_to, references = threads
    return Draft(event, [(recipient.email, recipient.role)], rendered.subject, rendered.text,
                 new_message_id(mailbox, event, entity_type, number, journal_id), in_reply_to, references,
                 entity_type, entity_id, rendered.html)


# -- one outbox row and its recipients in one round trip (PostgreSQL) ---------------------------

# The columns an outbox row is written with; the rest stay NULL until it is sent.
OUTBOX_COLUMNS = ("event", "entity_type", "entity_id", "journal_id", "mailbox", "from_address", "subject",
                  "body_text", "body_html", "message_id", "in_reply_to", "references", "status", "attempts",
                  "created_at")


@cache
def _outbox_insert(recipients: int, guarded: int) -> Insert:
    """WITH n AS (INSERT INTO notifications … SELECT … WHERE <answers to each guarded sender> < :limit
    RETURNING id) INSERT INTO notification_recipients SELECT n.id, … — built once per shape.

    Three statements (the loop breaker's count, the row, its recipients) were three of a new
    ticket's eleven round trips, and on this machine a round trip after a mail's work costs
    2–4 times one made back to back (bench/round_trip.py). The count and the insert run in one
    statement, so what the breaker counts is what it would have counted a statement earlier.
    """
    row = select(*[bindparam(f"n_{c}", type_=_N.c[c].type) for c in OUTBOX_COLUMNS])
    for i in range(guarded):
        row = row.where(answers_to(f"guard_{i}").scalar_subquery() < bindparam("limit"))
    new = insert(_N).from_select(list(OUTBOX_COLUMNS), row).returning(_N.c.id).cte("new_notification")
    rows = union_all(*[select(new.c.id, bindparam(f"email_{i}", type_=_R.c.email.type),
                              bindparam(f"role_{i}", type_=_R.c.role.type)) for i in range(recipients)])
    return (insert(_R).from_select(["notification_id", "email", "role"], rows).add_cte(new)
            .returning(_R.c.notification_id))


def insert_outbox_row(session: Session, values: dict[str, Any], recipients: list[tuple[str, str]],
                      guarded: list[str], limit: int, since: datetime) -> int | None:
    """Write an outbox row with its recipients in one statement: its id, or None when one of the
    `guarded` addresses had `limit` automatic answers since `since` already (nothing written).

    For PostgreSQL only (SQLite has no INSERT inside WITH); `recipients` must not be empty.
    """
    params: dict[str, Any] = {f"n_{c}": values[c] for c in OUTBOX_COLUMNS}
    params.update({"limit": limit, "since": since})
    params.update({f"guard_{i}": a for i, a in enumerate(guarded)})
    for i, (address, role) in enumerate(recipients):
        params[f"email_{i}"], params[f"role_{i}"] = address, role
    statement = _outbox_insert(len(recipients), len(guarded))
    return session.connection().execute(statement, params).scalars().first()
