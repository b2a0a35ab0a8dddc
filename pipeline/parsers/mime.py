"""Raw bytes to a `ParsedMail`: headers, text body, new text, attachments, signals.

The stdlib `email` package (compat32, which never raises on malformed input) splits the
MIME tree once; a tree too deep for it falls back to the header block and the body as
text. Headers are read raw (`raw_items`) and decoded in `charset`, so 8-bit headers and
mislabelled charsets come out as text. The body is the text/plain part when it is
faithful, else the HTML turned into text (`html`); the new text is cut by `reply`; the
HTML copy is cleaned by `sanitize` (nh3) when asked for; winmail.dat is unpacked by
`tnef`; auto-reply and bounce signals come from `autoreply`; forwarded originals from
`forward`. mail-parser's Received-header parser is used by the trust stage.

Any input gives a `ParsedMail` or `Unparseable` (no header block, no usable sender);
a helper that fails on some input costs only its own field, recorded in `warnings`.
"""

from __future__ import annotations

import binascii
import hashlib
import mimetypes
import re
import secrets
import unicodedata
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import Message
from email.parser import BytesFeedParser, BytesHeaderParser
from email.utils import getaddresses, parseaddr, parsedate_to_datetime
from functools import cached_property
from typing import Any

from pipeline.parsers import forward, tnef
from pipeline.parsers.autoreply import Bounce, auto_reply_reason, bounce_info
from pipeline.parsers.charset import decode_bytes, decode_header_value
from pipeline.parsers.forward import Forwarded, forwarded_origin
from pipeline.parsers.html import html_to_text_noted
from pipeline.parsers.params import split_header
from pipeline.parsers.reply import new_text
from pipeline.parsers.sanitize import sanitize_html


class Unparseable(Exception):
    """The mail has no header block or no usable sender address (D1.2)."""


@dataclass(frozen=True)
class AttachmentPart:
    filename: str
    content_type: str
    size: int  # bytes of the decoded content (estimated from the encoded size when skipped unread)
    data: bytes = field(repr=False)  # empty when skipped
    content_id: str | None = None
    inline: bool = False  # an image the HTML body shows (cid:), or a part marked inline
    skipped: str | None = None  # why the content was not kept (e.g. over the mailbox's size limit)


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
    body_text: str  # the whole text body
    body_new: str  # what the sender newly wrote: no quoted history, signature, disclaimer
    body_html: str | None  # the HTML body as sent — never store or show this; see body_html_sanitized
    attachments: list[AttachmentPart]
    auto_reply_why: str | None
    bounce_why: str | None
    bounce: Bounce | None = None
    forwarded: Forwarded | None = None  # the original sender when this mail forwards someone else's
    warnings: list[str] = field(default_factory=list)  # what could not be read, and what was done instead

    @property
    def is_auto_reply(self) -> bool:
        return self.auto_reply_why is not None

    @property
    def is_bounce(self) -> bool:
        return self.bounce_why is not None

    @cached_property
    def body_html_sanitized(self) -> str | None:
        """The HTML body with scripts, styles, handlers and remote content removed (D8)."""
        return sanitize_html(self.body_html)

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def as_json(self) -> dict[str, Any]:
        """The `parse --json` shape of D6 (plus what else the parser found)."""
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
            "body_html_sanitized": self.body_html_sanitized,
            "attachments": [
                {"filename": a.filename, "content_type": a.content_type, "size": a.size,
                 "content_id": a.content_id, "inline": a.inline, "skipped": a.skipped}
                for a in self.attachments
            ],
            "is_auto_reply": self.is_auto_reply,
            "auto_reply_reason": self.auto_reply_why,
            "is_bounce": self.is_bounce,
            "bounce_reason": self.bounce_why,
            "bounce": self.bounce.as_json() if self.bounce else None,
            "forwarded_from": self.forwarded.as_json() if self.forwarded else None,
            "warnings": self.warnings,
        }


_MSGID = re.compile(r"<[^<>\s]+>")
_HEADER_LINE = re.compile(rb"^[!-9;-~]+[ \t]*:")
_ANGLE_ADDRESS = re.compile(r"<\s*([^<>\s]+@[^<>\s]+)\s*>")
_USABLE_ADDRESS = re.compile(r"[^@\s]{1,64}@[^@\s]{1,253}")
_CID_REF = re.compile(r"""cid:([^"'\s>)]+)""", re.IGNORECASE)
_PLACEHOLDER = re.compile(
    r"this (?:is an? )?(?:html|multi-?part)|html[- ]capable|does not support html|to view this (?:message|e-?mail)"
    r"|view (?:it|this (?:e-?mail|message)) in (?:your|a) (?:web )?browser|nachricht im html-format",
    re.IGNORECASE,
)
_TAG = re.compile(r"<[^<>]*>|&[a-z#0-9]+;", re.IGNORECASE)  # "<" excluded: a run of "<" is scanned once, not once per "<"
_TEXT_TRASH = re.compile("[\x00\ud800-\udfff]")
_MAX_PARTS = 2000  # MIME parts read per mail; a mail of 10,000 parts keeps its first 2,000
_MAX_ATTACHMENTS = 500
_HEADERS_ONLY = BytesHeaderParser()
_FEED_CHUNK = 64 * 1024


def parse_mail(raw: bytes, max_attachment_bytes: int | None = None) -> ParsedMail:
    """Parse one raw mail. `max_attachment_bytes`: attachments over it are kept as skipped entries."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    if not raw or not _HEADER_LINE.match(raw.lstrip(b"\r\n")[:1000]):
        raise Unparseable("no header block")
    warnings: list[str] = []
    msg = _message(raw, warnings)
    if not msg.keys():
        raise Unparseable("no header block")

    raw_headers = list(msg.raw_items())
    first: dict[str, str] = {}
    for name, value in raw_headers:
        first.setdefault(name.lower(), value)
    from_name, from_address = _sender(first)
    if not from_address:
        raise Unparseable("no usable sender address in From:")

    subject = _clean(decode_header_value(first.get("subject")))
    walk = _Walk(max_attachment_bytes, warnings)
    walk.run(msg)
    body_text, body_html = _choose_body(walk, warnings)
    attachments = _mark_inline(walk.attachments, body_html)

    body_new = _guarded(warnings, "reply separation", lambda: new_text(body_text), body_text)
    forwarded = _guarded(warnings, "forwarded-block reading",
                         lambda: forwarded_origin(subject, body_text) or _attached_origin(subject, walk), None)
    bounce = _guarded(warnings, "bounce reading", lambda: bounce_info(msg, from_address, subject, body_text), None)
    auto_why = _guarded(warnings, "auto-reply signals", lambda: auto_reply_reason(msg, subject), None)

    return ParsedMail(
        message_id=_first_msgid(first.get("message-id")),
        from_address=from_address,
        from_name=from_name,
        to=_addresses(raw_headers, "to"),
        cc=_addresses(raw_headers, "cc"),
        subject=subject,
        date=_date(first.get("date")),
        in_reply_to=_msgids(first.get("in-reply-to")),
        references=_msgids(" ".join(str(v) for k, v in raw_headers if k.lower() == "references")),
        headers=[(_clean(k), _clean(decode_header_value(v))) for k, v in raw_headers],
        body_text=body_text,
        body_new=body_new,
        body_html=body_html,
        attachments=attachments,
        auto_reply_why=auto_why,
        bounce_why=bounce.why if bounce else None,
        bounce=bounce,
        forwarded=forwarded,
        warnings=warnings,
    )


def mail_identity(mail: ParsedMail) -> str:
    """Message-ID plus a hash of From, Date, Subject and body (D1.5.1); deterministic without a Message-ID."""
    content = "\x1f".join([
        mail.from_address, mail.date.isoformat() if mail.date else "", mail.subject, mail.body_text,
    ])
    digest = hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()
    return hashlib.sha256(f"{mail.message_id or ''}\x1e{digest}".encode("utf-8", "surrogatepass")).hexdigest()


# -- the MIME tree -------------------------------------------------------------------------------

def _message(raw: bytes, warnings: list[str]) -> Message:
    """The MIME tree, from the stdlib's parser; big base64 bodies are lifted out first (`_lift_bodies`)."""
    noted = len(warnings)
    bounded = _bounded(raw, warnings)
    try:
        skeleton, lifted = _lift_bodies(bounded)
        if not lifted:
            return _feed(bounded)
        msg = _feed(skeleton)
        del skeleton
        if _put_back(msg, lifted):
            return msg
        del msg, lifted  # the skeleton did not read as the mail does: the whole mail, as it is, and no copies kept
        return _feed(bounded)
    except RecursionError:
        warnings.append("MIME structure nested too deeply: body read as text")
    except Exception as exc:  # noqa: BLE001 - the stdlib parser is meant never to raise; if it does, keep what we can
        warnings.append(f"MIME parser failed ({type(exc).__name__}): body read as text")
    del warnings[noted:-1]  # the whole body is read as text after all
    msg = _HEADERS_ONLY.parsebytes(raw)
    del msg["Content-Type"]
    del msg["Content-Transfer-Encoding"]
    return msg


def _feed(raw: bytes) -> Message:
    """Fed in chunks: `message_from_bytes` would hold the mail as one str and as a StringIO
    (4 bytes a character) besides — 5x the mail's size before any part is read."""
    parser = BytesFeedParser()
    view = memoryview(raw)
    for start in range(0, len(raw), _FEED_CHUNK):
        parser.feed(bytes(view[start:start + _FEED_CHUNK]))
    return parser.close()


# Only mails this big have a body worth lifting, and only bodies this big are lifted.
_LIFT_MAIL_BYTES = 32 * 1024
_LIFT_BODY_BYTES = 8 * 1024
_CTE_HEADER = b"content-transfer-encoding:"
_BASE64_VALUE = re.compile(rb"[ \t]*base64[ \t]*\r?\n")
_HEADERS_END = re.compile(rb"\r?\n\r?\n")


def _lift_bodies(raw: bytes) -> tuple[bytes, dict[str, str]]:
    """`raw` with each big base64 body replaced by a token, and the bodies by token.

    The stdlib's parser takes a mail line by line, matching every line against the boundaries
    around it: a 150 KB attachment is 2,000 lines and 4/5 of the time of reading its mail
    (bench/README.md, issue 10). A base64 body holds no line that starts with "--", so cutting
    it out up to the first such line cannot change what the parser finds around it; `_put_back`
    checks that each token came out as the whole body of a base64 part, or the mail is read whole.
    """
    if len(raw) < _LIFT_MAIL_BYTES:
        return raw, {}
    lower = raw.lower()
    boundaries = _declared_boundaries(raw, lower)
    tag = "MAILLOOPLIFTED" + secrets.token_hex(8)
    pieces: list[bytes] = []
    lifted: dict[str, str] = {}
    kept = scan = 0
    while (at := lower.find(_CTE_HEADER, scan)) >= 0:
        scan = at + len(_CTE_HEADER)
        if (at and raw[at - 1] != 0x0A) or not _BASE64_VALUE.match(lower, scan):
            continue  # not a header line, or not base64
        headers_end = _HEADERS_END.search(raw, scan)
        if headers_end is None:
            break
        part_start = max(raw.rfind(b"\n--", 0, at), raw.rfind(b"\r--", 0, at), 0)
        if _HEADERS_END.search(raw, part_start, at):
            continue  # a blank line between its part's boundary and it: this line is in a body
        start = headers_end.end()
        end = _next_dash_line(raw, start - 1)  # from the blank line's own break: the body may be empty
        if end < 0:
            break
        scan = end + 1
        if not any(raw.startswith(b"--" + b, end + 1) for b in boundaries):
            continue  # a line of dashes in the body, not a boundary: the part goes on past it
        if raw[end] == 0x0A and raw[end - 1] == 0x0D:
            end -= 1  # the line break before a boundary belongs to the boundary, not the body
        if end - start < _LIFT_BODY_BYTES or not _looks_base64(raw, start, end):
            continue
        token = f"{tag}X{len(lifted)}"
        lifted[token] = raw[start:end].decode("ascii", "surrogateescape")  # as BytesFeedParser decodes it
        pieces += [raw[kept:start], token.encode()]
        kept = end
    if not lifted:
        return raw, {}
    pieces.append(raw[kept:])
    return b"".join(pieces), lifted


_BOUNDARY_VALUE = re.compile(rb'[ \t]*=[ \t]*(?:"([^"\r\n]+)"|([^\s;"]+))')


def _declared_boundaries(raw: bytes, lower: bytes) -> set[bytes]:
    """Every `boundary=` parameter value in the mail, as written (boundaries are case-sensitive)."""
    found: set[bytes] = set()
    at = 0
    while (at := lower.find(b"boundary", at)) >= 0:
        at += len(b"boundary")
        m = _BOUNDARY_VALUE.match(raw, at)
        if m:
            found.add((m.group(1) or m.group(2)).rstrip())
    return found


def _next_dash_line(raw: bytes, start: int) -> int:
    """Where the line break before the next line starting with "--" is (-1: none). The stdlib
    breaks lines at CR, LF and CRLF alike, so a lone CR starts a line too."""
    found = [i for i in (raw.find(b"\n--", start), raw.find(b"\r--", start)) if i >= 0]
    return min(found) if found else -1


_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n \t"


def _looks_base64(raw: bytes, start: int, end: int) -> bool:
    """Only the base64 alphabet and line breaks: a body that says base64 and is not, is read whole
    from the start rather than lifted, refused and read twice."""
    return not raw[start:end].translate(None, _BASE64_ALPHABET)


def _put_back(msg: Message, lifted: dict[str, str]) -> bool:
    """Put the lifted bodies back in their parts; False unless each token is a base64 leaf's whole body."""
    found = 0
    for part in msg.walk():
        payload = part.get_payload()
        if isinstance(payload, str) and payload in lifted:
            if part.get_content_maintype() in ("multipart", "message") or _transfer_encoding(part) != "base64":
                return False
            part.set_payload(lifted[payload])
            found += 1
    return found == len(lifted)


_BOUNDARY_LINE = re.compile(rb"\n--")


def _bounded(raw: bytes, warnings: list[str]) -> bytes:
    """At most _MAX_PARTS parts are read, so no more are built: the stdlib's objects for
    10,000 tiny parts would cost 8x the mail's size. Parts are walked in document order, so
    cutting the mail after the boundary line that starts part _MAX_PARTS + 1 changes nothing read."""
    if raw.count(b"\n--") <= _MAX_PARTS:
        return raw
    for count, m in enumerate(_BOUNDARY_LINE.finditer(raw), start=1):
        if count > _MAX_PARTS + 1:
            warnings.append(f"more than {_MAX_PARTS} MIME parts: the rest was not read")
            return raw[:m.start() + 1]
    return raw


class _Walk:
    """One pass over the parts: body texts in order, attachments, winmail.dat contents."""

    def __init__(self, max_attachment_bytes: int | None, warnings: list[str]) -> None:
        self.limit = max_attachment_bytes
        self.warnings = warnings
        self.plain: list[str] = []
        self.html: list[str] = []
        self.attachments: list[AttachmentPart] = []
        self.tnef_text: str | None = None
        self.tnef_html: str | None = None
        self.rfc822: list[Message] = []

    def run(self, msg: Message) -> None:
        stack: list[tuple[Message, bool]] = [(msg, False)]
        seen = 0
        while stack:
            part, in_related = stack.pop()
            seen += 1
            if seen > _MAX_PARTS:
                if not any(w.startswith(f"more than {_MAX_PARTS} MIME parts") for w in self.warnings):
                    self.warnings.append(f"more than {_MAX_PARTS} MIME parts: the rest was not read")
                return
            try:
                self._part(part, in_related, stack)
            except Exception as exc:  # noqa: BLE001 - one unreadable part must not cost the mail
                self.warnings.append(f"a {part.get_content_type()} part could not be read ({type(exc).__name__})")

    def _part(self, part: Message, in_related: bool, stack: list[tuple[Message, bool]]) -> None:
        ctype = part.get_content_type()
        payload = part.get_payload()
        if ctype.startswith("multipart/"):
            if isinstance(payload, list):
                related = in_related or ctype == "multipart/related"
                stack.extend((p, related) for p in reversed(payload) if isinstance(p, Message))
                return
            recovered = _recover_boundary(part)
            if recovered is not None:
                self.warnings.append("MIME boundary did not match the parts: recovered")
                stack.append((recovered, in_related))
            elif isinstance(payload, str) and payload.strip():
                self.warnings.append("MIME boundary missing: body read as text")
                self.plain.append(_clean(decode_bytes(_payload(part))))
            return
        disposition, dparams = split_header(_raw(part, "content-disposition"))
        disposition = disposition.lower()
        _ctype, cparams = split_header(_raw(part, "content-type"))
        filename = dparams.get("filename") or cparams.get("name")
        if ctype in ("text/plain", "text/html") and disposition != "attachment" and not filename:
            text = _clean(decode_bytes(_payload(part), cparams.get("charset")))
            if ctype == "text/plain" and cparams.get("format", "").strip().lower() == "flowed":
                text = unflow(text, delsp=cparams.get("delsp", "").strip().lower() == "yes")
            (self.plain if ctype == "text/plain" else self.html).append(text)
            return
        if len(self.attachments) >= _MAX_ATTACHMENTS:
            if len(self.attachments) == _MAX_ATTACHMENTS:
                self.warnings.append(f"more than {_MAX_ATTACHMENTS} attachments: the rest was not kept")
                self.attachments.append(AttachmentPart("…", "application/octet-stream", 0, b"",
                                                       skipped="too many attachments in one mail"))
            return
        content_id = _first_msgid(_raw(part, "content-id"))
        if ctype.startswith("message/"):
            if ctype in ("message/rfc822", "message/global") and isinstance(payload, list) and payload:
                self.rfc822.append(payload[0])
            data = _message_bytes(part)
        else:
            estimate = _estimated_size(part, payload)
            if self.limit is not None and estimate > self.limit * 1.02 + 1024:
                self._skipped(filename, ctype, estimate, content_id, disposition, in_related)
                return
            data = _payload(part)
        if tnef.is_tnef(ctype, filename, data) and self._tnef(data):
            return
        self._add(filename, ctype, data, content_id, disposition, in_related)

    def _add(self, filename: str | None, ctype: str, data: bytes, content_id: str | None, disposition: str,
             in_related: bool) -> None:
        name = safe_filename(filename if filename else _default_name(ctype))
        inline = disposition == "inline" or (not disposition and in_related and content_id is not None)
        if self.limit is not None and len(data) > self.limit:
            self._skipped(name, ctype, len(data), content_id, disposition, in_related)
            return
        self.attachments.append(AttachmentPart(name, ctype[:255], len(data), data, _cap(content_id), inline))

    def _skipped(self, filename: str | None, ctype: str, size: int, content_id: str | None, disposition: str,
                 in_related: bool) -> None:
        name = safe_filename(filename if filename else _default_name(ctype))
        inline = disposition == "inline" or (not disposition and in_related and content_id is not None)
        self.attachments.append(AttachmentPart(
            name, ctype[:255], size, b"", _cap(content_id), inline,
            skipped=f"larger than the mailbox's attachment limit of {self.limit} bytes"))

    def _tnef(self, data: bytes) -> bool:
        content = tnef.unpack(data)
        if content is None or not (content.files or content.body_text or content.body_html):
            self.warnings.append("winmail.dat could not be unpacked: kept as it came")
            return False
        for name, payload in content.files:
            ctype = mimetypes.guess_type(name or "")[0] or "application/octet-stream"
            self._add(name or None, ctype, payload, None, "attachment", False)
        self.tnef_text = self.tnef_text or content.body_text
        self.tnef_html = self.tnef_html or content.body_html
        return True


def _raw(part: Message, name: str) -> str | None:
    for key, value in part.raw_items():
        if key.lower() == name:
            return value if isinstance(value, str) else str(value)
    return None


def _recover_boundary(part: Message) -> Message | None:
    """A multipart whose declared boundary never occurs: re-read it with the one its body uses."""
    payload = part.get_payload()
    if not isinstance(payload, str) or part.get("X-Mailloop-Recovered"):
        return None
    counts: dict[str, int] = {}
    for m in re.finditer(r"^--([^\s]{1,70}?)(?:--)?[ \t]*\r?$", payload[:2_000_000], re.MULTILINE):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    candidates = [b for b, n in counts.items() if n >= 2 or f"--{b}--" in payload]
    if not candidates:
        return None
    boundary = max(candidates, key=lambda b: counts[b])
    head = (f"Content-Type: {part.get_content_type()}; boundary=\"{boundary}\"\n"
            "X-Mailloop-Recovered: 1\n\n").encode()
    inner = message_from_bytes(head + payload.encode("utf-8", "surrogateescape"))
    return inner if isinstance(inner.get_payload(), list) else None


def _payload(part: Message) -> bytes:
    raw = part.get_payload()
    if isinstance(raw, str) and _transfer_encoding(part) == "base64":
        # binascii skips the line breaks itself; the stdlib splits and re-joins every line first
        # (3 more copies of a big attachment at once).
        try:
            return binascii.a2b_base64(raw)
        except (binascii.Error, ValueError):
            pass  # bad padding, 8-bit bytes: the stdlib's lenient decoder below copes
    data = part.get_payload(decode=True)
    if isinstance(data, bytes):
        return data
    raw = part.get_payload()
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""


def _transfer_encoding(part: Message) -> str:
    return str(part.get("Content-Transfer-Encoding") or "").strip().lower()


def _estimated_size(part: Message, payload: object) -> int:
    """The decoded size, without decoding (base64 is 3 bytes per 4 characters)."""
    if not isinstance(payload, str):
        return 0
    if _transfer_encoding(part) == "base64":
        return (len(payload) - payload.count("\n") - payload.count("\r")) * 3 // 4
    return len(payload)


def _message_bytes(part: Message) -> bytes:
    payload = part.get_payload()
    try:
        if isinstance(payload, list):
            if part.get_content_type() in ("message/rfc822", "message/global") and payload:
                return payload[0].as_bytes()
            return b"\n".join(p.as_bytes() for p in payload if isinstance(p, Message))
        return _payload(part)
    except Exception:  # noqa: BLE001 - a mangled inner mail is kept as the bytes we can get
        return str(payload).encode("utf-8", "surrogateescape")


# -- choosing the body ---------------------------------------------------------------------------

def _choose_body(walk: _Walk, warnings: list[str]) -> tuple[str, str | None]:
    plain = "\n\n".join(p.strip("\r\n") for p in walk.plain if p.strip())
    html = "\n".join(walk.html) if walk.html else walk.tnef_html
    if not plain and walk.tnef_text:
        plain = walk.tnef_text
    if _faithful(plain, html):
        text = plain
    elif html is not None:
        text = _guarded(warnings, "HTML to text", lambda: _html_text(html, warnings), None)
        if text is None:  # the converter failed: the tags blanked out, computed only then
            text = _TAG.sub(" ", html)
    else:
        text = plain
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = _BLANK_LINE.sub("", text).strip("\n")  # "=20" spacer lines (Outlook for Mac) are blank lines
    return _clean(text), html


def _html_text(html: str, warnings: list[str]) -> str:
    """The HTML as text; what the converter had to give up on (e.g. nesting too deep) goes to the warnings."""
    text, note = html_to_text_noted(html)
    if note:
        warnings.append(note)
    return text


_BLANK_LINE = re.compile(r"^[ \t\xa0]+$", re.MULTILINE)
_QUOTE_MARKS = re.compile(r"^>+")


def unflow(text: str, delsp: bool = False) -> str:
    """RFC 3676 format=flowed as a reader sees it: a line ending in a space goes on with the next
    line of the same quote depth; space-stuffing is undone; "-- " stays the signature separator;
    quoted lines come out as "> " (one mark per level) before the joined text."""
    out: list[str] = []
    depth_open: int | None = None  # quote depth of the paragraph being joined, None when none is open
    pieces: list[str] = []

    def flush() -> None:
        nonlocal depth_open
        if depth_open is not None:
            joined = "".join(pieces)
            out.append((">" * depth_open + (" " + joined if joined else "")) if depth_open else joined)
        depth_open = None
        pieces.clear()

    for line in text.replace("\r\n", "\n").split("\n"):
        marks = _QUOTE_MARKS.match(line)
        depth = len(marks.group(0)) if marks else 0
        content = line[depth:].removeprefix(" ")  # space-stuffing (and the space after quote marks)
        soft = content.endswith(" ") and content != "-- "
        if depth_open is not None and depth_open != depth:
            flush()
        if soft and delsp:
            content = content[:-1]
        depth_open = depth
        pieces.append(content)
        if not soft:
            flush()
    flush()
    return "\n".join(out)


def _faithful(plain: str, html: str | None) -> bool:
    """Is the text/plain part the mail itself (not a stub such as "This is an HTML message")?"""
    stripped = plain.strip()
    if not stripped:
        return False
    if html is None:
        return True
    if len(stripped) < 300 and _PLACEHOLDER.search(stripped):
        return False
    if len(stripped) < 40:
        visible = len(" ".join(_TAG.sub(" ", html[:50_000]).split()))
        return visible < 4 * len(stripped) + 200
    return True


def _mark_inline(attachments: list[AttachmentPart], html: str | None) -> list[AttachmentPart]:
    """Images the HTML shows by `cid:` are inline, whatever their Content-Disposition says."""
    if not html or "cid:" not in html.lower():
        return attachments
    referenced = {c.strip("<>").lower() for c in _CID_REF.findall(html)}
    return [replace(a, inline=True) if a.content_id and a.content_id.strip("<>").lower() in referenced and not a.inline
            else a for a in attachments]


def _attached_origin(subject: str, walk: _Walk) -> Forwarded | None:
    """Forward as attachment: the one attached mail's sender."""
    if len(walk.rfc822) != 1 or not forward.is_forward(subject, ""):
        return None
    inner = walk.rfc822[0]
    first = {k.lower(): v for k, v in reversed(list(inner.raw_items()))}
    name, address = _sender(first)
    if not address:
        return None
    return Forwarded(name, address, decode_header_value(first.get("subject")) or None,
                     decode_header_value(first.get("date")) or None)


# -- headers -------------------------------------------------------------------------------------

def _sender(first: dict[str, str]) -> tuple[str, str]:
    for header in ("from", "sender"):
        raw = first.get(header)
        if raw is None:
            continue
        value = decode_header_value(raw)
        angle = _ANGLE_ADDRESS.search(value)
        if angle:
            addr = angle.group(1)
            name = value[:angle.start()].strip().strip('"').strip()
        else:
            name, addr = parseaddr(value)
        addr = _clean(addr.strip().strip("<>").lower())
        if len(addr) <= 254 and _USABLE_ADDRESS.fullmatch(addr):
            return _clean(" ".join(name.split()))[:200], addr
    return "", ""


def _addresses(raw_headers: list[tuple[str, str]], header: str) -> list[str]:
    values = [decode_header_value(v) for k, v in raw_headers if k.lower() == header]
    try:
        pairs = getaddresses(values)
    except Exception:  # noqa: BLE001
        return []
    return [_clean(a.lower()) for _, a in pairs if "@" in a and len(a) <= 254]


def _first_msgid(value: object) -> str | None:
    ids = _msgids(value)
    if ids:
        return ids[0][:998]
    text = _clean(str(value or "")).strip()
    return f"<{text[:996]}>" if text and " " not in text else None


def _msgids(value: object) -> list[str]:
    return [_clean(m) for m in _MSGID.findall(str(value or ""))]


def _date(value: object) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(decode_header_value(value))
    except Exception:  # noqa: BLE001 - parsedate raises TypeError, ValueError, IndexError, OverflowError on odd dates
        return None
    if parsed is None:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _cap(value: str | None, length: int = 255) -> str | None:
    return value[:length] if value else value


def _clean(text: str) -> str:
    """No NUL (PostgreSQL refuses it) and no lone surrogates (UTF-8 refuses them)."""
    if not text or (text.isascii() and "\x00" not in text):
        return text
    return _TEXT_TRASH.sub("", text)


def _guarded(warnings: list[str], what: str, compute: Any, fallback: Any) -> Any:
    try:
        return compute()
    except Exception as exc:  # noqa: BLE001 - a helper's bug on odd input costs its own field, not the mail
        warnings.append(f"{what} failed ({type(exc).__name__}): {str(exc)[:200]}")
        return fallback


def _default_name(ctype: str) -> str:
    ext = {"message/rfc822": "eml", "message/global": "eml", "message/delivery-status": "txt",
           "text/rfc822-headers": "txt", "text/calendar": "ics", "image/png": "png", "image/jpeg": "jpg",
           "image/gif": "gif", "application/pdf": "pdf"}.get(ctype) or (mimetypes.guess_extension(ctype) or ".bin")[1:]
    return f"attachment.{ext}"


def safe_filename(name: str) -> str:
    """An attachment name that can never reach outside a folder or confuse a shell (D8)."""
    name = unicodedata.normalize("NFC", _clean(name))
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable() and ch not in '<>:"|?*')
    name = name.strip(" .")
    if len(name) > 200:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 200 - len(ext) - 1] + "." + ext) if dot and len(ext) < 16 else name[:200]
    return name or "attachment.bin"
