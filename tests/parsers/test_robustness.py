"""No input crashes the parse stage, and big mail stays within memory.

A deterministic mutation corpus (seeded, so a failure replays exactly) over every real
fixture: truncation, flipped bytes, broken boundaries, huge headers, lost separators,
NUL bytes, mixed line endings; plus random bytes. Every outcome is a ParsedMail whose
JSON can be written and stored (no NUL, no lone surrogate), or Unparseable.
"""

from __future__ import annotations

import base64
import random
import re
import time
import tracemalloc
from pathlib import Path

import pytest

from pipeline.parsers.mime import ParsedMail, parse_mail
from tests.parsers.defined import assert_parse_defined

FIXTURES = Path(__file__).parent.parent / "fixtures"
REAL = sorted(FIXTURES.glob("*.eml")) + sorted((FIXTURES / "parsing").glob("*.eml"))


def _mutations(raw: bytes, rng: random.Random) -> list[bytes]:
    out = [raw[: rng.randrange(1, max(2, len(raw)))] for _ in range(4)]  # truncated anywhere
    for _ in range(6):  # flipped bytes
        data = bytearray(raw)
        for _ in range(rng.randrange(1, 40)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        out.append(bytes(data))
    boundary = re.search(rb'boundary="?([^";\r\n]+)', raw)
    if boundary:
        b = boundary.group(1)
        out.append(raw.replace(b"--" + b, b"--" + b[:-1] + b"X", 1))  # one boundary line broken
        out.append(raw.replace(b + b"--", b))  # no closing boundary
        out.append(raw.replace(b"boundary=", b"boundary-lost="))  # boundary parameter lost
        out.append(raw.replace(b"--" + b, b"--" + b + b"\r\nContent-Type: multipart/mixed; boundary=" + b, 3))
    out.append(b"Subject: " + b"A" * 200_000 + b"\n" + raw)  # a huge header
    out.append(b"".join(b"X-Spam-%d: %s\n" % (i, b"y" * 50) for i in range(5000)) + raw)  # very many headers
    out.append(raw.replace(b"\n\n", b"\n", 1))  # no blank line after the header block
    out.append(raw.replace(b"\n", b"\r\n")[: len(raw) // 2] + raw[len(raw) // 2:])  # mixed line endings
    out.append(raw.replace(b"\n", b"\x00\n", 20))  # NUL bytes
    out.append(raw.replace(b"charset=", b"charset=x-\xff\xfe-"))  # garbage charset labels
    out.append(raw.replace(b"=?", b"=?\xff?", 3))  # broken encoded words
    out.append(raw.replace(b"base64", b"quoted-printable").replace(b"quoted-printable", b"base64", 1))
    return out


def _assert_defined(raw: bytes) -> None:
    assert_parse_defined(raw, max_attachment_bytes=10_000)


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_no_mutation_of_a_real_mail_crashes_the_parser(path: Path) -> None:
    raw = path.read_bytes()
    rng = random.Random(path.name)  # deterministic per fixture
    for mutated in _mutations(raw, rng):
        _assert_defined(mutated)


def test_random_bytes_after_a_header_never_crash_the_parser() -> None:
    rng = random.Random(20261125)
    for _ in range(300):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 3000)))
        ctype = rng.choice([b"text/plain", b"text/html", b"multipart/mixed; boundary=x", b"message/rfc822",
                            b"multipart/report; report-type=delivery-status; boundary=x", b"application/ms-tnef"])
        _assert_defined(b"From: a@b.example\nContent-Type: " + ctype + b"\nContent-Transfer-Encoding: "
                        + rng.choice([b"base64", b"quoted-printable", b"8bit", b"x-uuencode"]) + b"\n\n" + body)


def test_deeply_nested_multiparts_end_with_a_defined_outcome() -> None:
    depth = 3000
    raw = b"From: a@b.example\nSubject: nested\nContent-Type: multipart/mixed; boundary=b0\n\n"
    raw += b"".join(b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i, i + 1) for i in range(depth))
    raw += b"--b%d\nContent-Type: text/plain\n\ndeep text\n" % depth
    mail = parse_mail(raw)
    assert mail.subject == "nested"
    assert "deep text" in mail.body_text
    assert mail.warnings == ["MIME structure nested too deeply: body read as text"]


def _peak(raw: bytes) -> tuple[ParsedMail, int]:
    tracemalloc.start()
    try:
        mail = parse_mail(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return mail, peak


def test_a_20_mb_mail_parses_within_five_times_its_size() -> None:
    attachment = random.Random(1).randbytes(14_000_000)
    encoded = base64.encodebytes(attachment)
    raw = (b"From: Jane Doe <jane@acme.example>\nSubject: Big scan\nMessage-ID: <big@acme.example>\n"
           b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=big\n\n--big\n"
           b"Content-Type: text/plain\n\nThe scan is attached.\n--big\nContent-Type: application/pdf\n"
           b"Content-Disposition: attachment; filename=scan.pdf\nContent-Transfer-Encoding: base64\n\n"
           + encoded + b"--big--\n")
    assert len(raw) > 18_000_000
    started = time.perf_counter()
    mail, peak = _peak(raw)
    assert time.perf_counter() - started < 30
    assert mail.body_new == "The scan is attached."
    assert mail.attachments[0].data == attachment
    assert peak < 5 * len(raw), f"peak {peak / 1e6:.1f} MB for a {len(raw) / 1e6:.1f} MB mail"


def test_a_mail_of_10000_parts_parses_within_five_times_its_size() -> None:
    parts = b"".join(b"--p\nContent-Type: text/plain; name=\"f%d.txt\"\nContent-Disposition: attachment; "
                     b"filename=\"f%d.txt\"\n\nfile %d\n" % (i, i, i) for i in range(10_000))
    raw = (b"From: a@b.example\nSubject: many parts\nContent-Type: multipart/mixed; boundary=p\n\n"
           b"--p\nContent-Type: text/plain\n\nMany files.\n" + parts + b"--p--\n")
    mail, peak = _peak(raw)
    assert mail.body_text == "Many files."
    assert len(mail.attachments) == 501  # 500 kept, then one entry saying why the rest was not
    assert mail.attachments[-1].skipped == "too many attachments in one mail"
    assert any("MIME parts" in w or "attachments" in w for w in mail.warnings)
    assert peak < 5 * len(raw), f"peak {peak / 1e6:.1f} MB for {len(raw) / 1e6:.1f} MB"
