"""The closed loop over real SMTP (aiosmtpd on loopback): what arrives, with which headers, how often."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update

from pipeline.notify.send import MAX_ATTEMPTS, deliver
from pipeline.parsers.references import find_ticket_number
from pipeline.process import MailProcessor
from pipeline.store.models import Contact, Notification
from pipeline.store.queries import show_ticket
from tests.conftest import fixture_bytes, make_mail
from tests.notify.helpers import outbox, send_pending, without_number
from tests.notify.smtp import SmtpServer

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)


def test_a_new_ticket_sends_one_notification_to_the_sender_with_the_number_in_the_subject(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    result = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0)
    number = result.entity["number"]

    report = send_pending(store, config)

    assert len(report.sent) == 1
    [got] = smtp.inbox.received
    assert got.rcpt_tos == ["jane@acme.example"]
    assert got.mail_from == "support@msp.example"
    msg = got.message
    assert msg["Subject"] == f"[Ticket#{number}] Outlook keeps asking for my password"
    assert find_ticket_number(msg["Subject"], config.settings.numbering) == number
    assert msg["From"] == "MSP Service Desk <support@msp.example>"
    assert msg["Reply-To"] == "support@msp.example"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["In-Reply-To"] == "<jane-outlook-pw-20261123@mail.acme.example>"
    assert msg["References"].split()[-1] == "<jane-outlook-pw-20261123@mail.acme.example>"
    [row] = outbox(store)
    assert msg["Message-ID"] == row.message_id  # recorded before sending
    assert (row.status, row.attempts) == ("sent", 1) and row.sent_at is not None
    # Both parts; the HTML one escapes what it shows.
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    assert number in text and f"[Ticket#{number}]" in text
    assert f"<b>{number}</b>" in html


def test_a_reply_built_from_the_captured_notification_without_the_number_becomes_a_note(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    number = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0).entity["number"]
    send_pending(store, config)
    notification = smtp.inbox.received[0].message

    # Jane's client drops the tag and the number, but keeps the threading headers.
    subject = "Re: " + without_number(notification["Subject"])
    assert number not in subject
    reply = make_mail(subject=subject, body="It still asks, even after the restart.\n",
                      headers={"In-Reply-To": notification["Message-ID"],
                               "References": f"{notification['References']} {notification['Message-ID']}"})
    result = processor.ingest("support", reply, received_at=T0 + timedelta(minutes=5))

    assert (result.outcome, result.entity) == ("note_added", {"type": "ticket", "number": number})
    assert any(s.stage == "resolve" and "answers our notification" in s.why for s in result.trace)
    with store.sessions() as s:
        notes = show_ticket(s, number)["notes"]
    assert [n["body"] for n in notes] == ["It still asks, even after the restart."]


def test_a_stranger_holding_our_message_id_only_by_guessing_gets_a_new_ticket(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    number = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0).entity["number"]
    forged = f"<mailloop+ticket+{number}+n1+0123456789abcdef@msp.example>"  # right form, never sent
    raw = make_mail(from_="eve@evil.example", subject="Re: hello", body="Let me in.\n",
                    headers={"In-Reply-To": forged, "References": forged})
    result = processor.ingest("support", raw, received_at=T0 + timedelta(minutes=1))
    assert result.outcome == "ticket_created" and result.entity["number"] != number


def test_an_auto_reply_gets_no_notification(processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    result = processor.ingest("support", fixture_bytes("out_of_office.eml"), received_at=T0)

    assert result.outcome == "ticket_created"
    assert send_pending(store, config).sent == []
    assert smtp.inbox.received == [] and outbox(store) == []
    assert any(s.stage == "notify" and "auto-reply" in s.why for s in result.trace)


def test_an_opted_out_contact_gets_none(processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    with store.transaction() as s:
        s.execute(update(Contact).where(Contact.email == "jane@acme.example").values(notifications=False))

    result = processor.ingest("support", make_mail(subject="VPN drops every hour"), received_at=T0)

    assert result.outcome == "ticket_created"
    send_pending(store, config)
    assert smtp.inbox.received == [] and outbox(store) == []
    assert any("opted out" in s.why for s in result.trace if s.stage == "notify")


def test_with_the_smtp_server_down_it_is_retried_and_arrives_exactly_once_when_it_is_back(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    smtp.stop()
    processor.ingest("support", make_mail(subject="Scanner offline"), received_at=T0)

    first = send_pending(store, config)
    [row] = outbox(store)
    assert first.retry == [row.id] and first.sent == []
    assert row.status == "pending" and row.attempts == 1
    assert "Connection refused" in row.last_error and row.next_attempt_at is not None
    second = deliver(store, config, [row.id])  # the task's retry, server still down
    assert second.retry == [row.id]

    smtp.start()
    third = deliver(store, config, [row.id])
    again = deliver(store, config, [row.id])  # a duplicate task, or the sweep, comes late

    assert third.sent == [row.id] and again.skipped == [row.id]
    assert smtp.inbox.count() == 1
    [row] = outbox(store)
    assert (row.status, row.attempts, row.last_error) == ("sent", 3, None)


def test_a_refused_recipient_fails_for_good_and_is_not_retried(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    smtp.inbox.refuse.add("jane@acme.example")
    processor.ingest("support", make_mail(subject="Keyboard missing keys"), received_at=T0)

    report = send_pending(store, config)

    [row] = outbox(store)
    assert report.failed == [row.id] and row.status == "failed"
    assert "550" in row.last_error and "no such user" in row.last_error
    assert deliver(store, config, [row.id]).skipped == [row.id]
    assert smtp.inbox.received == []


def test_one_refused_recipient_does_not_hold_back_the_others(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    smtp.inbox.refuse.add("jane@acme.example")
    processor.ingest("support", make_mail(subject="Keyboard missing keys"), received_at=T0)
    processor.ingest("support", make_mail(from_="Kim Lee <kim.lee@fabrikam.example>", subject="Mouse"),
                     received_at=T0)

    report = send_pending(store, config)

    assert (len(report.failed), len(report.sent)) == (1, 1)
    assert [r.rcpt_tos for r in smtp.inbox.received] == [["kim.lee@fabrikam.example"]]


def test_a_row_claimed_by_a_live_sender_is_left_alone_until_its_lease_runs_out(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    processor.ingest("support", make_mail(subject="Docking station"), received_at=T0)
    [row] = outbox(store)
    now = datetime.now(timezone.utc)
    with store.transaction() as s:  # another sender claimed it a moment ago, then died
        s.execute(update(Notification).where(Notification.id == row.id).values(
            status="sending", lease_until=now + timedelta(seconds=120), attempts=1))

    assert deliver(store, config, [row.id]).skipped == [row.id]
    assert smtp.inbox.received == []
    later = deliver(store, config, [row.id], now=now + timedelta(seconds=121))

    assert later.sent == [row.id] and smtp.inbox.count() == 1
    [row] = outbox(store)
    assert smtp.inbox.received[0].message["Message-ID"] == row.message_id  # the resend keeps it


def test_a_row_out_of_attempts_is_failed_not_retried_forever(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    smtp.stop()
    processor.ingest("support", make_mail(subject="Projector"), received_at=T0)
    [row] = outbox(store)
    with store.transaction() as s:
        s.execute(update(Notification).where(Notification.id == row.id).values(attempts=MAX_ATTEMPTS - 1))

    report = deliver(store, config, [row.id])

    [row] = outbox(store)
    assert report.failed == [row.id] and row.status == "failed"
    assert row.last_error.startswith(f"gave up after {MAX_ATTEMPTS} attempts")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_notifications_are_sent_in_order_over_one_connection(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    for i in range(20):
        processor.ingest("support", make_mail(from_=f"user{i}@acme.example", subject=f"Issue {i}"), received_at=T0)

    report = send_pending(store, config)

    assert len(report.sent) == 20
    assert [r.rcpt_tos[0] for r in smtp.inbox.received] == [f"user{i}@acme.example" for i in range(20)]
    with store.sessions() as s:
        assert set(s.scalars(select(Notification.status))) == {"sent"}


def test_a_bounce_of_our_notification_lands_on_its_ticket_and_is_never_answered(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    number = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0).entity["number"]
    send_pending(store, config)
    ours = smtp.inbox.received[0].message["Message-ID"]
    # The returned headers are all that tie it to the ticket: no number anywhere in the subjects.
    bounce = (fixture_bytes("bounce_dsn.eml").replace(b"<other@msp.example>", ours.encode())
              .replace(b"[Ticket#T20261123.0001] ", b""))

    result = processor.ingest("support", bounce, received_at=T0 + timedelta(minutes=1))

    assert (result.outcome, result.entity["number"]) == ("note_added", number)
    assert send_pending(store, config).sent == []
    assert smtp.inbox.count() == 1


def test_a_german_subject_keeps_its_tag_readable_and_a_line_break_cannot_add_a_header(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    raw = make_mail(subject="Drucker druckt nicht – bitte prüfen", message_id="<umlaut-1@acme.example>")
    number = processor.ingest("support", raw, received_at=T0).entity["number"]
    with store.transaction() as s:  # as a careless template override might render it
        s.execute(update(Notification).values(subject=f"[Ticket#{number}] Größe\r\nBcc: attacker@evil.example"))

    send_pending(store, config)

    [got] = smtp.inbox.received
    assert got.rcpt_tos == ["jane@acme.example"]
    assert got.message["Bcc"] is None
    assert got.message["Subject"] == f"[Ticket#{number}] Größe Bcc: attacker@evil.example"
    # The tag is plain ASCII on the wire, where any helpdesk filter can see it.
    assert f"Subject: [Ticket#{number}] ".encode() in got.raw


def test_each_notification_is_recorded_as_sent_before_the_next_one_goes_out(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    # A sender killed mid-batch resends only what it had not recorded: at most the one in flight.
    for i in range(4):
        processor.ingest("support", make_mail(from_=f"user{i}@acme.example", subject=f"Issue {i}"), received_at=T0)
    seen: list[list[str]] = []

    def statuses_when_it_arrives(_got) -> None:
        with store.sessions() as s:
            seen.append(list(s.scalars(select(Notification.status).order_by(Notification.id))))

    smtp.inbox.on_mail = statuses_when_it_arrives
    assert len(send_pending(store, config).sent) == 4
    assert seen == [["sending"] * 4,
                    ["sent"] + ["sending"] * 3,
                    ["sent"] * 2 + ["sending"] * 2,
                    ["sent"] * 3 + ["sending"]]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_database_connection_lost_between_two_sends_neither_loses_nor_repeats_a_notification(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    from sqlalchemy import text

    for i in range(3):
        processor.ingest("support", make_mail(from_=f"user{i}@acme.example", subject=f"Issue {i}"), received_at=T0)
    arrived = []

    def drop_idle_connections(got) -> None:
        arrived.append(got)
        if len(arrived) == 2:  # an idle timeout, a restart or a failover while the SMTP server is slow
            with store.engine.connect() as c:
                c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                               " AND pid <> pg_backend_pid() AND state = 'idle'"))

    smtp.inbox.on_mail = drop_idle_connections
    assert len(send_pending(store, config).sent) == 3
    assert [r.rcpt_tos[0] for r in smtp.inbox.received] == [f"user{i}@acme.example" for i in range(3)]
    assert {row.status for row in outbox(store)} == {"sent"}
    assert send_pending(store, config).sent == [] and smtp.inbox.count() == 3


def test_a_notification_on_the_wire_has_short_headers_as_written_and_long_ones_folded(config) -> None:
    from email import message_from_bytes
    from email.generator import BytesGenerator
    from email.policy import compat32
    from io import BytesIO

    from pipeline.notify.send import build_message
    from pipeline.store.models import NotificationRecipient

    thread = " ".join(f"<20261123.{i}.{'x' * 30}@mail.acme.example>" for i in range(4))
    n = Notification(id=1, event="note_added", mailbox="support", from_address="support@msp.example",
                     subject="[Ticket#T20261123.0001] Printer  jams on floor 3", message_id="<n1@msp.example>",
                     body_text="We added your note.\n--\n=_ not a boundary\n", body_html="<p>We added your note.</p>",
                     in_reply_to="<20261123.0@mail.acme.example>", references=thread,
                     recipients=[NotificationRecipient(email="jane@acme.example", role="sender")])
    out = build_message(n, config, now=T0)

    def wire(policy) -> bytes:
        buf = BytesIO()
        BytesGenerator(buf, policy=policy).flatten(out.message, linesep="\r\n")
        return buf.getvalue()

    raw = wire(None)
    # Byte for byte what compat32 writes, boundary and all.
    assert raw == wire(compat32)
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert b"Message-ID: <n1@msp.example>" in head and b"Auto-Submitted: auto-replied" in head
    assert b"Subject: [Ticket#T20261123.0001] Printer  jams on floor 3" in head  # two spaces: left to Header
    assert max(len(line) for line in head) <= 78  # the long References is folded
    parsed = message_from_bytes(raw)
    assert " ".join(parsed["References"].split()) == thread
    boundary = parsed.get_boundary()
    assert boundary.startswith("=_")
    text, html = (p.get_payload(decode=True).decode().replace("\r\n", "\n") for p in parsed.get_payload())
    assert (text, html) == (n.body_text, n.body_html)
