"""History (D1.7): every notification kept with its text, recipients, status and error; purged after
30 days by a scheduled task; `pipeline notifications list|show`; what the sweep picks up."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select, update

from pipeline.notify.send import due, purge
from pipeline.process import MailProcessor
from pipeline.store.models import Notification, NotificationRecipient
from pipeline.tasks.app import create_app
from tests.conftest import make_mail, run_cli
from tests.notify.helpers import outbox, send_pending
from tests.notify.smtp import SmtpServer

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)


def age(store, nid: int, days: float) -> None:
    with store.transaction() as s:
        s.execute(update(Notification).where(Notification.id == nid)
                  .values(created_at=datetime.now(timezone.utc) - timedelta(days=days)))


def test_history_older_than_30_days_is_purged_with_its_recipients(processor: MailProcessor, store) -> None:
    for subject in ("Old one", "Recent one"):
        processor.ingest("support", make_mail(subject=subject), received_at=T0)
    old, recent = outbox(store)
    age(store, old.id, 31)
    age(store, recent.id, 29)

    with store.transaction() as s:
        assert purge(s, datetime.now(timezone.utc)) == 1
    assert [n.id for n in outbox(store)] == [recent.id]
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(NotificationRecipient)) == 1


def test_beat_sweeps_the_outbox_and_purges_history_with_registered_tasks(config) -> None:
    app = create_app(config)
    schedule = app.conf.beat_schedule
    app.loader.import_default_modules()
    for key, task in (("notify:sweep", "pipeline.tasks.notify.sweep"),
                      ("notify:purge_history", "pipeline.tasks.notify.purge_history")):
        assert schedule[key]["task"] == task and task in app.tasks
        assert app.amqp.router.route({}, task)["queue"].name == "notify"
    assert schedule["notify:purge_history"]["schedule"] == 86400


def test_the_sweep_takes_due_rows_and_rows_left_by_a_dead_sender_only(processor: MailProcessor, store) -> None:
    for i in range(4):
        processor.ingest("support", make_mail(from_=f"u{i}@acme.example", subject=f"Issue {i}"), received_at=T0)
    fresh, backing_off, abandoned, held = (n.id for n in outbox(store))
    now = datetime.now(timezone.utc)
    with store.transaction() as s:
        s.execute(update(Notification).where(Notification.id != fresh).values(created_at=now - timedelta(minutes=5)))
        s.execute(update(Notification).where(Notification.id == backing_off)
                  .values(next_attempt_at=now + timedelta(minutes=1)))
        s.execute(update(Notification).where(Notification.id == abandoned)
                  .values(status="sending", lease_until=now - timedelta(seconds=1)))
        s.execute(update(Notification).where(Notification.id == held)
                  .values(status="sending", lease_until=now + timedelta(seconds=60)))

    with store.sessions() as s:
        assert due(s, now) == [abandoned]  # the fresh one is its commit's task's; the others wait
        assert due(s, now + timedelta(minutes=2)) == [fresh, backing_off, abandoned, held]


def test_notifications_list_and_show_give_status_recipients_text_and_error(
        processor: MailProcessor, store, config, smtp: SmtpServer) -> None:
    smtp.inbox.refuse.add("kim.lee@fabrikam.example")
    processor.ingest("support", make_mail(subject="Printer jams"), received_at=T0)
    processor.ingest("support", make_mail(from_="Kim Lee <kim.lee@fabrikam.example>", subject="Mouse"),
                     received_at=T0)
    send_pending(store, config)
    sent, failed = outbox(store)

    listed = run_cli("--config", str(config.path), "notifications", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["id"], r["status"], r["to"]) for r in rows] == [
        (failed.id, "failed", ["kim.lee@fabrikam.example"]), (sent.id, "sent", ["jane@acme.example"])]
    only_failed = run_cli("--config", str(config.path), "notifications", "list", "--status", "failed")
    assert len(only_failed.stdout.splitlines()) == 1 and b"Mouse" in only_failed.stdout

    shown = json.loads(run_cli("--config", str(config.path), "notifications", "show", "--json", str(failed.id)).stdout)
    assert shown["status"] == "failed" and "550" in shown["last_error"] and shown["attempts"] == 1
    assert shown["roles"] == {"kim.lee@fabrikam.example": "sender"}
    assert "we have opened ticket" in shown["body_text"] and shown["body_html"].startswith("<p>")
    text = run_cli("--config", str(config.path), "notifications", "show", str(failed.id)).stdout.decode()
    assert "last_error: recipient refused: kim.lee@fabrikam.example: 550" in text
    assert "message_id: <mailloop+ticket+" in text
