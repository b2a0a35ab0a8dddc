"""Bytes and headers to text: never an exception, whatever the mail claims its charset is.

Order of trust for a body or header (`decode_bytes`):
1. the declared charset, strictly — except that a "western" label (us-ascii, iso-8859-1,
   windows-1252) on bytes that are valid UTF-8 is taken as the mislabelled UTF-8 it is;
2. UTF-8, strictly, or with a few replacements when the text is clearly UTF-8 with a
   damaged sequence (a line cut mid-character);
3. ISO-2022-JP when the bytes carry its escape sequences;
4. charset-normalizer's guess, only for non-western scripts (CJK, Cyrillic, Greek, …) —
   for short western text it guesses among near-identical code pages;
5. windows-1252, then latin-1 (which decodes any byte).
"""

from __future__ import annotations

import binascii
import codecs
import re

import charset_normalizer

# Labels that mail clients write but Python does not know, or knows under another name.
_ALIASES = {
    "unknown-8bit": None,
    "x-unknown": None,
    "unknown": None,
    "default": None,
    "8bit": None,
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "x-mac-roman": "mac_roman",
    "macintosh": "mac_roman",
    "ansi_x3.4-1968": "ascii",
    "us-ascii": "ascii",
    "x-sjis": "shift_jis",
    "shift-jis": "shift_jis",
    "x-euc-jp": "euc_jp",
    "gb2312": "gb18030",  # a superset: mail labelled gb2312 often holds GBK characters
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "iso-8859-1": "cp1252",  # as browsers do: the C1 range is windows-1252 in practice
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "iso_8859-1": "cp1252",
    "utf8": "utf-8",
    "unicode-1-1-utf-7": "utf-7",
    "x-utf-7": "utf-7",
}
_WESTERN = {"ascii", "cp1252", "iso8859-15", "latin-1", "iso8859-1"}
# charset-normalizer's answers we accept; for western text it is no better than cp1252.
_NON_WESTERN_PREFIXES = ("cp932", "shift_jis", "euc_jp", "iso2022", "big5", "gb", "cp949", "euc_kr",
                         "cp1251", "koi8", "iso8859-5", "mac_cyrillic", "cp866", "cp1253", "iso8859-7",
                         "cp1255", "iso8859-8", "cp1256", "iso8859-6", "cp874", "tis_620", "cp1258",
                         "utf_16", "utf_32", "cp1250", "iso8859-2")
# Charsets whose encoded form is 7-bit: ASCII bytes do not mean ASCII text.
_SEVEN_BIT = {"utf-7", "iso2022_jp", "iso2022_jp_1", "iso2022_jp_2", "iso2022_jp_ext", "iso2022_jp_3",
              "iso2022_jp_2004", "iso2022_kr", "hz", "utf-16", "utf-16-le", "utf-16-be", "utf-32"}
_ISO2022_ESCAPE = re.compile(rb"\x1b[\$\(][@ABDJ]")
_SURROGATES = re.compile("[\udc80-\udcff]")
_FOLD = re.compile(r"\r?\n[ \t]+")
_GUESS_LIMIT = 32 * 1024


def codec_name(charset: str | None) -> str | None:
    """Python's codec for a MIME charset label, or None when unknown or meaningless."""
    if not charset:
        return None
    name = charset.strip().strip("\"'").lower()
    name = name.split("*", 1)[0]  # RFC 2231 language suffix: utf-8*en
    if name in _ALIASES:
        name = _ALIASES[name]
        if name is None:
            return None
    try:
        return codecs.lookup(name).name
    except (LookupError, ValueError):
        return None


def decode_bytes(data: bytes, charset: str | None = None) -> str:
    """Decode `data` to text; never raises (see the module docstring for the order of trust)."""
    if not data:
        return ""
    declared = codec_name(charset)
    if data.isascii():
        if declared in _SEVEN_BIT:
            try:
                return data.decode(declared)
            except (UnicodeDecodeError, ValueError):
                pass
        if b"\x1b" in data and _ISO2022_ESCAPE.search(data):
            try:
                return data.decode("iso2022_jp_ext")
            except UnicodeDecodeError:
                pass
        return data.decode("ascii")
    if declared and declared not in _WESTERN:
        try:
            return data.decode(declared)
        except (UnicodeDecodeError, LookupError, ValueError):
            pass
    utf8 = _utf8(data)
    if utf8 is not None:
        return utf8
    if declared in _WESTERN:
        return _western(data)
    if _ISO2022_ESCAPE.search(data):
        try:
            return data.decode("iso2022_jp_ext")
        except UnicodeDecodeError:
            pass
    guessed = _guess(data)
    return guessed if guessed is not None else _western(data)


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # Clearly UTF-8 with one damaged sequence (a line cut mid-character) stays UTF-8.
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    good = sum(1 for ch in text if ord(ch) > 0x7F) - bad
    return text if good >= 2 and bad <= max(1, good // 5) else None


def _western(data: bytes) -> str:
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _guess(data: bytes) -> str | None:
    sample = data[:_GUESS_LIMIT]
    if sum(1 for b in sample if b > 0x7F) < 8:  # too little to tell scripts apart
        return None
    try:
        best = charset_normalizer.from_bytes(sample).best()
    except Exception:  # noqa: BLE001 - a detector bug must not cost the mail
        return None
    if best is None or not best.encoding.startswith(_NON_WESTERN_PREFIXES):
        return None
    try:
        return data.decode(best.encoding)
    except (UnicodeDecodeError, LookupError):
        return None


def unsurrogate(text: str) -> str:
    """Text as compat32 hands it over, its raw 8-bit bytes (surrogate escapes) decoded."""
    if _SURROGATES.search(text):
        return decode_bytes(text.encode("utf-8", "surrogateescape"))
    return text


def decode_header_value(value: object) -> str:
    """An RFC 2047 / raw 8-bit header to text, unfolded; never raises.

    Pass the raw value (`Message.raw_items()`): compat32 keeps 8-bit header bytes as
    surrogate escapes, which are decoded here like a body without a declared charset.
    Adjacent encoded words in one charset are joined before decoding, so a character
    split across two words comes out whole; white space between encoded words is
    dropped (RFC 2047 6.2); a malformed word is shown as written.
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        value = str(value)
    if value.isascii() and "=?" not in value and "\n" not in value and "\r" not in value:
        return value.strip()  # most headers: nothing to unfold or decode
    value = _FOLD.sub(" ", unsurrogate(value)).replace("\r", "").replace("\n", " ")
    if "=?" not in value:
        return value.strip()
    return decode_encoded_words(value).strip()


_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")


def decode_encoded_words(text: str) -> str:
    out: list[str] = []
    pending: list[bytes] = []  # bytes of adjacent encoded words in one charset
    pending_charset: str | None = None
    pos = 0

    def flush() -> None:
        if pending:
            out.append(decode_bytes(b"".join(pending), pending_charset))
            pending.clear()

    for m in _ENCODED_WORD.finditer(text):
        between = text[pos:m.start()]
        charset = m.group(1)
        if between.strip() or not pending or (codec_name(charset) or charset) != (codec_name(pending_charset) or pending_charset):
            flush()
            if between.strip() or not out or pos == 0:
                out.append(between)
        pending_charset = charset
        pending.append(_decode_word(m.group(2), m.group(3)))
        pos = m.end()
    flush()
    out.append(text[pos:])
    return "".join(out)


def _decode_word(encoding: str, payload: str) -> bytes:
    data = payload.encode("ascii", "replace")
    if encoding in "Qq":
        return _Q_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), data.replace(b"_", b" "))
    data = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    data += b"=" * (-len(data) % 4)
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        return data
