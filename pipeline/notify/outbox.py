"""Notifications to send (D1.7), planned in the mail's transaction and stored in the outbox.

Sending them after commit is the notify task's job; here we decide who gets what, render
it from sandboxed templates and record the outbound Message-ID before anything is sent.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from functools import lru_cache

from jinja2 import PackageLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from pipeline.config import MailboxConfig, NumberingSettings
from pipeline.parsers.mime import ParsedMail
from pipeline.parsers.references import outbound_message_id


@dataclass
class Draft:
    event: str
    recipients: list[tuple[str, str]]  # (address, role)
    subject: str
    body_text: str
    message_id: str
    in_reply_to: str | None
    references: str | None
    entity_type: str | None = None
    entity_id: int | None = None
    extra: dict = field(default_factory=dict)


@lru_cache(maxsize=1)
def _templates() -> SandboxedEnvironment:
    # Sandboxed: per-mailbox template overrides must not reach Python internals (D8).
    return SandboxedEnvironment(loader=PackageLoader("pipeline.notify", "templates"), undefined=StrictUndefined,
                                keep_trailing_newline=True)


def render(name: str, **values: object) -> str:
    return _templates().get_template(f"{name}.txt").render(**values).strip() + "\n"


def ticket_tag(numbering: NumberingSettings, number: str) -> str:
    return numbering.ticket_tag.format(number=number)


def _threading(mail: ParsedMail | None) -> tuple[str | None, str | None]:
    if mail is None or not mail.message_id:
        return None, None
    refs = [r for r in mail.references if r != mail.message_id] + [mail.message_id]
    return mail.message_id, " ".join(refs[-20:])


def draft(event: str, *, mailbox: MailboxConfig, recipients: list[tuple[str, str]], subject: str, body: str,
          mail: ParsedMail | None, entity_type: str | None, entity_id: int | None, number: str | None,
          journal_id: int | None) -> Draft | None:
    """A notification, or None when nobody is left to receive it."""
    own = {mailbox.address.lower(), (mailbox.notifications.from_address or "").lower()}
    wanted = []
    for address, role in recipients:
        if address and address.lower() not in own and address.lower() not in (a for a, _ in wanted):
            wanted.append((address.lower(), role))
    if not wanted:
        return None
    domain = mailbox.address.rsplit("@", 1)[-1]
    token = secrets.token_hex(6)
    if entity_type and number:
        message_id = outbound_message_id(entity_type, number, journal_id or 0, token, domain)  # type: ignore[arg-type]
    else:
        message_id = f"<mailloop+{event}+n{journal_id or 0}+{token}@{domain}>"
    in_reply_to, references = _threading(mail)
    return Draft(event, wanted, subject, body, message_id, in_reply_to, references, entity_type, entity_id)
