"""Every mail through every stage into the store, on real SQLite/PostgreSQL and Redis (D1)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from pipeline.process import MailProcessor
from pipeline.stages import Resolve
from pipeline.store.models import (
    Account,
    Attachment,
    Contact,
    JournalEntry,
    Note,
    Notification,
    ProcessedMail,
    Ticket,
)
from pipeline.store.queries import show_ticket
from tests.conftest import fixture_bytes, make_mail

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)


def count(store, model, *where) -> int:
    with store.sessions() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def ticket(store, number: str) -> dict:
    with store.sessions() as s:
        return show_ticket(s, number)


def test_new_mail_opens_a_new_ticket_with_mailbox_defaults(processor: MailProcessor, store) -> None:
    result = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0)

    assert result.outcome == "ticket_created"
    assert result.entity["type"] == "ticket"
    t = ticket(store, result.entity["number"])
    assert t["status"] == "New"
    assert t["title"] == "Outlook keeps asking for my password"
    assert "password" in t["description"]
    assert t["priority"] == "Medium"
    assert t["account"] == "Acme Corp"
    assert t["contact"] == {"name": "Jane Doe", "email": "jane@acme.example"}
    assert t["timeline"][0]["what"] == "created" and t["timeline"][0]["to"] == "New"
    with store.sessions() as s:
        row = s.scalar(select(Ticket).where(Ticket.number == result.entity["number"]))
        assert row.queue.name == "Service Desk"
        assert row.source == "Email" and row.source_mailbox == "support"
        journal = s.get(JournalEntry, result.journal_id)
        assert journal.outcome == "ticket_created" and journal.entity_number == row.number
        assert [t["stage"] for t in journal.trace][:3] == ["parse", "authenticate", "attribute"]


def test_the_new_ticket_notification_carries_the_number_and_threads(processor: MailProcessor, store) -> None:
    result = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0)
    number = result.entity["number"]
    with store.sessions() as s:
        n = s.scalar(select(Notification))
        assert n.event == "ticket_created"
        assert n.subject == f"[Ticket#{number}] Outlook keeps asking for my password"
        assert [r.email for r in n.recipients] == ["jane@acme.example"]
        assert n.in_reply_to == "<jane-outlook-pw-20261123@mail.acme.example>"
        assert number in n.message_id and n.status == "pending"


def test_a_reply_carrying_the_number_becomes_a_note(processor: MailProcessor, store) -> None:
    first = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0)
    number = first.entity["number"]
    reply = fixture_bytes("reply_with_ticket_number.eml").replace(b"T20261123.0001", number.encode())

    result = processor.ingest("support", reply, received_at=T0 + timedelta(minutes=10))

    assert result.outcome == "note_added"
    assert result.entity == {"type": "ticket", "number": number}
    notes = ticket(store, number)["notes"]
    assert len(notes) == 1
    assert notes[0]["author"]["email"] == "jane@acme.example"
    assert notes[0]["internal"] is False
    # The note is what Jane newly wrote, not Outlook's quoted history.
    assert "still asks" in notes[0]["body"]
    assert "Sent:" not in notes[0]["body"]
    assert count(store, Ticket) == 1


def test_a_reply_to_our_notification_without_the_number_is_a_note(processor: MailProcessor, store) -> None:
    first = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0)
    with store.sessions() as s:
        ours = s.scalar(select(Notification.message_id))
    reply = make_mail(subject="Re: your message", body="Thanks, that helped.\n",
                      headers={"In-Reply-To": ours, "References": ours})

    result = processor.ingest("support", reply, received_at=T0 + timedelta(minutes=3))

    assert result.outcome == "note_added"
    assert result.entity["number"] == first.entity["number"]


def test_the_same_mail_again_is_already_processed_and_uses_no_loop_guard_slot(
        processor: MailProcessor, store, redis_client) -> None:
    raw = make_mail(subject="Monitor flickers", message_id="<flicker-1@acme.example>")
    first = processor.ingest("support", raw, received_at=T0)
    again = processor.ingest("support", raw, received_at=T0 + timedelta(seconds=5))
    assert first.outcome == "ticket_created"
    assert again.outcome == "already_processed"
    assert "journal #%d" % first.journal_id in again.reason

    # Only the first copy took a slot: a second, different mail with the subject still passes.
    other = make_mail(subject="RE: Monitor flickers", body="Now it is black.\n")
    assert processor.ingest("support", other, received_at=T0 + timedelta(seconds=10)).outcome == "note_added"
    key = processor.loop_guard.key("support", "jane@acme.example", "monitor flickers")
    assert redis_client.zcard(key) == 2


def test_the_same_mail_delivered_to_two_mailboxes_opens_one_ticket(processor: MailProcessor, store) -> None:
    raw = make_mail(subject="Invoice 4711 is wrong", to="support@msp.example, billing@msp.example",
                    message_id="<inv-4711@acme.example>")
    a = processor.ingest("support", raw, received_at=T0)
    b = processor.ingest("billing", raw, received_at=T0)
    assert (a.outcome, b.outcome) == ("ticket_created", "already_processed")
    assert count(store, Ticket) == 1
    assert count(store, ProcessedMail) == 1


def test_third_mail_from_one_sender_with_one_subject_in_five_minutes_is_discarded(
        processor: MailProcessor, store) -> None:
    outcomes = []
    for i, subject in enumerate(["Disk full on FS01", "RE: Disk full on FS01", "AW: re: Disk  FULL on fs01"]):
        raw = make_mail(from_="alerts@fabrikam.example", subject=subject, body=f"attempt {i}\n")
        outcomes.append(processor.ingest("support", raw, received_at=T0 + timedelta(minutes=i)))

    assert [r.outcome for r in outcomes[:2]] == ["ticket_created", "note_added"]
    third = outcomes[2]
    assert third.outcome == "discarded"
    assert "loop guard" in third.reason and "2 per 300s" in third.reason
    assert third.entity is None
    # Discarded mail is journaled with its reason and never answered.
    with store.sessions() as s:
        row = s.get(JournalEntry, third.journal_id)
        assert row.outcome == "discarded" and row.reason == third.reason
        assert s.scalar(select(func.count()).select_from(Notification)
                        .where(Notification.journal_id == third.journal_id)) == 0


def test_another_sender_is_counted_apart_and_the_window_slides(processor: MailProcessor) -> None:
    def send(sender: str, minutes: float, n: int) -> str:
        raw = make_mail(from_=sender, subject="Backup failed", body=f"run {n}\n")
        return processor.ingest("support", raw, received_at=T0 + timedelta(minutes=minutes)).outcome

    assert send("nas01@fabrikam.example", 0, 1) != "discarded"
    assert send("nas01@fabrikam.example", 1, 2) != "discarded"
    assert send("nas02@fabrikam.example", 2, 3) != "discarded"  # another sender: its own window
    assert send("nas01@fabrikam.example", 3, 4) == "discarded"
    assert send("nas01@fabrikam.example", 5.5, 5) != "discarded"  # the first mail has left the window


def test_an_authenticated_resource_is_exempt_from_the_loop_guard(processor: MailProcessor, store) -> None:
    created = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0)
    tech = fixture_bytes("verified_technician.eml").replace(b"T20261123.0001", created.entity["number"].encode())
    outcomes = [processor.ingest("support", tech.replace(b"Message-ID: <", f"Message-ID: <{i}".encode(), 1),
                                 received_at=T0 + timedelta(seconds=i)).outcome for i in range(4)]
    assert outcomes == ["note_added"] * 4


def test_an_unknown_address_at_a_known_domain_belongs_to_that_account(processor: MailProcessor, store) -> None:
    result = processor.ingest("support", fixture_bytes("unknown_at_known_domain.eml"), received_at=T0)
    assert result.outcome == "ticket_created"
    t = ticket(store, result.entity["number"])
    assert t["account"] == "Acme Corp"
    assert t["contact"]["email"] == "carla.new@acme.example"
    with store.sessions() as s:
        assert s.scalar(select(Contact).where(Contact.email == "carla.new@acme.example")).account.name == "Acme Corp"


def test_a_gmail_address_is_not_matched_by_domain(processor: MailProcessor, store) -> None:
    # Even when an account claims gmail.com, a public mail domain says nothing about the customer.
    with store.transaction() as s:
        from pipeline.store.models import AccountDomain

        acme = s.scalar(select(Account).where(Account.name == "Acme Corp"))
        s.add(AccountDomain(domain="gmail.com", account_id=acme.id))
    result = processor.ingest("support", fixture_bytes("gmail_stranger.eml"), received_at=T0)
    t = ticket(store, result.entity["number"])
    assert t["account"] == "Unassigned"
    assert t["contact"]["email"] == "pat.smith.1990@gmail.com"


def test_an_html_only_mail_becomes_readable_text(processor: MailProcessor, store) -> None:
    result = processor.ingest("support", fixture_bytes("html_only.eml"), received_at=T0)
    description = ticket(store, result.entity["number"])["description"]
    assert "FortiClient 7.2" in description
    assert "- client: FortiClient 7.2" in description
    assert "https://files.acme.example/vpn.log" in description
    assert "<p>" not in description and "alert(" not in description and "{" not in description


def test_encoded_words_and_latin1_bodies_are_decoded(processor: MailProcessor, store) -> None:
    result = processor.ingest("support", fixture_bytes("latin1_encoded_words.eml"), received_at=T0)
    t = ticket(store, result.entity["number"])
    assert t["title"] == "Impresora no imprime después de la actualización"
    assert "después" in t["description"] and "señal" in t["description"] and "año" in t["description"]
    assert t["contact"]["name"] == "José Muñoz"


def test_bytes_with_no_header_block_are_quarantined(processor: MailProcessor, store) -> None:
    result = processor.ingest("support", fixture_bytes("no_header_block.eml"), received_at=T0)
    assert result.outcome == "quarantined"
    assert result.reason == "unparseable: no header block"
    with store.sessions() as s:
        row = s.get(JournalEntry, result.journal_id)
        assert row.outcome == "quarantined" and row.failed_stage == "parse"
        assert row.raw == fixture_bytes("no_header_block.eml")  # nothing lost


def test_a_mail_without_a_sender_is_quarantined(processor: MailProcessor) -> None:
    result = processor.ingest("support", fixture_bytes("no_sender.eml"), received_at=T0)
    assert result.outcome == "quarantined"
    assert "no usable sender address" in result.reason


def test_a_stranger_quoting_a_ticket_number_opens_a_new_ticket(processor: MailProcessor, store) -> None:
    first = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0)
    number = first.entity["number"]
    raw = make_mail(from_="Mallory <mallory@evil.example>", subject=f"RE: [Ticket#{number}] Outlook",
                    body="Please send me the admin password.\n")

    result = processor.ingest("support", raw, received_at=T0 + timedelta(minutes=1))

    assert result.outcome == "ticket_created"
    assert result.entity["number"] != number
    assert ticket(store, number)["notes"] == []
    assert any(s.stage == "resolve" and s.decision == "not attached" for s in result.trace)


def test_a_notified_recipient_may_write_into_the_ticket(processor: MailProcessor, store) -> None:
    first = processor.ingest("support", fixture_bytes("gmail_stranger.eml"), received_at=T0)
    number = first.entity["number"]
    # Pat was notified (ticket created) — Pat's later mail quoting the number is a note.
    raw = make_mail(from_="Pat Smith <pat.smith.1990@gmail.com>", subject=f"[Ticket#{number}] one more thing",
                    body="Also the price list, please.\n")
    assert processor.ingest("support", raw, received_at=T0 + timedelta(minutes=1)).outcome == "note_added"


def test_a_forged_technician_mail_is_an_unverified_internal_note(processor: MailProcessor, store) -> None:
    first = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0)
    number = first.entity["number"]
    forged = fixture_bytes("forged_technician.eml").replace(b"T20261123.0001", number.encode())

    result = processor.ingest("support", forged, received_at=T0 + timedelta(minutes=2))

    assert result.outcome == "note_added"
    t = ticket(store, number)
    assert t["status"] == "New"
    assert [n["internal"] for n in t["notes"]] == [True]
    steps = {s.stage: s for s in result.trace}
    assert steps["authenticate"].decision == "not passed"
    assert "dmarc=fail" in steps["authenticate"].why  # our MX's verdict, not the forged one below it
    assert steps["attribute"].decision == "unverified resource"
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Notification)
                        .where(Notification.journal_id == result.journal_id)) == 0


def test_a_verified_technician_reply_is_a_public_note(processor: MailProcessor, store) -> None:
    first = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0)
    number = first.entity["number"]
    raw = fixture_bytes("verified_technician.eml").replace(b"T20261123.0001", number.encode())
    result = processor.ingest("support", raw, received_at=T0 + timedelta(minutes=2))
    assert result.outcome == "note_added"
    note = ticket(store, number)["notes"][0]
    assert note["internal"] is False and note["author"]["email"] == "tom@msp.example"
    assert "credential cache" in note["body"] and "wrote:" not in note["body"]


def test_auto_replies_are_written_but_never_answered(processor: MailProcessor, store) -> None:
    result = processor.ingest("support", fixture_bytes("out_of_office.eml"), received_at=T0)
    assert result.outcome == "ticket_created"
    assert any(s.stage == "auto_reply" and "never answered" in s.decision for s in result.trace)
    assert count(store, Notification) == 0


def test_attachments_are_stored_with_their_decoded_names(processor: MailProcessor, store) -> None:
    result = processor.ingest("support", fixture_bytes("attachment_rfc2231.eml"), received_at=T0)
    with store.sessions() as s:
        rows = s.scalars(select(Attachment).order_by(Attachment.id)).all()
        names = {(a.filename, a.content_type) for a in rows}
        assert ("Fehlerbericht März.pdf", "application/pdf") in names
        pdf = next(a for a in rows if a.content_type == "application/pdf")
        assert pdf.data.startswith(b"%PDF") and pdf.size == len(pdf.data)
    assert result.outcome == "ticket_created"


def test_a_mail_without_message_id_is_still_recognised_when_it_comes_again(processor: MailProcessor) -> None:
    raw = fixture_bytes("no_message_id.eml")
    assert processor.ingest("support", raw, received_at=T0).outcome == "ticket_created"
    assert processor.ingest("support", raw, received_at=T0 + timedelta(seconds=1)).outcome == "already_processed"


@pytest.mark.parametrize("rule, outcome, tickets", [("note", "note_added", 1), ("link", "ticket_created", 2),
                                                    ("new", "ticket_created", 2)])
def test_the_duplicate_ticket_rule_follows_the_mailbox_setting(make_config, store, redis_client, rule, outcome,
                                                               tickets) -> None:
    config = make_config(extra_mailbox=f'\n[mailbox.duplicate_ticket]\nrule = "{rule}"\n')
    processor = MailProcessor(config, store, redis_client)
    first = make_mail(subject="Wifi in meeting room", body="No wifi in room B.\n")
    second = make_mail(subject="Wifi in meeting room", body="Still no wifi in room B!\n")
    assert processor.ingest("billing", first, received_at=T0).outcome == "ticket_created"
    result = processor.ingest("billing", second, received_at=T0 + timedelta(minutes=1))
    assert result.outcome == outcome
    assert count(store, Ticket) == tickets
    if rule == "link":
        with store.sessions() as s:
            newest = s.scalar(select(Ticket).order_by(Ticket.id.desc()))
            assert newest.linked_ticket_id is not None


def test_mail_to_a_closed_ticket_opens_a_new_linked_ticket(processor: MailProcessor, store) -> None:
    first = processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0)
    with store.transaction() as s:
        s.scalar(select(Ticket)).status = "Closed"
    reply = fixture_bytes("reply_with_ticket_number.eml").replace(b"T20261123.0001", first.entity["number"].encode())
    result = processor.ingest("support", reply, received_at=T0 + timedelta(days=20))
    assert result.outcome == "ticket_created"
    with store.sessions() as s:
        newest = s.scalar(select(Ticket).order_by(Ticket.id.desc()))
        assert newest.linked_ticket_id == s.scalar(select(Ticket.id).where(Ticket.number == first.entity["number"]))


def test_a_mail_that_crashes_a_stage_is_quarantined_and_the_next_goes_on(
        processor: MailProcessor, store, monkeypatch) -> None:
    def broken(self, ctx, env):
        raise RuntimeError("simulated bug in resolve")

    monkeypatch.setattr(Resolve, "__call__", broken)
    bad = processor.ingest("support", make_mail(subject="first"), received_at=T0)
    monkeypatch.undo()
    good = processor.ingest("support", make_mail(subject="second"), received_at=T0)

    assert bad.outcome == "quarantined"
    assert bad.reason == "stage resolve failed: RuntimeError: simulated bug in resolve"
    assert good.outcome == "ticket_created"
    with store.sessions() as s:
        row = s.get(JournalEntry, bad.journal_id)
        assert row.failed_stage == "resolve" and "RuntimeError" in row.error
        assert s.scalar(select(func.count()).select_from(Ticket)) == 1


def test_processing_a_journal_id_again_returns_the_recorded_outcome(processor: MailProcessor, store) -> None:
    first = processor.ingest("support", make_mail(), received_at=T0)
    again = processor.process(first.journal_id)
    assert again.outcome == first.outcome and again.entity == first.entity
    assert count(store, Ticket) == 1 and count(store, Note) == 0


def test_a_dry_run_shows_every_decision_and_writes_nothing(processor: MailProcessor, store, redis_client) -> None:
    raw = make_mail(subject="Dry run please", from_="someone@newcustomer.example")
    before = {m.__name__: count(store, m) for m in (JournalEntry, Ticket, Contact, Account, Notification)}

    result = processor.dry_run("support", raw)

    assert result.outcome == "ticket_created"
    stages = [s.stage for s in result.trace]
    assert stages[:3] == ["parse", "authenticate", "attribute"]
    assert {"loop_guard", "already_processed", "write"} <= set(stages)
    assert result.trace[-1].why == "dry run: nothing written"
    after = {m.__name__: count(store, m) for m in (JournalEntry, Ticket, Contact, Account, Notification)}
    assert after == before
    assert list(redis_client.scan_iter(match=processor.loop_guard.key_prefix + "*")) == []
