"""Bytes and headers to text: never an exception, whatever the mail claims its charset is."""

from __future__ import annotations

import codecs
import re
from email.header import decode_header

# Labels that mail clients write but Python does not know, or knows under another name.
_ALIASES = {
    "unknown-8bit": "windows-1252",
    "x-unknown": "windows-1252",
    "iso-8859-8-i": "iso-8859-8",
    "ks_c_5601-1987": "cp949",
    "x-mac-roman": "mac_roman",
    "ansi_x3.4-1968": "ascii",
    "us-ascii": "ascii",
}


def _codec(charset: str | None) -> str | None:
    if not charset:
        return None
    name = charset.strip().strip('"').lower()
    name = _ALIASES.get(name, name)
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def decode_bytes(data: bytes, charset: str | None = None) -> str:
    """Decode `data`, trusting the declared charset only when it decodes cleanly.

    Mislabelled mail is common (windows-1252 sent as iso-8859-1 or as utf-8, utf-8 sent
    as us-ascii), so: declared charset strictly, then UTF-8 strictly, then windows-1252
    (a superset of latin-1 for the printable range), then UTF-8 with replacement.
    """
    declared = _codec(charset)
    # Plain ASCII is the same in every charset that mail uses except UTF-7/16/32.
    if declared in (None, "ascii", "utf-8", "iso8859-1", "cp1252") and data.isascii():
        return data.decode("ascii")
    for name in (declared, "utf-8", "cp1252"):
        if not name:
            continue
        try:
            return data.decode(name)
        except (UnicodeDecodeError, LookupError):
            continue
    return data.decode("utf-8", errors="replace")


def decode_header_value(value: object) -> str:
    """An RFC 2047 / raw 8-bit header to text, unfolded."""
    if value is None:
        return ""
    if not isinstance(value, str):
        value = str(value)
    if _has_surrogates(value):
        # compat32 keeps raw 8-bit header bytes as surrogate escapes.
        value = decode_bytes(value.encode("ascii", "surrogateescape"))
    value = re.sub(r"\r?\n[ \t]+", " ", value)
    if "=?" not in value:
        return value.strip()
    try:
        chunks = decode_header(value)
    except Exception:  # malformed encoded words: show them as they are
        return value.strip()
    parts: list[str] = []
    for chunk, charset in chunks:
        if isinstance(chunk, bytes):
            parts.append(decode_bytes(chunk, charset))
        else:
            parts.append(chunk)
    # decode_header drops the white space between an encoded word and plain text;
    # joining plain chunks keeps what the sender wrote.
    return "".join(parts).strip()


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)
