"""MIME header parameters (`Content-Type`, `Content-Disposition`) as senders really write them.

The stdlib decodes RFC 2231 continuations segment by segment and turns 8-bit names into
replacement characters; here the segments of one parameter are joined *before* they are
percent-decoded (a character split across `filename*0*` and `filename*1*` comes out
whole), raw 8-bit values are decoded like any header, and RFC 2047 encoded words inside
a quoted value (Outlook, old Thunderbird: `filename="=?UTF-8?B?…?="`) are decoded too.
"""

from __future__ import annotations

import re
from urllib.parse import quote_from_bytes, unquote_to_bytes

from pipeline.parsers.charset import decode_bytes, decode_header_value, unsurrogate

_PARAM = re.compile(r""";\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)""", re.DOTALL)
_CONTINUATION = re.compile(r"^(.+?)\*(\d{1,3})(\*?)$")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def split_header(raw: str | None) -> tuple[str, dict[str, str]]:
    """`value; a=1; b*=utf-8''x%C3%A4` → ('value', {'a': '1', 'b': 'xä'}); never raises."""
    if not raw:
        return "", {}
    text = unsurrogate(raw).replace("\r", "").replace("\n", " ")
    head, _, rest = text.partition(";")
    simple: dict[str, str] = {}
    extended: dict[str, str] = {}
    segments: dict[str, list[tuple[int, bool, str]]] = {}
    for m in _PARAM.finditer(";" + rest):
        name, value = m.group(1).lower(), m.group(2).strip()
        if value.startswith('"'):
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1] if value.endswith('"') and len(value) > 1 else value[1:])
        cont = _CONTINUATION.match(name)
        if cont:
            segments.setdefault(cont.group(1), []).append((int(cont.group(2)), bool(cont.group(3)), value))
        elif name.endswith("*"):
            extended.setdefault(name[:-1], _extended(value))
        else:
            simple.setdefault(name, value)
    params = dict(simple)
    for name, parts in segments.items():
        params[name] = _join_segments(sorted(parts, key=lambda p: p[0]))
    params.update(extended)
    for name, value in params.items():
        if "=?" in value:
            params[name] = decode_header_value(value)
    return head.strip(), params


def _extended(value: str) -> str:
    charset, quote1, rest = value.partition("'")
    if not quote1:
        return value
    _lang, _, encoded = rest.partition("'")
    return decode_bytes(unquote_to_bytes(encoded), charset or None)


def _join_segments(parts: list[tuple[int, bool, str]]) -> str:
    """RFC 2231 section 3/4: the first segment names the charset, the others follow it."""
    charset: str | None = None
    pieces: list[str] = []  # percent-encoded, joined before decoding
    for index, (_n, encoded, value) in enumerate(parts):
        if encoded:
            if index == 0 and value.count("'") >= 2:
                charset, _, value = value.partition("'")
                _lang, _, value = value.partition("'")
            pieces.append(value)
        else:
            pieces.append(quote_from_bytes(value.encode("utf-8", "surrogateescape"), safe=""))
    return decode_bytes(unquote_to_bytes("".join(pieces)), charset or None)
