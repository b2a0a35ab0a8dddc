"""A customer's `accept` and `close` end a ticket for good, so they count only from a mail that passed
the trust policy or answers our notification on that very ticket (D2, D8); `reject` and a reply only
reopen, and need neither. Real mails through the real pipeline on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from pipeline.context import Result
from pipeline.process import MailProcessor
from pipeline.store.models import Notification, Ticket
from pipeline.store.queries import show_ticket
from tests.conftest import make_mail

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)
IN_THE_WINDOW = T0 + timedelta(days=1)
TECH_AR_PASS = "Authentication-Results: mx.msp.example; dmarc=pass header.from=msp.example"
# Our receiving server's verdict on a mail from Jane's domain.
JANE_AR_PASS = "Authentication-Results: mx.msp.example; dmarc=pass header.from=acme.example"
# A forger's relay: no verdict of ours on the mail at all.
FOREIGN_RELAY = ("Received: from relay.forger.example (relay.forger.example [203.0.113.7]) "
                 "by mx.msp.example with ESMTP id 4Xk2; Mon, 23 Nov 2026 10:00:00 +0000")
ENDING = pytest.mark.parametrize("word", ["accept", "close"])


def resolved_ticket(processor: MailProcessor, subject: str = "Outlook keeps asking for my password") -> str:
    """Jane's ticket, which Tom resolved: Jane was sent a `ticket_resolved` notification on it."""
    number = processor.ingest("support", make_mail(subject=subject), received_at=T0).entity["number"]
    fixed = make_mail(from_="Tom Tech <tom@msp.example>", subject=f"RE: [Ticket#{number}] {subject}",
                      body="#resolve\nReset the credential cache; fixed.\n", top_headers=[TECH_AR_PASS])
    processor.ingest("support", fixed, received_at=T0 + timedelta(hours=1))
    return number


def jane(number: str, body: str, *, subject: str | None = None, answering: str | None = None,
         top: list[str] = (FOREIGN_RELAY,)) -> bytes:
    """Jane's mail (or one that says it is hers) naming `number` in the subject, maybe in reply to `answering`."""
    threading = {"In-Reply-To": answering, "References": answering} if answering else None
    return make_mail(subject=subject or f"RE: [Ticket#{number}] Outlook", body=body, headers=threading,
                     top_headers=list(top))


def resolved_notice(store, number: str) -> str:
    """The Message-ID of the `ticket_resolved` notification we sent on ticket `number`."""
    with store.sessions() as s:
        ticket_id = s.scalar(select(Ticket.id).where(Ticket.number == number))
        return s.scalar(select(Notification.message_id).where(Notification.event == "ticket_resolved",
                                                              Notification.entity_id == ticket_id))


def ticket(store, number: str) -> dict:
    with store.sessions() as s:
        return show_ticket(s, number)


def trace(result: Result, stage: str) -> list[tuple[str, str]]:
    return [(t.decision, t.why) for t in result.trace if t.stage == stage]


@ENDING
def test_a_forged_word_is_only_a_note_and_leaves_the_ticket_resolved(processor: MailProcessor, store,
                                                                      word: str) -> None:
    number = resolved_ticket(processor)
    timeline_before = ticket(store, number)["timeline"]

    result = processor.ingest("support", jane(number, f"{word}\n\nThanks, all good.\n"), received_at=IN_THE_WINDOW)

    assert (result.outcome, result.entity) == ("note_added", {"type": "ticket", "number": number})
    t = ticket(store, number)
    assert t["status"] == "Resolved"  # not Closed, and not reopened as an ordinary reply would be
    assert "Thanks, all good." in t["notes"][-1]["body"]
    assert t["timeline"] == timeline_before + [t["timeline"][-1]] and t["timeline"][-1]["what"] == "note added"
    assert (f"`{word}` not vouched for", "did not pass the trust policy and answers no notification of ours "
            f"on {number}") in trace(result, "resolve")
    assert ("no status change", f"`{word}` counts only from a mail that passed the trust policy or answers "
            "our notification on this ticket; recorded as a note, the ticket stays Resolved") in trace(result, "apply")


@ENDING
@pytest.mark.parametrize("tagged", [True, False], ids=["tagged subject", "subject without the tag"])
def test_the_word_in_an_answer_to_our_notification_on_the_ticket_closes_it(
        processor: MailProcessor, store, word: str, tagged: bool) -> None:
    number = resolved_ticket(processor)
    ours = resolved_notice(store, number)

    answer = jane(number, f"{word}\n", subject=None if tagged else "Re: Resolved", answering=ours)
    result = processor.ingest("support", answer, received_at=IN_THE_WINDOW)

    assert result.entity == {"type": "ticket", "number": number}
    assert ticket(store, number)["status"] == "Closed"
    assert (f"`{word}` vouched for", f"answers our notification on {number}") in trace(result, "resolve")
    [(to, why)] = trace(result, "apply")
    assert to == "Closed" and why.endswith(f"(the mail answers our notification on {number})")


@ENDING
def test_an_answer_to_our_notification_on_another_ticket_vouches_for_nothing(
        processor: MailProcessor, store, word: str) -> None:
    number = resolved_ticket(processor)
    other = resolved_ticket(processor, subject="The printer on floor 3 jams")

    # Names this ticket in the subject, but answers what we sent on the other one.
    forged = jane(number, f"{word}\n", answering=resolved_notice(store, other))
    result = processor.ingest("support", forged, received_at=IN_THE_WINDOW)

    assert result.entity == {"type": "ticket", "number": number}
    assert ticket(store, number)["status"] == "Resolved"
    assert ticket(store, other)["status"] == "Resolved"
    assert trace(result, "resolve")[-1] == (f"`{word}` not vouched for", "did not pass the trust policy and "
                                            f"answers no notification of ours on {number}")


@ENDING
def test_the_word_in_a_mail_that_passed_the_trust_policy_closes_the_ticket(
        processor: MailProcessor, store, word: str) -> None:
    number = resolved_ticket(processor)

    result = processor.ingest("support", jane(number, f"{word}\n", top=[JANE_AR_PASS]), received_at=IN_THE_WINDOW)

    assert ticket(store, number)["status"] == "Closed"
    # Trust settles it: the resolve stage does not ask the store whether it answers us.
    assert not any("vouched for" in decision for decision, _ in trace(result, "resolve"))
    [(to, why)] = trace(result, "apply")
    assert to == "Closed" and why.endswith("(the mail passed the trust policy)")


def test_close_from_a_trusted_mail_closes_an_open_ticket(processor: MailProcessor, store) -> None:
    number = processor.ingest("support", make_mail(subject="Outlook"), received_at=T0).entity["number"]
    processor.ingest("support", jane(number, "close\n\nFound it myself.\n", top=[JANE_AR_PASS]),
                     received_at=T0 + timedelta(hours=1))
    assert ticket(store, number)["status"] == "Closed"


def test_a_forged_close_leaves_an_open_ticket_open(processor: MailProcessor, store) -> None:
    number = processor.ingest("support", make_mail(subject="Outlook"), received_at=T0).entity["number"]
    result = processor.ingest("support", jane(number, "close\n"), received_at=T0 + timedelta(hours=1))
    assert ticket(store, number)["status"] == "New"
    assert trace(result, "apply")[-1][1].endswith("recorded as a note, the ticket stays New")


def test_reject_reopens_without_trust_or_an_answer_to_us(processor: MailProcessor, store) -> None:
    number = resolved_ticket(processor)

    processor.ingest("support", jane(number, "reject: it asks again since lunch\n"), received_at=IN_THE_WINDOW)

    t = ticket(store, number)
    assert t["status"] == "In Progress"
    assert t["timeline"][-1]["what"] == "resolution rejected: it asks again since lunch"


def test_a_batch_decides_as_one_mail_at_a_time_does(processor: MailProcessor, store) -> None:
    forged_on = resolved_ticket(processor)
    answered_on = resolved_ticket(processor, subject="The printer on floor 3 jams")

    results = processor.ingest_many("support", [
        (jane(forged_on, "close\n"), None, IN_THE_WINDOW),
        (jane(answered_on, "accept\n", answering=resolved_notice(store, answered_on)), None, IN_THE_WINDOW),
    ])

    assert [r.outcome for r in results] == ["note_added", "note_added"]
    assert ticket(store, forged_on)["status"] == "Resolved"
    assert ticket(store, answered_on)["status"] == "Closed"
