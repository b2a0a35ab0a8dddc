"""Drafts for the outbox (D1.6–7): one per recipient, with its Message-ID fixed before anything is sent.

Sending them after commit is the notify task's job (pipeline/notify/send.py); a resend
reuses the Message-ID recorded here, so a client can drop the rare duplicate.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.config import MailboxConfig, NumberingSettings
from pipeline.notify.recipients import Recipient
from pipeline.notify.templates import Rendered
from pipeline.parsers.mime import ParsedMail
from pipeline.parsers.references import outbound_message_id
from pipeline.store.models import Notification

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
