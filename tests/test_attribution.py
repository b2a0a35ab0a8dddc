"""Who a mail is from (D1.3) when a technician forwards a customer's mail instead of redirecting it,
and what happens to our own notification when it comes back."""

from __future__ import annotations

import json

from sqlalchemy import select

from pipeline.store.models import Notification
from tests.conftest import REDIS_URL, make_mail, run_cli

FORWARD_BODY = """FYI, Kim called about this too. Can we look today?

-----Original Message-----
From: Kim Lee <kim.lee@fabrikam.example>
Sent: Monday, November 23, 2026 8:12 AM
To: Tom Tech <tom@msp.example>
Subject: Scanner offline

The scanner on floor 2 is offline again since this morning.

Kim
"""

PASS = ("Authentication-Results: mx.msp.example; dkim=pass header.d=msp.example header.s=sel1; "
        "spf=pass smtp.mailfrom=msp.example; dmarc=pass header.from=msp.example")


def test_a_customer_mail_forwarded_by_an_authenticated_technician_is_the_customers(processor, store) -> None:
    raw = make_mail(from_="Tom Tech <tom@msp.example>", subject="FW: Scanner offline", body=FORWARD_BODY,
                    top_headers=[PASS])
    result = processor.ingest("support", raw)
    assert result.outcome == "ticket_created"
    attribute = next(s for s in result.trace if s.stage == "attribute")
    assert attribute.decision == "contact" and attribute.why.startswith("forwarded by tom@msp.example")
    shown = json.loads(run_cli("--config", str(processor.config.path), "tickets", "show", "--json",
                               result.entity["number"], env={"REDIS_URL": REDIS_URL}).stdout)
    assert shown["contact"]["email"] == "kim.lee@fabrikam.example" and shown["account"] == "Fabrikam"


def test_a_forward_from_an_unauthenticated_technician_address_speaks_for_nobody_else(processor) -> None:
    raw = make_mail(from_="Tom Tech <tom@msp.example>", subject="FW: Scanner offline", body=FORWARD_BODY)
    result = processor.ingest("support", raw)
    attribute = next(s for s in result.trace if s.stage == "attribute")
    assert attribute.decision == "unverified resource"


def test_our_own_notification_coming_back_is_discarded_not_answered(processor, store) -> None:
    created = processor.ingest("support", make_mail(subject="Toner empty"))
    with store.sessions() as s:
        sent = s.scalar(select(Notification).where(Notification.event == "ticket_created"))
    # A customer's forwarding rule sends our notification straight back into the mailbox.
    echo = make_mail(from_=f"MSP Service Desk <{sent.from_address}>", subject=sent.subject,
                     body=sent.body_text, message_id=sent.message_id)
    result = processor.ingest("support", echo)
    assert result.outcome == "discarded" and result.reason == "our own notification came back"
    with store.sessions() as s:
        assert s.query(Notification).count() == 1
    assert created.outcome == "ticket_created"
