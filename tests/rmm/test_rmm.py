"""RMM alert mail (issue 9): each vendor's fields, the storm, recovery, flapping, the loop guard."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline.parsers.mime import parse_mail
from pipeline.parsers.rmm import AlertRecord
from pipeline.parsers.rmm import vendors as v
from pipeline.store.models import Account, Note, Ticket, TimelineEntry

FIXTURES = Path(__file__).parent.parent / "fixtures" / "rmm"
STAGES = '["ticket_number", "reply_reference", "datto_rmm", "kaseya_vsa", "nable", "ninjaone", "cw_automate"]'
T0 = datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc)

EXPECTED = {
    "datto": (v.DattoRmm, dict(device="ACME-SRV01", alert_type="Disk Usage Monitor", site="Acme Corp",
                               severity="High", alert_id="7c3e1f0a-9b2d-4e85-a6c4-1d0f3b5e7a92")),
    "kaseya": (v.KaseyaVsa, dict(device="acme-dc01.root.acme", site="Acme Corp", severity="Critical",
                                 alert_type='Service "Active Directory Domain Services" stopped', alert_id="418822")),
    "nable": (v.Nable, dict(device="ACME-SQL01", alert_type="Backup Status", site="Acme Corp", severity="Failed",
                            alert_id="559201")),
    "ninjaone": (v.NinjaOne, dict(device="ACME-RDS02", alert_type="CPU utilization above 90% for 15 minutes",
                                  site="Acme Corp", severity="Critical")),
    "cw_automate": (v.ConnectWiseAutomate, dict(device="ACME-WS17", alert_type="Drive Space Critical - C:",
                                                site="Acme Corp", severity="FAILED", alert_id="90317")),
}


def read(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def extract(stage: type, raw: bytes) -> AlertRecord | None:
    mail = parse_mail(raw)
    return stage().extract(mail.subject, mail.body_text)


@pytest.mark.parametrize("vendor", sorted(EXPECTED))
def test_each_vendors_alert_mail_gives_device_site_type_severity_and_id(vendor: str) -> None:
    stage, fields = EXPECTED[vendor]
    record = extract(stage, read(f"{vendor}_alert.eml"))
    assert record is not None and not record.recovered
    for name, value in fields.items():
        assert getattr(record, name) == value, name


@pytest.mark.parametrize("vendor", sorted(EXPECTED))
def test_each_vendors_recovery_mail_has_the_alerts_key_and_is_a_recovery(vendor: str) -> None:
    stage, _ = EXPECTED[vendor]
    alert = extract(stage, read(f"{vendor}_alert.eml"))
    recovery = extract(stage, read(f"{vendor}_recovery.eml"))
    assert recovery is not None and recovery.recovered
    assert recovery.key == alert.key


def test_a_customer_mail_with_an_alert_like_subject_is_not_claimed_when_the_sender_is_not_the_vendors(
        make_config) -> None:
    from pipeline.context import MailContext

    config = make_config(parser_stages=STAGES)
    raw = read("datto_alert.eml").replace(b"noreply@merlot.centrastage.net", b"jane@acme.example")
    ctx = MailContext(config, config.mailbox("support"), raw, T0)
    ctx.mail = parse_mail(raw)
    v.DattoRmm()(ctx)
    assert ctx.claimed_by is None and ctx.annotations == {}


def test_a_mailbox_overrides_a_vendors_sender_and_patterns(make_config) -> None:
    from pipeline.context import MailContext

    extra = """
[mailbox.stage_settings.datto_rmm]
senders = ['alerts@rmm\\.acme-msp\\.example']
subject = '^RMM: (?P<device>\\S+) / (?P<alert_type>.+)$'
"""
    config = make_config(extra_mailbox=extra, parser_stages=STAGES)  # extra_mailbox lands in "billing"
    box = config.mailbox("billing")
    raw = (b"From: alerts@rmm.acme-msp.example\nTo: billing@msp.example\nSubject: RMM: ACME-PC9 / Antivirus off\n"
           b"Message-ID: <x1@rmm.acme-msp.example>\n\nSite: Acme Corp\n")
    ctx = MailContext(config, box, raw, T0)
    ctx.mail = parse_mail(raw)
    v.DattoRmm()(ctx)
    record = ctx.annotations["datto_rmm"]
    assert ctx.claimed_by == "datto_rmm"
    assert (record.device, record.alert_type, record.site) == ("ACME-PC9", "Antivirus off", "Acme Corp")


# -- through the pipeline ----------------------------------------------------------------------

@pytest.fixture
def rmm_config(make_config):
    return make_config(parser_stages=STAGES)


@pytest.fixture
def rmm(rmm_config, store, redis_client):
    from pipeline.process import MailProcessor

    return MailProcessor(rmm_config, store, redis_client)


def ninja_alert(device: str, n: int, *, reset: bool = False) -> bytes:
    raw = read("ninjaone_recovery.eml" if reset else "ninjaone_alert.eml").decode()
    raw = raw.replace("ACME-RDS02", device)
    raw = raw.replace("Message-ID: <", f"Message-ID: <{device}.{n}.{'r' if reset else 'a'}.", 1)
    return raw.encode()


def tickets(store) -> list[Ticket]:
    with store.sessions() as s:
        rows = s.scalars(select(Ticket).order_by(Ticket.id)).all()
        s.expunge_all()
        return rows


def test_an_alert_storm_of_1000_mails_for_10_devices_makes_10_tickets_and_the_recoveries_complete_them(
        rmm, store) -> None:
    devices = [f"ACME-PC{i:02d}" for i in range(10)]
    outcomes: dict[str, int] = {}
    for n in range(1000):
        r = rmm.ingest("support", ninja_alert(devices[n % 10], n), received_at=T0 + timedelta(seconds=n))
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    assert outcomes == {"ticket_created": 10, "note_added": 990}
    rows = tickets(store)
    assert len(rows) == 10
    assert sum(t.alert_repeat_count for t in rows) == 990
    assert all(t.alert_repeat_count == 99 for t in rows)
    with store.sessions() as s:
        acme = s.scalar(select(Account.id).where(Account.name == "Acme Corp"))
        # The first repeat adds a note; the other 98 only count.
        assert s.scalar(select(func.count()).select_from(Note)) == 10
    assert {t.account_id for t in rows} == {acme}
    for i, device in enumerate(devices):
        r = rmm.ingest("support", ninja_alert(device, i, reset=True), received_at=T0 + timedelta(hours=1))
        assert r.outcome == "note_added"
    rows = tickets(store)
    assert [t.status for t in rows] == ["Resolved"] * 10
    assert all(t.recovered_at is not None and t.resolution_method == "alert recovered" for t in rows)
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(TimelineEntry)
                        .where(TimelineEntry.what == "alert recovered")) == 10


def test_an_alert_that_fires_again_soon_after_its_recovery_reopens_the_same_ticket(rmm, store) -> None:
    rmm.ingest("support", ninja_alert("ACME-RDS02", 1), received_at=T0)
    rmm.ingest("support", ninja_alert("ACME-RDS02", 1, reset=True), received_at=T0 + timedelta(minutes=10))
    r = rmm.ingest("support", ninja_alert("ACME-RDS02", 2), received_at=T0 + timedelta(minutes=15))
    rows = tickets(store)
    assert len(rows) == 1 and rows[0].status == "New"
    assert r.outcome == "note_added" and r.entity["number"] == rows[0].number
    # Well after the flap window (30 minutes by default), the same alert is a new problem.
    rmm.ingest("support", ninja_alert("ACME-RDS02", 2, reset=True), received_at=T0 + timedelta(minutes=20))
    r = rmm.ingest("support", ninja_alert("ACME-RDS02", 3), received_at=T0 + timedelta(hours=3))
    assert r.outcome == "ticket_created" and len(tickets(store)) == 2


def test_a_recovery_without_an_open_alert_ticket_is_discarded(rmm, store) -> None:
    r = rmm.ingest("support", read("datto_recovery.eml"), received_at=T0)
    assert r.outcome == "discarded" and tickets(store) == []


@pytest.mark.parametrize("vendor", sorted(EXPECTED))
def test_each_vendors_alert_opens_a_ticket_for_its_site_and_its_recovery_resolves_it(rmm, store, vendor) -> None:
    first = rmm.ingest("support", read(f"{vendor}_alert.eml"), received_at=T0)
    assert first.outcome == "ticket_created", first.trace
    second = rmm.ingest("support", read(f"{vendor}_recovery.eml"), received_at=T0 + timedelta(minutes=5))
    assert second.outcome == "note_added" and second.entity == first.entity
    (ticket,) = tickets(store)
    assert ticket.status == "Resolved" and ticket.contact_id is None
    with store.sessions() as s:
        assert s.get(Account, ticket.account_id).name == "Acme Corp"


def test_claimed_alert_mail_is_exempt_from_the_loop_guard(rmm) -> None:
    results = [rmm.ingest("support", ninja_alert("ACME-RDS02", n), received_at=T0) for n in range(30)]
    assert [r.outcome for r in results].count("discarded") == 0
    guard = [t for t in results[-1].trace if t.stage == "loop_guard"]
    assert guard[0].decision == "exempt" and "ninjaone" in guard[0].why


@pytest.mark.parametrize("vendor,priority", [("datto", "High"), ("kaseya", "Critical"), ("nable", "High"),
                                             ("ninjaone", "Critical"), ("cw_automate", "High")])
def test_an_alert_ticket_takes_its_priority_from_the_alerts_severity(rmm_config, store, redis_client,
                                                                     vendor: str, priority: str) -> None:
    from pipeline.process import MailProcessor

    processor = MailProcessor(rmm_config, store, redis_client)
    result = processor.ingest("support", read(f"{vendor}_alert.eml"), received_at=T0)
    assert result.outcome == "ticket_created"
    with store.sessions() as s:
        assert s.scalar(select(Ticket.priority)) == priority


def test_an_unknown_severity_word_leaves_the_mailbox_default() -> None:
    from pipeline.parsers.rmm import priority_for_severity

    assert priority_for_severity("Purple") is None and priority_for_severity(None) is None
    assert priority_for_severity(" WARNING ") == "Medium" and priority_for_severity("Informational") == "Low"
