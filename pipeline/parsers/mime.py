"""Raw bytes to a `ParsedMail`: headers, text body, new text, attachments, signals.

The stdlib `email` package (compat32 parser, which never raises on malformed input)
does the MIME work; header and body decoding go through `charset` so any input yields
text. mail-parser's Received-header parser is used by the trust stage.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email import message_from_bytes
from email.message import Message
from email.utils import getaddresses, parseaddr, parsedate_to_datetime
from typing import Any

from pipeline.parsers.autoreply import auto_reply_reason, bounce_reason
from pipeline.parsers.charset import decode_bytes, decode_header_value
from pipeline.parsers.html import html_to_text
from pipeline.parsers.reply import new_text


class Unparseable(Exception):
    """The mail has no header block or no usable sender address (D1.2)."""


@dataclass(frozen=True)
class AttachmentPart:
    filename: str
    content_type: str
    size: int
    data: bytes = field(repr=False)
    content_id: str | None = None
    inline: bool = False


@dataclass
class ParsedMail:
    message_id: str | None
    from_address: str
    from_name: str
    to: list[str]
    cc: list[str]
    subject: str
    date: datetime | None
    in_reply_to: list[str]
    references: list[str]
    headers: list[tuple[str, str]]  # in the order they appear, top first
    body_text: str
    body_new: str
    body_html: str | None
    attachments: list[AttachmentPart]
    auto_reply_why: str | None
    bounce_why: str | None

    @property
    def is_auto_reply(self) -> bool:
        return self.auto_reply_why is not None

    @property
    def is_bounce(self) -> bool:
        return self.bounce_why is not None

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def as_json(self) -> dict[str, Any]:
        """The `parse --json` shape of D6."""
        return {
            "message_id": self.message_id,
            "from_address": self.from_address,
            "from_name": self.from_name,
            "to": self.to,
            "cc": self.cc,
            "subject": self.subject,
            "date": self.date.isoformat() if self.date else None,
            "in_reply_to": self.in_reply_to[0] if self.in_reply_to else None,
            "references": self.references,
            "body_text": self.body_text,
            "body_new": self.body_new,
            "attachments": [
                {"filename": a.filename, "content_type": a.content_type, "size": a.size,
                 "content_id": a.content_id, "inline": a.inline}
                for a in self.attachments
            ],
            "is_auto_reply": self.is_auto_reply,
            "auto_reply_reason": self.auto_reply_why,
            "is_bounce": self.is_bounce,
            "bounce_reason": self.bounce_why,
        }


_MSGID = re.compile(r"<[^<>\s]+>")
_HEADER_LINE = re.compile(rb"^[!-9;-~]+[ \t]*:")


def parse_mail(raw: bytes) -> ParsedMail:
    if not raw or not _HEADER_LINE.match(raw.lstrip(b"\r\n")[:1000]):
        raise Unparseable("no header block")
    msg = message_from_bytes(raw)
    if not msg.keys():
        raise Unparseable("no header block")

    from_name, from_address = _sender(msg)
    if not from_address:
        raise Unparseable("no usable sender address in From:")

    subject = decode_header_value(msg.get("Subject"))
    text_plain, text_html, attachments = _walk(msg)
    if text_plain is not None and text_plain.strip():
        body_text = text_plain
    elif text_html is not None:
        body_text = html_to_text(text_html)
    else:
        body_text = text_plain or ""
    body_text = body_text.replace("\r\n", "\n").strip("\n")

    return ParsedMail(
        message_id=_first_msgid(msg.get("Message-ID")),
        from_address=from_address,
        from_name=from_name,
        to=_addresses(msg, "To"),
        cc=_addresses(msg, "Cc"),
        subject=subject,
        date=_date(msg.get("Date")),
        in_reply_to=_msgids(msg.get("In-Reply-To")),
        references=_msgids(" ".join(str(v) for v in msg.get_all("References") or [])),
        headers=[(k, decode_header_value(v)) for k, v in msg.items()],
        body_text=body_text,
        body_new=new_text(body_text),
        body_html=text_html,
        attachments=attachments,
        auto_reply_why=auto_reply_reason(msg, subject),
        bounce_why=bounce_reason(msg, from_address),
    )


def mail_identity(mail: ParsedMail) -> str:
    """Message-ID plus a hash of From, Date, Subject and body (D1.5.1)."""
    content = "\x1f".join([
        mail.from_address, mail.date.isoformat() if mail.date else "", mail.subject, mail.body_text,
    ])
    digest = hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()
    return hashlib.sha256(f"{mail.message_id or ''}\x1e{digest}".encode("utf-8", "surrogatepass")).hexdigest()


def _sender(msg: Message) -> tuple[str, str]:
    for header in ("From", "Sender"):
        raw = msg.get(header)
        if raw is None:
            continue
        name, addr = parseaddr(decode_header_value(raw))
        addr = addr.strip().strip("<>").lower()
        if re.fullmatch(r"[^@\s]+@[^@\s]+", addr):
            return name.strip(), addr
    return "", ""


def _addresses(msg: Message, header: str) -> list[str]:
    values = [decode_header_value(v) for v in msg.get_all(header) or []]
    return [a.lower() for _, a in getaddresses(values) if "@" in a]


def _first_msgid(value: object) -> str | None:
    ids = _msgids(value)
    if ids:
        return ids[0]
    text = str(value or "").strip()
    return f"<{text}>" if text and " " not in text else None


def _msgids(value: object) -> list[str]:
    return _MSGID.findall(str(value or ""))


def _date(value: object) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _walk(msg: Message) -> tuple[str | None, str | None, list[AttachmentPart]]:
    """The first text/plain and text/html body parts, and every attachment."""
    plain: str | None = None
    html: str | None = None
    attachments: list[AttachmentPart] = []
    stack = [msg]
    while stack:
        part = stack.pop(0)
        ctype = part.get_content_type()
        if part.is_multipart() and ctype != "message/rfc822":
            stack[0:0] = [p for p in part.get_payload() if isinstance(p, Message)]
            continue
        disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
        filename = part.get_filename()
        if ctype in ("text/plain", "text/html") and disposition != "attachment" and not filename:
            text = decode_bytes(_payload(part), part.get_content_charset())
            if ctype == "text/plain" and plain is None:
                plain = text
            elif ctype == "text/html" and html is None:
                html = text
            continue
        data = _forwarded_mail(part) if ctype == "message/rfc822" else _payload(part)
        attachments.append(AttachmentPart(
            filename=safe_filename(decode_header_value(filename) if filename else _default_name(ctype)),
            content_type=ctype,
            size=len(data),
            data=data,
            content_id=(_first_msgid(part.get("Content-ID")) or None),
            inline=disposition == "inline",
        ))
    return plain, html, attachments


def _payload(part: Message) -> bytes:
    data = part.get_payload(decode=True)
    if isinstance(data, bytes):
        return data
    raw = part.get_payload()
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""


def _forwarded_mail(part: Message) -> bytes:
    inner = part.get_payload()
    try:
        return inner[0].as_bytes() if isinstance(inner, list) and inner else part.as_bytes()
    except Exception:  # a mangled inner mail is kept as the bytes we can get
        return str(inner).encode("utf-8", "surrogateescape")


def _default_name(ctype: str) -> str:
    ext = {"message/rfc822": "eml", "text/calendar": "ics", "image/png": "png", "image/jpeg": "jpg",
           "application/pdf": "pdf"}.get(ctype, "bin")
    return f"attachment.{ext}"


def safe_filename(name: str) -> str:
    """An attachment name that can never reach outside a folder or confuse a shell (D8)."""
    name = unicodedata.normalize("NFC", name)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable() and ch not in '<>:"|?*')
    name = name.strip(" .")
    if len(name) > 200:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 200 - len(ext) - 1] + "." + ext) if dot and len(ext) < 16 else name[:200]
    return name or "attachment.bin"
