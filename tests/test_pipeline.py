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


def test_an_address_at_a_subdomain_belongs_to_the_account_of_the_nearest_parent_domain(
        processor: MailProcessor, store) -> None:
    from pipeline.store.models import AccountDomain

    with store.transaction() as s:
        s.add(Account(name="Acme Europe", domains=[AccountDomain(domain="eu.acme.example")]))
    senders = {"ana@mail.eu.acme.example": "Acme Europe",  # eu.acme.example is nearer than acme.example
               "bo@mail.us.acme.example": "Acme Corp",
               "cy@a.b.c.d.eu.acme.example": "Acme Europe"}  # more parents than the person query looks at
    ids = [processor.journal("support", make_mail(from_=address, subject=f"VPN for {address}"), received_at=T0)
           for address in senders]
    results = processor.process_many(ids)  # one transaction: each domain's answer is remembered apart
    assert [ticket(store, r.entity["number"])["account"] for r in results] == list(senders.values())


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


# -- commands by mail (D4) and the trust they need (D8) ----------------------------------------------

def open_ticket(processor: MailProcessor) -> str:
    return processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0).entity["number"]


def command_mail(name: str, number: str) -> bytes:
    return fixture_bytes(f"commands/{name}").replace(b"T20261123.0001", number.encode())


def tom(body: str, subject: str, *, authenticated: bool = True) -> bytes:
    top = [TRUSTED_PASS] if authenticated else []
    return make_mail(from_="Tom Tech <tom@msp.example>", subject=subject, body=body, top_headers=top)


TRUSTED_PASS = ("Authentication-Results: mx.msp.example; dkim=pass header.d=msp.example header.s=sel1; "
                "spf=pass smtp.mailfrom=msp.example; dmarc=pass header.from=msp.example")


def time_entries(store, number: str) -> list[dict]:
    return ticket(store, number)["time_entries"]


def failed_notices(store, journal_id: int) -> list[Notification]:
    with store.sessions() as s:
        rows = s.scalars(select(Notification).where(Notification.event == "command_failed",
                                                    Notification.journal_id == journal_id)).all()
        for n in rows:
            n.recipients  # load before the session ends
        return rows


def test_authenticated_time_and_status_commands_apply(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)

    result = processor.ingest("support", command_mail("tech_phone_time_status.eml", number),
                              received_at=T0 + timedelta(hours=4))

    assert result.outcome == "note_added"
    t = ticket(store, number)
    assert t["status"] == "Waiting Customer"
    assert t["assigned_resource"] == {"name": "Tom Tech", "email": "tom@msp.example"}
    note = t["notes"][-1]
    assert note["internal"] is False
    # The command lines are gone from the note; iPhone's signature and the quote too.
    assert note["body"].startswith("Cleared the cached credentials")
    assert "#time" not in note["body"] and "#status" not in note["body"] and "Sent from" not in note["body"]
    assert t["time_entries"] == [{"resource": "tom@msp.example", "hours": 1.5, "role": "Engineer",
                                  "billable": True, "summary": note["body"]}]
    # The first update moves New → In Progress before the commands; #status has the last word.
    assert [(e["what"], e["from"], e["to"]) for e in t["timeline"][1:]] == [
        ("note added", None, None),
        ("assigned", None, "tom@msp.example"),
        ("first update by a resource", "New", "In Progress"),
        ("time entry", None, "1.5 h Engineer"),
        ("status changed", "In Progress", "Waiting Customer"),
    ]
    assert all(e["who"] == "tom@msp.example" for e in t["timeline"][1:])
    assert failed_notices(store, result.journal_id) == []
    steps = {s.stage: s for s in result.trace}
    assert steps["commands"].decision == "apply"


def test_the_same_mail_without_authentication_results_changes_nothing(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    raw = command_mail("tech_phone_time_status.eml", number)
    unauthenticated = raw.split(b"\n", 1)[1]  # the receiving MX's Authentication-Results line removed
    assert b"Authentication-Results" not in unauthenticated

    result = processor.ingest("support", unauthenticated, received_at=T0 + timedelta(hours=4))

    assert result.outcome == "note_added"
    t = ticket(store, number)
    assert (t["status"], t["assigned_resource"], t["time_entries"]) == ("New", None, [])
    note = t["notes"][-1]
    assert note["internal"] is True
    assert ("[Commands not applied: the mail did not pass the trust policy: no Authentication-Results from a "
            "trusted host (mx.msp.example)]\n#time 1h30m\n#status Waiting Customer") in note["body"]
    assert [e["what"] for e in t["timeline"]] == ["created", "note added"]
    with store.sessions() as s:  # an unverified sender is never answered
        assert s.scalar(select(func.count()).select_from(Notification)
                        .where(Notification.journal_id == result.journal_id)) == 0


def test_forged_authentication_results_change_nothing(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    result = processor.ingest("support", command_mail("tech_forged_time_status.eml", number),
                              received_at=T0 + timedelta(hours=4))
    t = ticket(store, number)
    assert (t["status"], t["time_entries"]) == ("New", [])
    assert t["notes"][-1]["internal"] is True and "Commands not applied" in t["notes"][-1]["body"]
    steps = {s.stage: s for s in result.trace}
    assert "dmarc=fail" in steps["authenticate"].why
    assert steps["commands"].decision == "not applied"


def test_contacts_time_command_adds_nothing(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    result = processor.ingest("support", command_mail("contact_time_command.eml", number),
                              received_at=T0 + timedelta(hours=5))
    assert result.outcome == "note_added"
    t = ticket(store, number)
    assert (t["status"], t["time_entries"]) == ("New", [])
    note = t["notes"][-1]
    assert note["internal"] is False and note["author"]["email"] == "jane@acme.example"
    assert note["body"].startswith("I saw how you write these")
    assert note["body"].endswith("[Commands not applied: only a resource may give commands; the sender is a "
                                 "contact]\n#time 5h\n#status Resolved")
    assert failed_notices(store, result.journal_id) == []


def test_autotask_indicators_give_entry_role_and_status(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    processor.ingest("support", command_mail("tech_autotask_indicators.eml", number),
                     received_at=T0 + timedelta(hours=6))
    t = ticket(store, number)
    assert t["status"] == "Waiting Customer"
    assert t["time_entries"] == [{"resource": "tom@msp.example", "hours": 0.25, "role": "Senior Engineer",
                                  "billable": True, "summary": t["notes"][-1]["body"]}]
    assert t["notes"][-1]["body"].startswith("Called Jane, walked her through")


def test_a_bad_command_changes_nothing_and_the_sender_is_told_which_line(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    result = processor.ingest("support", command_mail("tech_bad_commands.eml", number),
                              received_at=T0 + timedelta(hours=7))

    assert result.outcome == "note_added"
    t = ticket(store, number)
    assert t["time_entries"] == []
    assert t["status"] == "In Progress"  # the first update only; the bad #status changed nothing
    assert t["priority"] == "High"  # the good line still applies
    assert t["notes"][-1]["body"] == "Remote session booked for tomorrow morning."
    [notice] = failed_notices(store, result.journal_id)
    assert [r.email for r in notice.recipients] == ["tom@msp.example"]
    assert notice.subject == f"[Ticket#{number}] Command failed: Outlook keeps asking for my password"
    assert notice.in_reply_to == "<6B1E0F3A-2D4C-4E5F-9A8B-7C6D5E4F3A2B@msp.example>"
    body = notice.body_text
    assert "line 1: #time 1h3Om" in body and "'1h3Om' is not a duration" in body
    assert "line 2: #status Waiting for Godot" in body and "unknown status 'Waiting for Godot'" in body
    assert "These were applied: #priority High." in body
    assert [s.decision for s in result.trace if s.stage == "apply" and s.decision.startswith("failed")] == [
        "failed: line 1", "failed: line 2"]


@pytest.mark.parametrize("body, why", [
    ("#time 1h role=Wizard\nDone.\n", "no role 'Wizard' for tom@msp.example (roles: Engineer, Senior Engineer)"),
    ("#role Wizard\n#time 1h\nDone.\n", "no role 'Wizard' for tom@msp.example"),
    ("#role Senior Engineer\nDone.\n", "logs no time"),
])
def test_an_unknown_role_is_not_guessed(processor: MailProcessor, store, body: str, why: str) -> None:
    number = open_ticket(processor)
    result = processor.ingest("support", tom(body, f"RE: [Ticket#{number}] Outlook"), received_at=T0)
    assert time_entries(store, number) == []
    [notice] = failed_notices(store, result.journal_id)
    assert why in notice.body_text


def test_time_command_role_and_billable_forms(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    body = "#role senior engineer\n#time 1:30\n#time 20m role=Engineer billable=no\n#T=2\nMigrated the profile.\n"
    processor.ingest("support", tom(body, f"RE: [Ticket#{number}] Outlook"), received_at=T0)
    entries = time_entries(store, number)
    # "#T=" is only read on the first line: it fails, the others apply.
    assert [(e["hours"], e["role"], e["billable"]) for e in entries] == [
        (1.5, "Senior Engineer", True), (0.3333, "Engineer", False)]
    assert all(e["summary"] == "Migrated the profile." for e in entries)


def test_a_resources_first_update_assigns_and_moves_to_in_progress(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    raw = fixture_bytes("verified_technician.eml").replace(b"T20261123.0001", number.encode())
    processor.ingest("support", raw, received_at=T0 + timedelta(minutes=2))
    t = ticket(store, number)
    assert (t["status"], t["assigned_resource"]["email"]) == ("In Progress", "tom@msp.example")
    # A second update changes nothing more.
    processor.ingest("support", tom("Still on it.\n", f"RE: [Ticket#{number}] Outlook"), received_at=T0)
    assert [e["what"] for e in ticket(store, number)["timeline"]].count("first update by a resource") == 1


def test_status_in_the_first_update_has_the_last_word(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    processor.ingest("support", tom("#status New\nLeaving it in the queue.\n", f"RE: [Ticket#{number}] Outlook"),
                     received_at=T0)
    t = ticket(store, number)
    assert t["status"] == "New"
    assert [(e["what"], e["from"], e["to"]) for e in t["timeline"][-2:]] == [
        ("first update by a resource", "New", "In Progress"), ("status changed", "In Progress", "New")]


def test_assign_unassign_and_priority_commands(processor: MailProcessor, store, config, tmp_path) -> None:
    from pipeline.store.directory import load_directory

    extra = tmp_path / "more.toml"
    extra.write_text('[[resource]]\nemail = "amy@msp.example"\nname = "Amy Admin"\nroles = ["Engineer"]\n')
    load_directory(store, extra, config.settings.numbering)
    number = open_ticket(processor)
    subject = f"RE: [Ticket#{number}] Outlook"

    processor.ingest("support", tom("#assign amy@msp.example\n#priority critical\nAmy knows Exchange.\n", subject),
                     received_at=T0)
    t = ticket(store, number)
    assert (t["assigned_resource"]["email"], t["priority"], t["status"]) == ("amy@msp.example", "Critical",
                                                                              "In Progress")
    result = processor.ingest("support", tom("#assign nobody@msp.example\n#unassign\nBack to the queue.\n", subject),
                              received_at=T0)
    t = ticket(store, number)
    assert (t["assigned_resource"], t["status"]) == (None, "New")
    [notice] = failed_notices(store, result.journal_id)
    assert "line 1: #assign nobody@msp.example" in notice.body_text
    assert "no resource has the address nobody@msp.example" in notice.body_text
    whats = [(e["what"], e["from"], e["to"]) for e in t["timeline"]]
    assert ("priority changed", "Medium", "Critical") in whats
    assert ("assigned", "tom@msp.example", "amy@msp.example") in whats  # after the first update
    assert ("unassigned", "amy@msp.example", None) in whats


def test_time_entries_and_notes_on_task_and_project_numbers(processor: MailProcessor, store, config,
                                                            tmp_path) -> None:
    from pipeline.store.directory import load_directory
    from pipeline.store.models import Project, Task, TimeEntry, TimelineEntry

    extra = tmp_path / "project.toml"
    extra.write_text('[[project]]\nname = "Acme office move"\naccount = "Acme Corp"\n'
                     'tasks = ["Move printers"]\n')
    load_directory(store, extra, config.settings.numbering)
    with store.sessions() as s:
        project = s.scalar(select(Project))
        task_number, project_number = project.tasks[0].number, project.number

    on_task = processor.ingest("support", tom("#time 2h\n#status Resolved\nPrinters moved and tested.\n",
                                              f"Move printers {task_number}"), received_at=T0)
    on_project = processor.ingest("support", tom("#T=0.5\nPlanning call with Acme.\n",
                                                 f"Office move {project_number}"), received_at=T0)

    assert on_task.entity == {"type": "task", "number": task_number}
    assert on_project.entity == {"type": "project", "number": project_number}
    with store.sessions() as s:
        task_id = s.scalar(select(Task.id).where(Task.number == task_number))
        entries = s.scalars(select(TimeEntry).order_by(TimeEntry.id)).all()
        assert [(e.entity_type, e.hours, e.role, e.summary) for e in entries] == [
            ("task", 2.0, "Engineer", "Printers moved and tested."),
            ("project", 0.5, "Engineer", "Planning call with Acme.")]
        assert entries[0].entity_id == task_id
        timeline = s.scalars(select(TimelineEntry).where(TimelineEntry.entity_type == "task")).all()
        assert [(e.what, e.to_value) for e in timeline] == [("note added", None), ("time entry", "2 h Engineer")]
        notes = s.scalars(select(Note).where(Note.entity_type.in_(["task", "project"])).order_by(Note.id)).all()
        assert [n.body for n in notes] == ["Printers moved and tested.", "Planning call with Acme."]
    [notice] = failed_notices(store, on_task.journal_id)
    assert f"[Task#{task_number}]" in notice.subject
    assert "#status applies to tickets; on a task only #time and #role apply" in notice.body_text


def test_a_resource_opening_a_ticket_by_mail_may_log_time_on_it(processor: MailProcessor, store) -> None:
    result = processor.ingest("support", tom("#time 15m\nJane called: the printer jams again.\n", "Printer jams"),
                              received_at=T0)
    assert result.outcome == "ticket_created"
    t = ticket(store, result.entity["number"])
    assert t["description"].startswith("Jane called")
    assert [(e["hours"], e["summary"]) for e in t["time_entries"]] == [(0.25, "Jane called: the printer jams again.")]


def test_mail_forwarded_by_microsoft_365_counts_when_the_mailbox_trusts_its_arc(
        make_config, store, redis_client) -> None:
    config = make_config(extra_mailbox='arc_authserv_ids = ["mx.microsoft.com"]\n')
    processor = MailProcessor(config, store, redis_client)
    number = open_ticket(processor)
    raw = command_mail("tech_forwarded_m365_arc.eml", number)

    trusting = processor.ingest("billing", raw, received_at=T0 + timedelta(hours=8))
    assert {s.stage: s for s in trusting.trace}["authenticate"].decision == "passed"
    assert [e["hours"] for e in time_entries(store, number)] == [0.75]

    # The support mailbox does not trust Microsoft's ARC: the same mail is an unverified note.
    other = processor.ingest("support", raw.replace(b"Message-ID: <AM0", b"Message-ID: <X-AM0"),
                             received_at=T0 + timedelta(hours=8))
    steps = {s.stage: s for s in other.trace}
    assert steps["authenticate"].decision == "not passed"
    assert [e["hours"] for e in time_entries(store, number)] == [0.75]


def test_tickets_show_json_has_time_entries_and_timeline_in_d6_shape(processor: MailProcessor, store,
                                                                     config) -> None:
    import json

    from tests.conftest import run_cli

    number = open_ticket(processor)
    processor.ingest("support", command_mail("tech_phone_time_status.eml", number),
                     received_at=T0 + timedelta(hours=4))
    proc = run_cli("--config", str(config.path), "tickets", "show", number, "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert set(data) >= {"number", "title", "description", "status", "priority", "account", "contact",
                         "assigned_resource", "notes", "time_entries", "timeline"}
    assert data["status"] == "Waiting Customer"
    assert data["time_entries"] == [{"resource": "tom@msp.example", "hours": 1.5, "role": "Engineer",
                                     "billable": True, "summary": data["notes"][-1]["body"]}]
    assert all(set(e) == {"at", "who", "what", "from", "to"} for e in data["timeline"])
    assert data["timeline"][-1] == {"at": data["timeline"][-1]["at"], "who": "tom@msp.example",
                                    "what": "status changed", "from": "In Progress", "to": "Waiting Customer"}
    assert datetime.fromisoformat(data["timeline"][-1]["at"]) == T0 + timedelta(hours=4)


def test_an_unknown_senders_commands_never_apply(processor: MailProcessor, store) -> None:
    raw = make_mail(from_="Carla New <carla.new@acme.example>", subject="Scanner offline",
                    body="#time 1h\n#priority Critical\nThe scanner on floor 2 is offline.\n",
                    top_headers=["Authentication-Results: mx.msp.example; dmarc=pass header.from=acme.example"])
    result = processor.ingest("support", raw, received_at=T0)
    t = ticket(store, result.entity["number"])
    assert (t["priority"], t["time_entries"]) == ("Medium", [])
    assert t["description"].startswith("The scanner on floor 2 is offline.")
    assert "[Commands not applied: only a resource may give commands; the sender is a new contact]" in t["description"]


@pytest.mark.parametrize("body, status, method", [
    ("#resolve rejected as spam\nNot ours.\n", "Resolved", "rejected as spam"),
    ("#status Resolved\nFixed remotely.\n", "Resolved", "responded to customer"),
    ("#S=Closed\nDuplicate of another ticket.\n", "Closed", None),
    ("#status in progress\nOn it.\n", "In Progress", None),
])
def test_status_and_resolve_commands_set_the_status_and_resolution(processor: MailProcessor, store, body: str,
                                                                    status: str, method: str | None) -> None:
    number = open_ticket(processor)
    result = processor.ingest("support", tom(body, f"RE: [Ticket#{number}] Outlook"), received_at=T0)
    with store.sessions() as s:
        row = s.scalar(select(Ticket).where(Ticket.number == number))
        assert (row.status, row.resolution_method) == (status, method)
    # "#status In Progress" right after the first update already holds: no mistake to report.
    assert failed_notices(store, result.journal_id) == []
