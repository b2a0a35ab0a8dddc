"""What the write stage keeps of a parsed mail: attachments (skipped and inline) and sanitized HTML."""

from __future__ import annotations

from email.message import EmailMessage

from sqlalchemy import select

from pipeline.store.models import Attachment, Note, Ticket
from tests.conftest import make_mail


def _mail_with_parts(subject: str, html: str, attachment_size: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Jane Doe <jane@acme.example>"
    msg["To"] = "support@msp.example"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@acme.example>"
    msg.set_content("See the screenshot and the log.\n")
    msg.add_alternative(html, subtype="html")
    msg.get_payload()[1].add_related(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, maintype="image", subtype="png",
                                     cid="<shot1@acme.example>", filename="shot.png")
    msg.add_attachment(b"x" * attachment_size, maintype="application", subtype="octet-stream",
                       filename="server.log")
    return msg.as_bytes()


HTML = ('<html><body><p onclick="steal()">See the <b>screenshot</b>:</p><img src="cid:shot1@acme.example">'
        '<img src="https://tracker.example/pixel.gif"><script>alert(1)</script></body></html>')


def test_an_attachment_over_the_mailbox_limit_is_recorded_as_skipped_and_the_mail_still_processed(
        make_config, store, redis_client) -> None:
    from pipeline.process import MailProcessor

    config = make_config(max_attachment_bytes="1000")
    processor = MailProcessor(config, store, redis_client)
    result = processor.ingest("support", _mail_with_parts("Big log", HTML, attachment_size=5000))
    assert result.outcome == "ticket_created"
    with store.sessions() as s:
        rows = {a.filename: a for a in s.scalars(select(Attachment))}
    assert rows["server.log"].skipped_reason and "1000" in rows["server.log"].skipped_reason
    # Its size is estimated from the encoded part, which is never decoded: close, not exact.
    assert rows["server.log"].data == b"" and abs(rows["server.log"].size - 5000) <= 5
    assert rows["shot.png"].skipped_reason is None and rows["shot.png"].inline
    assert rows["shot.png"].content_id.strip("<>") == "shot1@acme.example"


def test_the_ticket_keeps_a_sanitized_html_copy(processor, store) -> None:
    processor.ingest("support", _mail_with_parts("Screenshot attached", HTML, attachment_size=10))
    with store.sessions() as s:
        ticket = s.scalar(select(Ticket))
    html = ticket.description_html
    assert "<b>screenshot</b>" in html and "cid:shot1@acme.example" in html
    for unsafe in ("<script", "onclick", "tracker.example"):
        assert unsafe not in html


def test_a_note_keeps_a_sanitized_html_copy_and_a_plain_text_mail_has_none(processor, store) -> None:
    first = processor.ingest("support", make_mail(subject="Wi-Fi drops"))
    number = first.entity["number"]
    processor.ingest("support", _mail_with_parts(f"RE: [Ticket#{number}] Wi-Fi drops", HTML, attachment_size=10))
    with store.sessions() as s:
        ticket = s.scalar(select(Ticket))
        note = s.scalar(select(Note))
    assert ticket.description_html is None  # the first mail had no HTML part
    assert "<script" not in note.body_html and "screenshot" in note.body_html
