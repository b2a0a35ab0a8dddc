"""Finding the ticket, task or project a mail refers to (D1.4, D3).

`find_ticket_number` and friends are plain functions; `TicketNumberStage` and
`ReplyReferenceStage` are the built-in parser stages that apply them to a mail.
"""

from __future__ import annotations

import re
from functools import lru_cache

from pipeline.config import DATE_DIRECTIVES, NumberingSettings, date_tokens
from pipeline.context import EntityRef, EntityType, MailContext
from pipeline.parsers.mime import ParsedMail


@lru_cache(maxsize=64)
def number_pattern(fmt: str) -> re.Pattern[str]:
    """A regex matching numbers written with `fmt`, e.g. 'T{date:%Y%m%d}.{seq:04d}'."""
    out = []
    pos = 0
    for m in re.finditer(r"\{(date|seq)(?::([^}]*))?\}", fmt):
        out.append(re.escape(fmt[pos:m.start()]))
        field, spec = m.group(1), m.group(2) or ""
        if field == "seq":
            width = re.match(r"0?(\d+)d", spec)
            # The sequence widens past its width (T…​.9999 → T…​.10000).
            out.append(r"\d{%d,}" % int(width.group(1)) if width else r"\d+")
        else:
            spec = spec or "%Y-%m-%d"
            out.append("".join(DATE_DIRECTIVES.get(tok, re.escape(tok)) for tok in date_tokens(spec)))
        pos = m.end()
    out.append(re.escape(fmt[pos:]))
    return re.compile(r"(?<![A-Za-z0-9])(" + "".join(out) + r")(?![0-9])", re.IGNORECASE)


@lru_cache(maxsize=16)
def tag_pattern(tag_format: str, number_format: str) -> re.Pattern[str]:
    """A regex matching our ticket tag, e.g. '[Ticket#T20261123.0001]'."""
    before, _, after = tag_format.partition("{number}")
    return re.compile(re.escape(before) + number_pattern(number_format).pattern + re.escape(after), re.IGNORECASE)


def find_number(text: str, fmt: str) -> str | None:
    m = number_pattern(fmt).search(text or "")
    return m.group(1).upper() if m else None


def find_ticket_number(subject: str, numbering: NumberingSettings) -> str | None:
    return find_number(subject, numbering.ticket)


def find_references_in_subject(subject: str, numbering: NumberingSettings) -> list[EntityRef]:
    """Ticket, then task, then project numbers written in a subject (tagged or bare)."""
    refs = []
    for kind, fmt in (("ticket", numbering.ticket), ("task", numbering.task), ("project", numbering.project)):
        number = find_number(subject, fmt)
        if number:
            refs.append(EntityRef(kind, number, "subject"))  # type: ignore[arg-type]
    return refs


# Our outbound Message-IDs carry the entity: <mailloop+ticket+T20261123.0001+n7+a1b2c3@msp.example>.
_OUR_MSGID = re.compile(r"^<mailloop\+(ticket|task|project)\+([^+<>@\s]+)\+n[0-9a-z]+\+[0-9a-f]+@[^>]+>$")


def outbound_message_id(entity_type: EntityType, number: str, notification_key: int | str, token: str,
                        domain: str) -> str:
    return f"<mailloop+{entity_type}+{number}+n{notification_key}+{token}@{domain}>"


def references_from_message_ids(ids: list[str]) -> list[EntityRef]:
    """Entities named by our own Message-IDs among `ids`, most recent first.

    A reference found this way is only a candidate: the resolve stage checks that the
    Message-ID really is one we sent before it lets the mail in (D8).
    """
    refs: list[EntityRef] = []
    for mid in reversed(ids):
        m = _OUR_MSGID.match(mid)
        if m:
            ref = EntityRef(m.group(1), m.group(2), "reply")  # type: ignore[arg-type]
            if ref not in refs:
                refs.append(ref)
    return refs


class TicketNumberStage:
    """A ticket, task or project number in the subject."""

    name = "ticket_number"

    def __call__(self, ctx: MailContext) -> None:
        refs = find_references_in_subject(ctx.parsed.subject, ctx.config.settings.numbering)
        ctx.references.extend(r for r in refs if r not in ctx.references)
        ctx.note(self.name, "found " + ", ".join(r.number for r in refs) if refs else "none",
                 "number in the subject" if refs else "no number in the subject")


def answered_message_ids(mail: ParsedMail) -> list[str]:
    """The Message-IDs a mail answers, oldest first: References, In-Reply-To, and for a bounce
    the Message-ID of the mail that bounced (so a bounced notification finds its ticket)."""
    ids = list(mail.references) + list(mail.in_reply_to)
    if mail.bounce is not None and mail.bounce.original_message_id:
        ids.append(mail.bounce.original_message_id)
    return ids


class ReplyReferenceStage:
    """Our own outbound Message-IDs in In-Reply-To / References (when a client lost the subject's number)."""

    name = "reply_reference"

    def __call__(self, ctx: MailContext) -> None:
        mail = ctx.parsed
        refs = references_from_message_ids(answered_message_ids(mail))
        ctx.references.extend(r for r in refs if r not in ctx.references)
        ctx.note(self.name, "found " + ", ".join(r.number for r in refs) if refs else "none",
                 "answers one of our notifications" if refs else "no Message-ID of ours in In-Reply-To/References")
