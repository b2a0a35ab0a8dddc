"""Big base64 bodies are lifted out before the stdlib parser reads a mail (`mime._lift_bodies`):
the tree that comes out must be the one the stdlib builds from the whole mail, whatever the mail."""

from __future__ import annotations

import base64
import random
from email.message import Message
from email.parser import BytesFeedParser

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.parsers import mime

HEAD = (
    "Received: from EUR05-AM6-obe.outbound.protection.outlook.com (mail-am6eur05on2071.outbound.protection.outlook.com"
    " [40.107.22.71]) by mx.msp.example with ESMTPS id 4Ws1Zk0QZ; Tue, 01 Dec 2026 09:14:22 +0100\r\n"
    "From: Anna Berg <anna.berg@contoso.example>\r\n"
    "To: support@msp.example\r\n"
    "Subject: Scanner on floor 3 saves blank pages\r\n"
    "Date: Tue, 01 Dec 2026 09:14:20 +0100\r\n"
    "Message-ID: <AM6PR05MB6088C2D8F1E4@AM6PR05MB6088.eurprd05.prod.outlook.com>\r\n"
    "MIME-Version: 1.0\r\n"
)


def _base64_lines(size: int, seed: int) -> str:
    data = random.Random(seed).randbytes(size)
    return base64.encodebytes(data).decode().replace("\n", "\r\n")


def _stdlib(raw: bytes) -> Message:
    parser = BytesFeedParser()
    parser.feed(raw)
    return parser.close()


def _same_tree(a: Message, b: Message) -> bool:
    leaves = lambda m: [(p.get_content_type(), p.get_payload()) for p in m.walk() if not p.is_multipart()]  # noqa: E731
    return a.as_bytes() == b.as_bytes() and leaves(a) == leaves(b) and \
        [p.defects for p in a.walk()].__repr__() == [p.defects for p in b.walk()].__repr__()


def test_a_mail_with_a_scan_and_an_inline_logo_reads_as_the_stdlib_reads_it_whole() -> None:
    pdf, logo = _base64_lines(120_000, 1), _base64_lines(30_000, 2)
    raw = (HEAD + 'Content-Type: multipart/mixed; boundary="_004_AM6PR05MB6088_"\r\n\r\n'
           "--_004_AM6PR05MB6088_\r\n"
           'Content-Type: multipart/related; boundary="_003_AM6PR05MB6088_"; type="text/html"\r\n\r\n'
           "--_003_AM6PR05MB6088_\r\n"
           'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
           '<p>Hallo, der Scanner speichert nur leere Seiten. Scan anbei.</p><img src=3D"cid:logo001">\r\n'
           "--_003_AM6PR05MB6088_\r\n"
           'Content-Type: image/png; name="image001.png"\r\nContent-ID: <logo001>\r\n'
           "Content-Transfer-Encoding: base64\r\n\r\n" + logo +
           "--_003_AM6PR05MB6088_--\r\n\r\n"
           "--_004_AM6PR05MB6088_\r\n"
           'Content-Type: application/pdf; name="scan_0042.pdf"\r\n'
           'Content-Disposition: attachment; filename="scan_0042.pdf"\r\n'
           "Content-Transfer-Encoding: BASE64\r\n\r\n" + pdf +
           "--_004_AM6PR05MB6088_--\r\n").encode()
    skeleton, lifted = mime._lift_bodies(raw)
    assert len(lifted) == 2 and len(skeleton) < 2_000  # both bodies left the parser's line loop
    assert _same_tree(mime._message(raw, []), _stdlib(raw))
    mail = mime.parse_mail(raw)
    assert [(a.filename, a.data) for a in mail.attachments] == [
        ("image001.png", random.Random(2).randbytes(30_000)), ("scan_0042.pdf", random.Random(1).randbytes(120_000))]


def test_a_base64_header_quoted_in_a_text_body_leaves_the_mail_read_whole() -> None:
    # A technician pasted a raw mail into a plain-text reply: its header and body are text here.
    pasted = _base64_lines(30_000, 3)
    raw = (HEAD + "Content-Type: text/plain; charset=utf-8\r\n\r\n"
           "The customer's mail as it arrived:\r\n\r\n"
           "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + pasted + "-- \r\nAnna\r\n").encode()
    assert mime._lift_bodies(raw)[1] == {}  # a blank line before the header: it is in a body, not lifted
    msg = mime._message(raw, [])
    assert _same_tree(msg, _stdlib(raw))
    assert pasted in msg.get_payload()


def test_a_part_that_says_base64_but_holds_a_dash_line_is_read_whole() -> None:
    body = _base64_lines(20_000, 4)
    half = len(body) // 2 - (len(body) // 2) % 78
    raw = (HEAD + 'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
           "--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
           "--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + body[:half] + "--not a boundary, just a line\r\n" + body[half:] + "\r\n" + "A" * 40_000 + "\r\n"
           "--b1--\r\n").encode()
    assert mime._lift_bodies(raw)[1] == {}  # the dash line is no declared boundary: nothing lifted
    msg = mime._message(raw, [])
    assert _same_tree(msg, _stdlib(raw))
    assert "--not a boundary" in msg.get_payload()[1].get_payload()


def test_a_multipart_that_says_base64_is_lifted_refused_and_read_whole() -> None:
    # A broken mailer's alternative part, declared base64 and holding none of its own boundary.
    raw = (HEAD + 'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
           "--outer\r\nContent-Type: text/plain\r\n\r\nSee below.\r\n"
           '--outer\r\nContent-Type: multipart/alternative; boundary="inner"\r\n'
           "Content-Transfer-Encoding: base64\r\n\r\n" + _base64_lines(40_000, 7) +
           "--outer--\r\n").encode()
    skeleton, lifted = mime._lift_bodies(raw)
    assert lifted  # it passes the looks, not the check
    assert not mime._put_back(_stdlib(skeleton), lifted)
    assert _same_tree(mime._message(raw, []), _stdlib(raw))


def test_an_empty_base64_part_and_a_boundary_after_a_lone_cr_are_not_swallowed() -> None:
    # Found by a differential fuzz: an empty body's boundary sat right after the blank line, and
    # the stdlib breaks lines at a lone CR as well.
    empty = (HEAD + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
             "--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             "--b\r\nContent-Type: text/plain\r\n\r\n" + "Please see the log.\r\n" * 2000 + "--b--\r\n").encode()
    lone_cr = (HEAD + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
               "--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
               + "QUFB\r\n" * 6000 + "\r--b\r\nContent-Type: text/plain\r\n\r\nThe log is attached.\r\n--b--\r\n").encode()
    for raw in (empty, lone_cr):
        msg = mime._message(raw, [])
        assert _same_tree(msg, _stdlib(raw))
        assert len(list(msg.walk())) == 3


def test_a_small_mail_is_not_touched() -> None:
    raw = (HEAD + "Content-Type: text/plain\r\n\r\nThe printer is offline again.\r\n").encode()
    assert mime._lift_bodies(raw) == (raw, {})


def _scan_mail(crlf: bool) -> bytes:
    nl = "\r\n" if crlf else "\n"
    pdf, logo = _base64_lines(60_000, 5), _base64_lines(12_000, 6)
    text = (HEAD + 'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
            "--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n"
            "--inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nScan attached, pages are blank.\r\n"
            "--inner\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n" + logo +
            "--inner--\r\n"
            "--outer\r\nContent-Type: message/rfc822\r\n\r\n"
            "From: scanner@contoso.example\r\nSubject: Scan\r\nContent-Type: application/pdf\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n" + pdf +
            "--outer--\r\n")
    return text.replace("\r\n", nl).encode()


def _mutate(raw: bytes, kind: int, at: float, byte: int) -> bytes:
    i = int(len(raw) * at)
    line_start = raw.rfind(b"\n", 0, i) + 1
    if kind == 0:
        return raw[:i]  # truncated in transit
    if kind == 1:
        return raw[:i] + bytes([byte]) + raw[i + 1:]  # a flipped byte
    if kind == 2:
        return raw[:line_start] + b"--outer\r\n" + raw[line_start:]  # a boundary where none belongs
    if kind == 3:
        return raw[:line_start] + b"--" + raw[line_start:]  # a line that starts with dashes
    if kind == 4:
        end = raw.find(b"\n", i)
        return raw[:line_start] + (raw[end + 1:] if end >= 0 else b"")  # a lost line
    if kind == 5:
        return raw[:i].replace(b"\r\n", b"\n") + raw[i:]  # line ends changed half-way
    return raw.replace(b"\r\n\r\n", b"\r\n", 1 + byte % 4)  # blank lines lost


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(crlf=st.booleans(), kinds=st.lists(st.integers(0, 6), max_size=3),
       at=st.floats(0.0, 1.0), byte=st.integers(0, 255))
def test_whatever_happened_to_a_big_mail_its_tree_is_the_one_the_stdlib_reads_whole(
        crlf: bool, kinds: list[int], at: float, byte: int) -> None:
    raw = _scan_mail(crlf)
    for n, kind in enumerate(kinds):
        raw = _mutate(raw, kind, (at + n * 0.37) % 1.0, byte)
    assert _same_tree(mime._message(raw, []), _stdlib(raw))
