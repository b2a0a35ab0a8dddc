"""The one promise every robustness test checks: any bytes give a defined parse result."""

from __future__ import annotations

import json
import re

from pipeline.parsers.mime import ParsedMail, Unparseable, mail_identity, parse_mail

# NUL and lone surrogates: text PostgreSQL or UTF-8 encoding would refuse.
TRASH = re.compile("[\x00\ud800-\udfff]")


def assert_parse_defined(raw: bytes, max_attachment_bytes: int) -> None:
    """`parse_mail` returns a ParsedMail whose JSON survives a round trip, or raises Unparseable."""
    try:
        mail = parse_mail(raw, max_attachment_bytes=max_attachment_bytes)
    except Unparseable:
        return
    assert isinstance(mail, ParsedMail)
    text = json.dumps(mail.as_json(), ensure_ascii=False)
    assert not TRASH.search(text), "text that the store cannot take"
    json.loads(text)
    assert len(mail_identity(mail)) == 64
