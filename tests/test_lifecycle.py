"""The ticket lifecycle (D2): the state machine as plain functions, then every transition by mail
and by the clock on real SQLite and PostgreSQL. Scheduled transitions are tested by moving `now`."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from pipeline.commands import CustomerAnswer
from pipeline.lifecycle import (
    TRANSITIONS,
    LifecycleSettings,
    TicketState,
    customer_move,
    due_move,
    first_update,
    refusal,
    resource_move,
    run_scheduled_transitions,
    unassign_move,
)
from pipeline.process import MailProcessor
from pipeline.store.models import Notification, Ticket
from pipeline.store.queries import show_ticket
from tests.conftest import fixture_bytes, make_mail

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)
AR_PASS = ("Authentication-Results: mx.msp.example; dkim=pass header.d=msp.example header.s=sel1; "
           "spf=pass smtp.mailfrom=msp.example; dmarc=pass header.from=msp.example")
# Our receiving server's verdict on a mail from Jane's domain: it passed the trust policy.
CUSTOMER_AR_PASS = "Authentication-Results: mx.msp.example; dmarc=pass header.from=acme.example"
SETTINGS = LifecycleSettings(feedback_window_days=3, auto_close_days=5)


# -- the state machine, without a database --------------------------------------------------------

def test_nobody_moves_a_closed_ticket() -> None:
    for actor in TRANSITIONS:
        assert "Closed" not in TRANSITIONS[actor]
    assert refusal("resource", "Closed", "New") == "the ticket is Closed"


def test_who_may_make_which_transition() -> None:
    assert refusal("resource", "New", "Resolved") is None
    assert refusal("resource", "Resolved", "In Progress") is None
    assert refusal("customer", "Waiting Customer", "New") is None
    assert refusal("customer", "Resolved", "Closed") is None
    assert refusal("customer", "In Progress", "Resolved") == "a customer may not move a ticket from In Progress to Resolved"
    assert refusal("customer", "New", "In Progress") is not None
    assert refusal("system", "Waiting Until", "New") is None
    assert refusal("system", "In Progress", "Closed") is not None


def test_first_update_moves_only_a_new_ticket() -> None:
    assert first_update(TicketState("New")).to == "In Progress"
    for status in ("In Progress", "Waiting Customer", "Waiting Until", "Resolved"):
        assert first_update(TicketState(status)) is None


def test_resource_moves() -> None:
    state = TicketState("In Progress")
    assert resource_move(state, "Waiting Customer").to == "Waiting Customer"
    resolved = resource_move(state, "Resolved")
    assert (resolved.to, resolved.resolution) == ("Resolved", "responded to customer")
    assert resource_move(state, "Resolved", resolution="rejected as spam").what == "resolved (rejected as spam)"
    assert resource_move(state, "In Progress") is None  # already so: nothing to do, no mistake
    later = T0 + timedelta(days=7)
    assert resource_move(state, "Waiting Until", until=later, now=T0).until == later
    assert "already passed" in resource_move(state, "Waiting Until", until=T0 - timedelta(hours=1), now=T0)
    assert resource_move(state, "Waiting Until", now=T0) == "Waiting Until needs a date"


def test_unassigning_returns_an_open_ticket_to_new() -> None:
    assert unassign_move(TicketState("In Progress")).to == "New"
    assert unassign_move(TicketState("Waiting Customer")).to == "New"
    assert unassign_move(TicketState("New")) is None
    assert unassign_move(TicketState("Resolved")) is None


def resolved(at: datetime = T0, assigned: bool = True) -> TicketState:
    return TicketState("Resolved", status_changed_at=at, resolved_at=at, assigned=assigned)


def test_customer_moves() -> None:
    in_window = T0 + timedelta(days=1)
    assert customer_move(TicketState("Waiting Customer"), None, SETTINGS, in_window, vouched=False)[0].to == "New"
    assert customer_move(resolved(), None, SETTINGS, in_window, vouched=False)[0].to == "In Progress"
    assert customer_move(resolved(assigned=False), None, SETTINGS, in_window, vouched=False)[0].to == "New"
    assert customer_move(resolved(), CustomerAnswer("accept"), SETTINGS, in_window, vouched=True)[0].to == "Closed"
    move = customer_move(resolved(), CustomerAnswer("reject", "still broken"), SETTINGS, in_window, vouched=False)[0]
    assert (move.to, move.what) == ("In Progress", "resolution rejected: still broken")
    for status in ("New", "In Progress", "Waiting Customer", "Waiting Until", "Resolved"):
        assert customer_move(TicketState(status, resolved_at=T0), CustomerAnswer("close"), SETTINGS,
                             in_window, vouched=True)[0].to == "Closed"


def test_accept_and_close_from_a_mail_nobody_vouches_for_change_nothing() -> None:
    in_window = T0 + timedelta(days=1)
    for status in ("New", "In Progress", "Waiting Customer", "Waiting Until", "Resolved"):
        move, why = customer_move(TicketState(status, resolved_at=T0), CustomerAnswer("close"), SETTINGS,
                                  in_window, vouched=False)
        assert move is None
        assert why == ("`close` counts only from a mail that passed the trust policy or answers our "
                       f"notification on this ticket; recorded as a note, the ticket stays {status}")
    # Not even the reopening an ordinary reply in the feedback window would make.
    move, why = customer_move(resolved(), CustomerAnswer("accept"), SETTINGS, in_window, vouched=False)
    assert move is None and why.startswith("`accept` counts only from a mail that passed the trust policy")
    assert customer_move(resolved(), None, SETTINGS, in_window, vouched=False)[0].to == "In Progress"


def test_reject_needs_nobody_to_vouch_for_it() -> None:
    move, _ = customer_move(resolved(), CustomerAnswer("reject", "no"), SETTINGS, T0 + timedelta(days=1),
                            vouched=False)
    assert move.to == "In Progress"


def test_a_customer_reply_leaves_other_states_alone() -> None:
    for status in ("New", "In Progress", "Waiting Until"):
        move, why = customer_move(TicketState(status), None, SETTINGS, T0, vouched=False)
        assert move is None and status in why
    for vouched in (True, False):
        move, why = customer_move(TicketState("In Progress"), CustomerAnswer("accept"), SETTINGS, T0, vouched=vouched)
        assert move is None and "only answers a Resolved ticket" in why


def test_due_moves_follow_the_clock() -> None:
    waiting = TicketState("Waiting Until", wait_until=T0 + timedelta(days=2))
    assert due_move(waiting, SETTINGS, T0 + timedelta(days=1)) is None
    assert due_move(waiting, SETTINGS, T0 + timedelta(days=2)).kind == "waiting_until_ended"
    assert due_move(resolved(), SETTINGS, T0 + timedelta(days=2, hours=23)) is None
    assert due_move(resolved(), SETTINGS, T0 + timedelta(days=3)).kind == "feedback_window_ended"
    stale = TicketState("Waiting Customer", status_changed_at=T0)
    assert due_move(stale, SETTINGS, T0 + timedelta(days=4)) is None
    closed = due_move(stale, SETTINGS, T0 + timedelta(days=5))
    assert (closed.kind, closed.to, closed.resolution) == ("auto_closed", "Closed", "no response from customer")
    assert due_move(stale, LifecycleSettings(auto_close_days=0), T0 + timedelta(days=500)) is None


# -- by mail and by the clock, on the real store ----------------------------------------------------

def open_ticket(processor: MailProcessor) -> str:
    return processor.ingest("support", fixture_bytes("new_ticket_plain.eml"), received_at=T0).entity["number"]


def tech(processor: MailProcessor, number: str, body: str, at: datetime, mailbox: str = "support"):
    raw = make_mail(from_="Tom Tech <tom@msp.example>", subject=f"RE: [Ticket#{number}] Outlook", body=body,
                    top_headers=[AR_PASS])
    return processor.ingest(mailbox, raw, received_at=at)


def customer(processor: MailProcessor, number: str, body: str, at: datetime, mailbox: str = "support",
             top_headers: list[str] | None = None):
    raw = make_mail(subject=f"RE: [Ticket#{number}] Outlook", body=body, top_headers=top_headers)
    return processor.ingest(mailbox, raw, received_at=at)


def ticket(store, number: str) -> dict:
    with store.sessions() as s:
        return show_ticket(s, number)


def row(store, number: str) -> Ticket:
    with store.sessions() as s:
        return s.scalar(select(Ticket).where(Ticket.number == number))


def scheduled(store, config, now: datetime) -> dict[str, int]:
    with store.transaction() as s:
        return run_scheduled_transitions(s, config, now)


def changes(store, number: str) -> list[tuple[str, str | None, str | None]]:
    return [(e["what"], e["from"], e["to"]) for e in ticket(store, number)["timeline"]]


def test_a_customer_reply_to_waiting_customer_returns_it_to_new(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    tech(processor, number, "#status Waiting Customer\nPlease restart and tell me.\n", T0 + timedelta(hours=1))
    assert ticket(store, number)["status"] == "Waiting Customer"

    result = customer(processor, number, "Restarted, still the same.\n", T0 + timedelta(hours=3))

    assert result.outcome == "note_added"
    assert ticket(store, number)["status"] == "New"
    assert changes(store, number)[-1] == ("the customer answered", "Waiting Customer", "New")
    assert ticket(store, number)["timeline"][-1]["who"] == "jane@acme.example"


def resolve(processor: MailProcessor, store, at: datetime = T0 + timedelta(hours=1)) -> str:
    number = open_ticket(processor)
    tech(processor, number, "#resolve\nReset the credential cache; fixed.\n", at)
    assert ticket(store, number)["status"] == "Resolved"
    return number


def test_a_customer_reply_in_the_feedback_window_reopens_and_the_first_resolution_is_kept(
        processor: MailProcessor, store) -> None:
    number = resolve(processor, store)
    first = row(store, number)
    assert first.first_resolved_by == "tom@msp.example" and first.resolution_method == "responded to customer"

    customer(processor, number, "It asks again since lunch.\n", T0 + timedelta(days=1))
    assert ticket(store, number)["status"] == "In Progress"  # Tom is assigned: back to him
    assert changes(store, number)[-1] == ("reopened by the customer's reply", "Resolved", "In Progress")

    tech(processor, number, "#resolve\nReplaced the profile.\n", T0 + timedelta(days=2))
    again = row(store, number)
    assert again.status == "Resolved"
    assert again.resolved_at.replace(tzinfo=timezone.utc) == T0 + timedelta(days=2)
    assert again.first_resolved_at.replace(tzinfo=timezone.utc) == T0 + timedelta(hours=1)
    assert again.first_resolved_by == "tom@msp.example"


def test_accept_closes_a_resolved_ticket(processor: MailProcessor, store) -> None:
    number = resolve(processor, store)
    result = customer(processor, number, "accept\n\nThank you!\n", T0 + timedelta(days=1),
                      top_headers=[CUSTOMER_AR_PASS])
    assert result.outcome == "note_added"
    assert ticket(store, number)["status"] == "Closed"
    assert changes(store, number)[-1] == ("resolution accepted", "Resolved", "Closed")


def test_reject_reopens_with_the_reason_noted(processor: MailProcessor, store) -> None:
    number = resolve(processor, store)
    customer(processor, number, "reject: the prompt came back after the reboot\n", T0 + timedelta(days=1))
    t = ticket(store, number)
    assert t["status"] == "In Progress"
    assert changes(store, number)[-1] == ("resolution rejected: the prompt came back after the reboot",
                                          "Resolved", "In Progress")
    assert "the prompt came back after the reboot" in t["notes"][-1]["body"]


def test_a_customer_may_close_their_own_open_ticket(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    customer(processor, number, "close\n\nFound it myself, sorry.\n", T0 + timedelta(hours=2),
             top_headers=[CUSTOMER_AR_PASS])
    assert ticket(store, number)["status"] == "Closed"
    assert changes(store, number)[-1] == ("closed by the customer", "New", "Closed")


def test_accept_on_an_open_ticket_changes_nothing(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    result = customer(processor, number, "accept\n", T0 + timedelta(hours=2))
    assert ticket(store, number)["status"] == "New"
    assert any(s.stage == "apply" and "only answers a Resolved ticket" in s.why for s in result.trace)


def test_the_end_of_the_feedback_window_closes_the_ticket(processor: MailProcessor, store, config) -> None:
    number = resolve(processor, store)
    assert scheduled(store, config, T0 + timedelta(days=3)) == {
        "waiting_until_ended": 0, "feedback_window_ended": 0, "auto_closed": 0}
    assert scheduled(store, config, T0 + timedelta(days=3, hours=2)) == {
        "waiting_until_ended": 0, "feedback_window_ended": 1, "auto_closed": 0}
    assert ticket(store, number)["status"] == "Closed"
    assert ticket(store, number)["timeline"][-1] == {
        "at": ticket(store, number)["timeline"][-1]["at"], "who": "system", "what": "feedback window ended",
        "from": "Resolved", "to": "Closed"}
    # Idempotent: the same clock again, or a later one, moves nothing more.
    assert sum(scheduled(store, config, T0 + timedelta(days=3, hours=2)).values()) == 0
    assert sum(scheduled(store, config, T0 + timedelta(days=30)).values()) == 0


def test_a_reply_after_the_window_opens_a_new_linked_ticket_even_before_the_scheduler_ran(
        processor: MailProcessor, store) -> None:
    number = resolve(processor, store)
    result = customer(processor, number, "Hello again, a new problem.\n", T0 + timedelta(days=4))
    assert result.outcome == "ticket_created" and result.entity["number"] != number
    assert ticket(store, number)["status"] == "Closed"
    assert changes(store, number)[-1] == ("feedback window ended", "Resolved", "Closed")
    assert row(store, result.entity["number"]).linked_ticket_id == row(store, number).id


def test_waiting_until_returns_to_new_at_that_date(processor: MailProcessor, store, config) -> None:
    number = open_ticket(processor)
    tech(processor, number, "#wait until 2026-12-01 09:00\nVendor ships the part on the 1st.\n",
         T0 + timedelta(hours=1))
    t = row(store, number)
    assert t.status == "Waiting Until"
    assert t.wait_until.replace(tzinfo=timezone.utc) == datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)
    assert changes(store, number)[-1] == ("waiting until 2026-12-01 09:00 UTC", "In Progress", "Waiting Until")

    assert scheduled(store, config, datetime(2026, 12, 1, 8, 59, tzinfo=timezone.utc))["waiting_until_ended"] == 0
    assert scheduled(store, config, datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc))["waiting_until_ended"] == 1
    t = row(store, number)
    assert (t.status, t.wait_until) == ("New", None)
    assert changes(store, number)[-1] == ("waiting period ended", "Waiting Until", "New")


def test_a_waiting_until_date_is_in_the_configured_time_zone(make_config, store, redis_client) -> None:
    # The text after the last mailbox ends the file, so a top-level table may be given there.
    config = make_config(extra_mailbox='\n[numbering]\ntimezone = "Europe/Berlin"\n')
    processor = MailProcessor(config, store, redis_client)
    number = open_ticket(processor)
    tech(processor, number, "#wait until 2026-12-01 09:00\nBack on the 1st.\n", T0 + timedelta(hours=1))
    t = row(store, number)
    assert t.wait_until.replace(tzinfo=timezone.utc) == datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)
    assert changes(store, number)[-1][0] == "waiting until 2026-12-01 09:00 CET"
    assert scheduled(store, config, datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc))["waiting_until_ended"] == 1


def test_a_waiting_until_date_that_passed_is_refused(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    tech(processor, number, "#wait until 2026-11-01 09:00\nLater.\n", T0 + timedelta(hours=1))
    assert ticket(store, number)["status"] == "In Progress"
    with store.sessions() as s:
        failed = s.scalar(select(Notification).where(Notification.event == "command_failed"))
        assert "line 1: #wait until 2026-11-01 09:00" in failed.body_text and "already passed" in failed.body_text


def test_auto_close_after_n_days_in_waiting_customer(make_config, store, redis_client) -> None:
    config = make_config(auto_close_days="5")
    processor = MailProcessor(config, store, redis_client)
    number = open_ticket(processor)
    tech(processor, number, "#status Waiting Customer\nPlease confirm.\n", T0 + timedelta(hours=1))

    assert scheduled(store, config, T0 + timedelta(days=5))["auto_closed"] == 0
    assert scheduled(store, config, T0 + timedelta(days=5, hours=1))["auto_closed"] == 1
    t = row(store, number)
    assert (t.status, t.resolution_method) == ("Closed", "no response from customer")
    assert changes(store, number)[-1] == ("auto-closed after 5 days without an answer", "Waiting Customer", "Closed")
    assert scheduled(store, config, T0 + timedelta(days=9))["auto_closed"] == 0


def test_no_auto_close_unless_the_mailbox_says_so(processor: MailProcessor, store, config) -> None:
    number = open_ticket(processor)
    tech(processor, number, "#status Waiting Customer\nPlease confirm.\n", T0 + timedelta(hours=1))
    assert sum(scheduled(store, config, T0 + timedelta(days=365)).values()) == 0
    assert ticket(store, number)["status"] == "Waiting Customer"


def test_the_sla_pause_is_recorded_when_the_mailbox_says_so(make_config, store, redis_client) -> None:
    config = make_config(sla_pause_in_waiting_customer="true")
    processor = MailProcessor(config, store, redis_client)
    number = open_ticket(processor)
    tech(processor, number, "#status Waiting Customer\nPlease confirm.\n", T0 + timedelta(hours=1))
    t = row(store, number)
    assert t.sla_paused_at.replace(tzinfo=timezone.utc) == T0 + timedelta(hours=1)

    customer(processor, number, "Confirmed, it still fails.\n", T0 + timedelta(hours=4))
    t = row(store, number)
    assert (t.status, t.sla_paused_at, t.sla_paused_seconds) == ("New", None, 3 * 3600)
    whats = [w for w, _, _ in changes(store, number)]
    assert whats.index("SLA clock paused") < whats.index("SLA clock resumed")


def test_no_sla_pause_by_default(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    tech(processor, number, "#status Waiting Customer\nPlease confirm.\n", T0 + timedelta(hours=1))
    t = row(store, number)
    assert (t.sla_paused_at, t.sla_paused_seconds) == (None, 0)


def test_unassigning_returns_the_ticket_to_new(processor: MailProcessor, store) -> None:
    number = open_ticket(processor)
    tech(processor, number, "Looking into it.\n", T0 + timedelta(hours=1))
    assert ticket(store, number)["assigned_resource"]["email"] == "tom@msp.example"
    tech(processor, number, "#unassign\nSomeone with Exchange rights should take this.\n", T0 + timedelta(hours=2))
    t = ticket(store, number)
    assert (t["status"], t["assigned_resource"]) == ("New", None)
    assert changes(store, number)[-2:] == [("unassigned", "tom@msp.example", None),
                                           ("returned to New (unassigned)", "In Progress", "New")]


def test_scheduled_transitions_count_each_kind_once_across_many_tickets(
        make_config, store, redis_client) -> None:
    config = make_config(auto_close_days="2")
    processor = MailProcessor(config, store, redis_client)
    numbers = []
    for i, body in enumerate(["#resolve\nDone.\n", "#status Waiting Customer\nWell?\n",
                              "#wait until 2026-11-24 12:00\nTomorrow.\n", "Working on it.\n"]):
        raw = make_mail(subject=f"Problem {i}", body="Help\n")
        numbers.append(processor.ingest("support", raw, received_at=T0).entity["number"])
        tech(processor, numbers[-1], body, T0 + timedelta(minutes=5))
    assert scheduled(store, config, T0 + timedelta(days=4)) == {
        "waiting_until_ended": 1, "feedback_window_ended": 1, "auto_closed": 1}
    assert [ticket(store, n)["status"] for n in numbers] == ["Closed", "Closed", "New", "In Progress"]
    assert sum(scheduled(store, config, T0 + timedelta(days=4)).values()) == 0
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 4


def test_the_contact_is_told_of_the_resolution_and_accepts_by_answering_it(processor: MailProcessor, store) -> None:
    number = resolve(processor, store)
    with store.sessions() as s:
        notice = s.scalar(select(Notification).where(Notification.event == "ticket_resolved"))
        assert [r.email for r in notice.recipients] == ["jane@acme.example"]
        assert notice.subject == f"[Ticket#{number}] Resolved: Outlook keeps asking for my password"
        assert "Reset the credential cache; fixed." in notice.body_text and '"accept"' in notice.body_text
        ours = notice.message_id
    # Jane's phone drops the tag from the subject; the answer still threads by In-Reply-To.
    answer = make_mail(subject="Re: Resolved", body="Accept\n\nSent from my phone\n",
                       headers={"In-Reply-To": ours, "References": ours})
    result = processor.ingest("support", answer, received_at=T0 + timedelta(hours=5))
    assert result.entity == {"type": "ticket", "number": number}
    assert ticket(store, number)["status"] == "Closed"


def test_only_the_customer_may_accept_someone_copied_only_replies(processor: MailProcessor, store) -> None:
    number = resolve(processor, store)
    # Kim (another account) was notified on this ticket, so may write into it — but not accept it.
    with store.transaction() as s:
        from pipeline.store.models import NotificationRecipient

        n = s.scalar(select(Notification).where(Notification.event == "ticket_resolved"))
        n.recipients.append(NotificationRecipient(email="kim.lee@fabrikam.example", role="contact"))
    raw = make_mail(from_="Kim Lee <kim.lee@fabrikam.example>", subject=f"RE: [Ticket#{number}] Outlook",
                    body="accept\n")
    result = processor.ingest("support", raw, received_at=T0 + timedelta(days=1))
    assert result.outcome == "note_added"
    assert ticket(store, number)["status"] == "In Progress"  # a reply in the window reopens; no accept
    assert any(s.decision == "`accept` read as a reply" for s in result.trace)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_migration_0002_adds_the_lifecycle_columns_to_existing_tickets(processor: MailProcessor, store) -> None:
    from alembic import command

    from pipeline.store.db import alembic_config

    number = open_ticket(processor)

    def migrate(step, target: str) -> None:
        with store.engine.begin() as conn:
            cfg = alembic_config(store.url)
            cfg.attributes["connection"] = conn
            step(cfg, target)

    migrate(command.downgrade, "0001")
    with store.engine.connect() as conn:
        from sqlalchemy import inspect

        assert "status_changed_at" not in {c["name"] for c in inspect(conn).get_columns("tickets")}
    migrate(command.upgrade, "head")
    t = row(store, number)
    assert t.status_changed_at is not None and t.sla_paused_seconds == 0
