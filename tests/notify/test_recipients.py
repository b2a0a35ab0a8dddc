"""Who gets a notification (D1.7): roles, explicit addresses, and those who never do."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pipeline.process import MailProcessor
from pipeline.store.models import Notification
from tests.conftest import make_mail
from tests.notify.conftest import smtp_table
from tests.notify.helpers import outbox, send_pending
from tests.notify.smtp import SmtpServer

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)
TRUSTED_TOM = "Authentication-Results: mx.msp.example; dkim=pass header.d=msp.example; dmarc=pass header.from=msp.example"


def tom(body: str, subject: str) -> bytes:
    return make_mail(from_="Tom Tech <tom@msp.example>", subject=subject, body=body, top_headers=[TRUSTED_TOM])


def to(store, event: str) -> list[tuple[str, str]]:
    return [(r.email, r.role) for n in outbox(store, Notification.event == event) for r in n.recipients]


@pytest.fixture
def config(make_config, smtp: SmtpServer):
    roles = '{ ticket_created = ["sender", "queue_members", "account_manager", "Dispatch@MSP.example"] }'
    return make_config(smtp_table(smtp.port), notifications=f"{{ from_name = \"Desk\", recipients = {roles} }}")


def test_roles_resolve_to_addresses_once_each_and_each_gets_a_copy_of_its_own(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    processor.ingest("support", make_mail(subject="Printer jams"), received_at=T0)

    # Tom is both the queue's member and Acme's account manager: one copy.
    assert to(store, "ticket_created") == [("jane@acme.example", "sender"), ("tom@msp.example", "queue_members"),
                                           ("dispatch@msp.example", "explicit")]
    send_pending(store, config)
    assert sorted(r.rcpt_tos[0] for r in smtp.inbox.received) == [
        "dispatch@msp.example", "jane@acme.example", "tom@msp.example"]
    greetings = {r.rcpt_tos[0]: r.message.get_body(("plain",)).get_content().splitlines()[0]
                 for r in smtp.inbox.received}
    assert greetings["jane@acme.example"] == "Hello Jane Doe,"
    assert greetings["tom@msp.example"] == "Hello Tom Tech,"
    assert len({r.message["Message-ID"] for r in smtp.inbox.received}) == 3


def test_our_own_mailbox_addresses_and_machine_addresses_get_nothing(
        processor: MailProcessor, store, config) -> None:
    for sender in ("billing@msp.example", "MAILER-DAEMON@acme.example", "noreply@acme.example",
                   "list-bounces@acme.example"):
        result = processor.ingest("support", make_mail(from_=sender, subject=f"Hello from {sender}"), received_at=T0)
        assert result.outcome == "ticket_created"
        # Each is held back by name (MAILER-DAEMON's mail is a bounce already, so nobody is told).
        assert any(s.stage == "notify" and (sender.lower() in s.decision or "bounce" in s.why)
                   for s in result.trace)
    # Queue members and the explicit address still hear of the tickets; no sender does.
    assert {role for _, role in to(store, "ticket_created")} == {"queue_members", "explicit"}


def test_the_primary_resource_hears_of_a_customer_note_but_not_of_their_own(
        processor: MailProcessor, store, config) -> None:
    number = processor.ingest("support", make_mail(subject="Printer jams"), received_at=T0).entity["number"]
    processor.ingest("support", tom("Looking into it.\n", f"RE: [Ticket#{number}] Printer jams"),
                     received_at=T0 + timedelta(minutes=1))
    assert to(store, "note_added") == []  # Tom wrote it; he is now the primary resource

    processor.ingest("support", make_mail(subject=f"RE: [Ticket#{number}] Printer jams", body="Still jams.\n"),
                     received_at=T0 + timedelta(minutes=2))
    assert to(store, "note_added") == [("tom@msp.example", "primary_resource")]
    [n] = outbox(store, Notification.event == "note_added")
    assert n.subject == f"[Ticket#{number}] Printer jams" and "Still jams." in n.body_text


def test_a_technicians_status_command_tells_the_contact(processor: MailProcessor, store, config) -> None:
    number = processor.ingest("support", make_mail(subject="Printer jams"), received_at=T0).entity["number"]
    processor.ingest("support", tom("#status Waiting Customer\nWhich tray?\n", f"RE: [Ticket#{number}] Printer"),
                     received_at=T0 + timedelta(minutes=1))

    [n] = outbox(store, Notification.event == "status_changed")
    assert [r.email for r in n.recipients] == ["jane@acme.example"]
    assert n.subject == f"[Ticket#{number}] Waiting Customer: Printer jams"
    assert "is now Waiting Customer (was In Progress)" in n.body_text


def test_a_customers_own_change_and_a_first_update_tell_nobody_of_the_status(
        processor: MailProcessor, store, config) -> None:
    number = processor.ingest("support", make_mail(subject="Printer jams"), received_at=T0).entity["number"]
    processor.ingest("support", tom("On it.\n", f"RE: [Ticket#{number}] Printer"), received_at=T0 + timedelta(minutes=1))
    # Jane's `close`, which counts: her mail passed the trust policy (D2).
    trusted = "Authentication-Results: mx.msp.example; dmarc=pass header.from=acme.example"
    closed = processor.ingest("support", make_mail(subject=f"RE: [Ticket#{number}] Printer", body="close\n",
                                                   top_headers=[trusted]), received_at=T0 + timedelta(minutes=2))
    assert ("apply", "Closed") in [(step.stage, step.decision) for step in closed.trace]
    assert outbox(store, Notification.event == "status_changed") == []


def test_an_unverified_internal_note_never_reaches_the_customer(processor: MailProcessor, store, config) -> None:
    number = processor.ingest("support", make_mail(subject="Printer jams"), received_at=T0).entity["number"]
    forged = make_mail(from_="Tom Tech <tom@msp.example>", subject=f"RE: [Ticket#{number}] Printer",
                       body="#status Waiting Customer\nSend me your password.\n")
    result = processor.ingest("support", forged, received_at=T0 + timedelta(minutes=1))
    assert result.outcome == "note_added"
    assert [n.event for n in outbox(store)] == ["ticket_created"] * 3  # only those of the first mail


@pytest.mark.parametrize("authenticated, expected", [(True, 1), (False, 0)])
def test_a_rejection_notice_goes_only_to_a_sender_that_passed_authentication(
        make_config, smtp: SmtpServer, redis_client, tmp_path, authenticated: bool, expected: int) -> None:
    from pipeline.store.db import Store

    config = make_config(smtp_table(smtp.port), unknown_sender='{ otherwise = "reject" }')
    store = Store(config.database_url)
    processor = MailProcessor(config, store, redis_client)
    top = ["Authentication-Results: mx.msp.example; dmarc=pass header.from=stranger.example"] if authenticated else []
    result = processor.ingest("support", make_mail(from_="eve@stranger.example", subject="Buy now", top_headers=top),
                              received_at=T0)

    assert result.outcome == "rejected"
    send_pending(store, config)
    assert smtp.inbox.count() == expected
    if expected:
        msg = smtp.inbox.received[0].message
        assert msg["Subject"] == "Not accepted: Buy now" and msg["Auto-Submitted"] == "auto-replied"
    store.dispose()
