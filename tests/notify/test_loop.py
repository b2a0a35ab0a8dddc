"""Loops: a simulated customer auto-responder answers every mail mailloop sends it, back into mailloop.

The responder is an SMTP peer (aiosmtpd on loopback): each notification it receives, it
answers at once, as the kind of system named by the test would. The test runs the
exchange to its end and counts the mails each side sent: bounded, and then quiet.
"""

from __future__ import annotations

import itertools
from email.message import EmailMessage
from typing import Callable

import pytest
from sqlalchemy import func, select

from pipeline.process import MailProcessor
from pipeline.store.models import Notification, NotificationRecipient, Ticket
from tests.conftest import make_mail
from tests.notify.helpers import send_pending, without_number
from tests.notify.smtp import SmtpServer

Responder = Callable[[EmailMessage], bytes]


def rfc3834_auto_reply(msg: EmailMessage) -> bytes:
    """A well-behaved out-of-office: marks itself, keeps subject and threading."""
    return make_mail(subject="Automatic reply: " + msg["Subject"], body="I am out of the office until Monday.\n",
                     headers={"Auto-Submitted": "auto-replied", "In-Reply-To": msg["Message-ID"]})


def naive_auto_reply(msg: EmailMessage) -> bytes:
    """An unmarked responder: looks like a person answering."""
    return make_mail(subject="Re: " + msg["Subject"], body="Thank you, we will get back to you.\n",
                     headers={"In-Reply-To": msg["Message-ID"], "References": msg["Message-ID"]})


def mangling_auto_reply(msg: EmailMessage) -> bytes:
    """Drops our tag and every threading header; keeps the rest of the subject."""
    return make_mail(subject="Re: " + without_number(msg["Subject"]), body="Received.\n")


_case = itertools.count(1001)


def other_helpdesk(msg: EmailMessage) -> bytes:
    """Another ticketing system: a new case, a new subject and no threading for every mail it gets."""
    return make_mail(from_="Othercorp Helpdesk <helpdesk@othercorp.example>",
                     subject=f"Case {next(_case)}: we have received your request", body="A case was opened.\n")


def run_exchange(processor: MailProcessor, store, config, smtp: SmtpServer, first: bytes,
                 respond: Responder, max_rounds: int = 50) -> tuple[int, int]:
    """Deliver, let the responder answer into mailloop, repeat until nobody sends; (ours, theirs)."""
    answers: list[bytes] = []
    smtp.inbox.on_mail = lambda got: answers.append(respond(got.message))
    processor.ingest("support", first)
    ours = theirs = 0
    for _ in range(max_rounds):
        ours += len(send_pending(store, config).sent)
        batch, answers[:] = list(answers), []
        theirs += len(batch)
        for raw in batch:
            processor.ingest("support", raw)
        if not batch:
            return ours, theirs
    raise AssertionError(f"still exchanging mail after {max_rounds} rounds: {ours} sent, {theirs} answers")


@pytest.mark.parametrize("respond, first_from, expected", [
    (rfc3834_auto_reply, "Jane Doe <jane@acme.example>", (1, 1)),
    (naive_auto_reply, "Jane Doe <jane@acme.example>", (1, 1)),
    (mangling_auto_reply, "Jane Doe <jane@acme.example>", (1, 1)),
    # New subjects every time beat the loop guard; the answer limit (5 per hour) ends it.
    (other_helpdesk, "Othercorp Helpdesk <helpdesk@othercorp.example>", (5, 5)),
], ids=["rfc3834", "naive", "mangling", "other_helpdesk"])
def test_an_auto_responder_and_mailloop_exchange_a_bounded_number_of_mails_then_stop(
        processor: MailProcessor, store, config, smtp: SmtpServer, respond: Responder, first_from: str,
        expected: tuple[int, int]) -> None:
    first = make_mail(from_=first_from, subject="Printer jams", body="Page 2 jams.\n")

    assert run_exchange(processor, store, config, smtp, first, respond) == expected

    # Quiet afterwards: nothing left in the outbox, nothing more arrives.
    assert send_pending(store, config).sent == []
    assert smtp.inbox.count() == expected[0]
    with store.sessions() as s:
        tickets = s.scalar(select(func.count()).select_from(Ticket))
    assert tickets == (expected[1] + 1 if respond is other_helpdesk else 1)


def test_the_loop_guard_discards_a_flood_with_one_subject_and_answers_none_of_it(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    outcomes = [processor.ingest("support", make_mail(subject="Backup failed", body=f"run {i}\n")).outcome
                for i in range(6)]
    send_pending(store, config)
    assert outcomes == ["ticket_created", "note_added"] + ["discarded"] * 4
    assert smtp.inbox.count() == 1


def _recipients_by_journal(store) -> list[tuple[int, int]]:
    """(journal id, recipients) of each outbox row, by the mail that caused it."""
    with store.sessions() as s:
        return s.execute(select(Notification.journal_id, func.count(NotificationRecipient.email))
                         .join(NotificationRecipient).group_by(Notification.journal_id)
                         .order_by(Notification.journal_id)).all()


def test_the_sixth_automatic_answer_in_an_hour_is_held_back_and_nothing_of_it_is_written(
        processor: MailProcessor, store, config) -> None:
    # Every mail a new subject, so the loop guard lets each through; the answer limit (5) holds the 6th.
    results = [processor.ingest("support", make_mail(from_="Othercorp Helpdesk <helpdesk@othercorp.example>",
                                                     subject=f"Case {i} received", body=f"case {i}\n"))
               for i in range(6)]

    assert [r.outcome for r in results] == ["ticket_created"] * 6
    held = [s for s in results[5].trace if s.stage == "notify"]
    assert [(s.decision, s.why) for s in held] == [(
        "no ticket_created to helpdesk@othercorp.example",
        "loop breaker: 5 automatic answers to helpdesk@othercorp.example in the last 3600s (limit 5)")]
    rows = _recipients_by_journal(store)
    with store.sessions() as s:
        orphans = s.scalar(select(func.count()).select_from(Notification)
                           .where(~Notification.recipients.any()))
    # One outbox row with its one recipient for each of the first five mails; none for the sixth.
    assert rows == [(r.journal_id, 1) for r in results[:5]]
    assert orphans == 0


def test_an_outbox_row_and_its_recipient_are_one_statement_on_postgresql(
        processor: MailProcessor, store, config) -> None:
    from sqlalchemy import event

    inserts: list[str] = []

    def seen(_conn, _cursor, statement: str, *_args) -> None:
        if "INSERT INTO notification" in statement:
            inserts.append(statement)

    event.listen(store.engine, "before_cursor_execute", seen)
    try:
        result = processor.ingest("support", make_mail(subject="Scanner offline"))
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)

    assert result.outcome == "ticket_created"
    with store.sessions() as s:
        recipients = s.execute(select(NotificationRecipient.email, NotificationRecipient.role)).all()
        status, attempts, created = s.execute(select(Notification.status, Notification.attempts,
                                                     Notification.created_at)).one()
    assert recipients == [("jane@acme.example", "sender")]
    assert (status, attempts) == ("pending", 0) and created is not None
    assert len(inserts) == (1 if store.engine.dialect.name == "postgresql" else 2)


def test_in_one_batch_the_sixth_automatic_answer_in_an_hour_is_held_back_as_it_is_alone(
        processor: MailProcessor, store, config) -> None:
    from sqlalchemy import event

    def case(i: int) -> bytes:
        return make_mail(from_="Othercorp Helpdesk <helpdesk@othercorp.example>", subject=f"Case {i} received",
                         body=f"case {i}\n")

    earlier = [processor.ingest("support", case(i)) for i in range(3)]  # three answers sent already
    ids = [processor.journal("support", case(i)) for i in range(3, 6)]
    sent: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda _c, _cur, statement, *_a: sent.append(statement))
    results = processor.process_many(ids)

    assert [r.outcome for r in results] == ["ticket_created"] * 3
    assert [(s.decision, s.why) for s in results[2].trace if s.stage == "notify"] == [(
        "no ticket_created to helpdesk@othercorp.example",
        "loop breaker: 5 automatic answers to helpdesk@othercorp.example in the last 3600s (limit 5)")]
    rows = _recipients_by_journal(store)
    assert rows == [(r.journal_id, 1) for r in earlier + results[:2]]
    # The batch asked the store for its senders' answers once, and wrote its outbox rows and their
    # recipients in one statement each (on PostgreSQL, a mail alone counts in its insert).
    counts = [q for q in sent if "count(*)" in q and "JOIN notification_recipients" in q]
    assert len(counts) == 1 and "GROUP BY" in counts[0]
    assert len([q for q in sent if q.startswith("INSERT INTO notification_recipients")]) == 1
    assert len([q for q in sent if q.startswith(("INSERT INTO notifications", "WITH"))]) == 1
