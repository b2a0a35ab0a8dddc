"""Property: whatever happens to a real mail on its way, parsing it ends with a defined outcome.

Hypothesis mutates the real fixtures (tests/fixtures/**/*.eml) with what transport, storage and
broken clients do to mail — truncation, flipped bytes, broken or lost boundaries, huge headers,
NUL bytes, duplicated and removed header lines, lost line ends — alone and combined. For every
mutant `parse_mail` returns a `ParsedMail` whose `as_json()` can be written as JSON (and stored:
no NUL, no lone surrogate), or raises `Unparseable`; nothing else escapes.

Deterministic for CI: `derandomize=True` and no example database, so every run tries the same
examples; a bounded `max_examples` keeps it to a few seconds.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.parsers.defined import assert_parse_defined

FIXTURES = Path(__file__).parent.parent / "fixtures"
REAL = sorted(FIXTURES.rglob("*.eml"))
_RAW = {p: p.read_bytes() for p in REAL}
_BOUNDARY = re.compile(rb'boundary="?([^";\r\n]+)', re.IGNORECASE)

CI = settings(max_examples=400, deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _header_end(raw: bytes) -> int:
    m = re.search(rb"\r?\n\r?\n", raw)
    return m.start() if m else len(raw)


def _truncate(raw: bytes, at: float, _: int) -> bytes:
    return raw[: max(1, int(len(raw) * at))]


def _flip(raw: bytes, at: float, value: int) -> bytes:
    i = min(len(raw) - 1, int(len(raw) * at))
    return raw[:i] + bytes([value]) + raw[i + 1:]


def _nul(raw: bytes, at: float, count: int) -> bytes:
    i = int(len(raw) * at)
    return raw[:i] + b"\x00" * (count % 64 + 1) + raw[i:]


def _break_boundary(raw: bytes, at: float, how: int) -> bytes:
    found = _BOUNDARY.findall(raw)
    if not found:
        return raw
    b = found[int(at * len(found)) % len(found)]
    return [
        raw.replace(b"--" + b, b"--" + b[:-1] + b"~", 1),  # one delimiter line damaged
        raw.replace(b + b"--", b),  # no closing delimiter
        raw.replace(b"boundary=", b"boundery=", 1),  # the parameter lost
        raw.replace(b"--" + b + b"\n", b"--" + b + b"\nContent-Type: multipart/mixed; boundary=" + b + b"\n", 2),
        raw.replace(b"--" + b, b"--" + b * 3),  # delimiters that do not match the declaration
    ][how % 5]


def _huge_header(raw: bytes, at: float, size: int) -> bytes:
    name = [b"Subject", b"X-Spam-Report", b"References", b"Received", b"To"][size % 5]
    value = (b"=?utf-8?B?w7w=?= " if size % 2 else b"x") * (1000 + size * 97)
    return name + b": " + value + b"\n" + raw


def _many_headers(raw: bytes, at: float, count: int) -> bytes:
    return b"".join(b"X-Filler-%d: %s\n" % (i, b"y" * 60) for i in range(200 + count * 20)) + raw


def _header_lines(raw: bytes) -> tuple[list[bytes], bytes]:
    end = _header_end(raw)
    return raw[:end].split(b"\n"), raw[end:]


def _duplicate_header(raw: bytes, at: float, _: int) -> bytes:
    lines, rest = _header_lines(raw)
    i = int(at * len(lines)) % len(lines)
    return b"\n".join(lines[: i + 1] + [lines[i]] + lines[i + 1:]) + rest


def _remove_header(raw: bytes, at: float, _: int) -> bytes:
    lines, rest = _header_lines(raw)
    i = int(at * len(lines)) % len(lines)
    return b"\n".join(lines[:i] + lines[i + 1:]) + rest


def _lose_separator(raw: bytes, at: float, _: int) -> bytes:
    return raw.replace(b"\n\n", b"\n", 1)


def _line_ends(raw: bytes, at: float, how: int) -> bytes:
    i = int(len(raw) * at)
    return raw[:i] + raw[i:].replace(b"\n", [b"\r\n", b"\r", b"\n\r"][how % 3])


def _garbage_labels(raw: bytes, at: float, value: int) -> bytes:
    junk = bytes([value]) * 3
    return raw.replace(b"charset=", b"charset=x" + junk, 2).replace(b"=?", b"=?" + junk + b"?", 2)


def _swap_encoding(raw: bytes, at: float, how: int) -> bytes:
    pairs = [(b"base64", b"quoted-printable"), (b"quoted-printable", b"base64"), (b"7bit", b"base64"),
             (b"base64", b"x-uuencode")]
    old, new = pairs[how % len(pairs)]
    return raw.replace(old, new, 1)


MUTATIONS = [_truncate, _flip, _nul, _break_boundary, _huge_header, _many_headers, _duplicate_header,
             _remove_header, _lose_separator, _line_ends, _garbage_labels, _swap_encoding]

mutation = st.tuples(st.sampled_from(MUTATIONS), st.floats(0, 1, allow_nan=False), st.integers(0, 255))


def _assert_defined(raw: bytes) -> None:
    assert_parse_defined(raw, max_attachment_bytes=50_000)


def test_every_fixture_is_found() -> None:
    assert len(REAL) >= 80


@CI
@given(path=st.sampled_from(REAL), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_a_mutated_real_mail_parses_or_is_unparseable(path: Path, mutations: list) -> None:
    raw = _RAW[path]
    for mutate, at, value in mutations:
        raw = mutate(raw, at, value) or b"\n"
    _assert_defined(raw)


@settings(CI, max_examples=150)
@given(path=st.sampled_from(REAL), at=st.integers(0, 10**9), noise=st.binary(min_size=1, max_size=64))
def test_random_bytes_spliced_into_a_real_mail_never_escape(path: Path, at: int, noise: bytes) -> None:
    raw = _RAW[path]
    i = at % (len(raw) + 1)
    _assert_defined(raw[:i] + noise + raw[i:])
