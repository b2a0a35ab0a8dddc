"""The notify task in a real Celery worker: sent after commit, retried while SMTP is down, and a
notify worker killed between commit and send still sends once it is back. Mails are counted
where they arrive, in a real SMTP server.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
from celery import Celery

from pipeline.config import Config, parse_config
from pipeline.store.db import Store
from pipeline.store.models import Notification
from pipeline.tasks.app import create_app
from pipeline.tasks.notify import LEASE_SECONDS
from tests.conftest import config_text, make_mail
from tests.notify.conftest import smtp_table
from tests.notify.helpers import outbox
from tests.notify.smtp import SmtpServer, StallingServer
from tests.services import WorkerProcess, free_port, private_redis, wait_until

pytestmark = [pytest.mark.timeout(300), pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)]


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    with private_redis(tmp_path / "broker") as url:
        yield url


@pytest.fixture
def smtp_port() -> int:
    return free_port()


@pytest.fixture
def fleet_config(tmp_path: Path, db_url: str, key_prefix: str, store: Store, smtp_port: int) -> Config:
    path = tmp_path / "mailboxes.toml"
    maildir = tmp_path / "maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    path.write_text(config_text(db_url, key_prefix, smtp_table(smtp_port, timeout_seconds="10"),
                                source=f'{{ kind = "maildir", path = "{maildir}", poll_seconds = 1 }}'),
                    encoding="utf-8")
    return parse_config(path.read_text(encoding="utf-8"), path)


def deliver_mail(tmp_path: Path, subject: str) -> None:
    """A customer mail into the Maildir's new/, as an MTA does (via tmp/)."""
    name = f"{time.time():.0f}.M1P42.mx01"
    (tmp_path / "maildir" / "tmp" / name).write_bytes(make_mail(subject=subject))
    (tmp_path / "maildir" / "tmp" / name).rename(tmp_path / "maildir" / "new" / name)


def app_for(config: Config, broker_url: str) -> Celery:
    app = create_app(config)
    app.conf.broker_url = broker_url
    return app


def the_row(store: Store) -> Notification | None:
    rows = outbox(store)
    return rows[0] if rows else None


def test_a_new_ticket_is_notified_after_commit_by_the_notify_task(
        fleet_config: Config, broker_url: str, store: Store, tmp_path: Path, smtp_port: int) -> None:
    smtp = SmtpServer(smtp_port).start()
    worker = WorkerProcess(fleet_config.path, tmp_path / "worker.log", env={"CELERY_BROKER_URL": broker_url}).start()
    app = app_for(fleet_config, broker_url)
    try:
        deliver_mail(tmp_path, "Laptop will not boot")
        app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
        wait_until(lambda: smtp.inbox.count() == 1, 60, "the notification did not arrive")
        wait_until(lambda: the_row(store).status == "sent", 10, "the row was not marked sent")
    finally:
        worker.stop()
        app.close()
        smtp.stop()
    assert smtp.inbox.received[0].rcpt_tos == ["jane@acme.example"]
    assert "[Ticket#T" in smtp.inbox.received[0].message["Subject"]
    assert "Task pipeline.tasks.notify.send_notifications" in worker.log()


def test_with_smtp_down_the_task_retries_and_the_mail_arrives_exactly_once_when_it_is_back(
        fleet_config: Config, broker_url: str, store: Store, tmp_path: Path, smtp_port: int) -> None:
    smtp = SmtpServer(smtp_port)  # not listening yet
    worker = WorkerProcess(fleet_config.path, tmp_path / "worker.log", env={"CELERY_BROKER_URL": broker_url}).start()
    app = app_for(fleet_config, broker_url)
    try:
        deliver_mail(tmp_path, "Scanner offline")
        app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
        wait_until(lambda: (the_row(store) is not None and the_row(store).attempts >= 2), 90,
                   "the notify task did not retry")
        assert the_row(store).status in ("pending", "sending") and "refused" in (the_row(store).last_error or "")
        smtp.start()
        wait_until(lambda: smtp.inbox.count() >= 1, 120, "the notification did not arrive once SMTP was back")
        wait_until(lambda: the_row(store).status == "sent", 10, "the row was not marked sent")
        app.send_task("pipeline.tasks.notify.sweep")  # a sweep after the fact finds nothing to send
        time.sleep(3)
    finally:
        worker.stop()
        app.close()
        smtp.stop()
    assert smtp.inbox.count() == 1
    assert "Retry in" in worker.log()


def test_a_notify_worker_killed_between_commit_and_send_still_sends_once_it_is_back(
        fleet_config: Config, broker_url: str, store: Store, tmp_path: Path, smtp_port: int) -> None:
    staller = StallingServer(smtp_port)  # the sender connects and waits for a greeting that never comes
    env = {"CELERY_BROKER_URL": broker_url}
    worker = WorkerProcess(fleet_config.path, tmp_path / "worker.log", env=env).start()
    app = app_for(fleet_config, broker_url)
    smtp = SmtpServer(smtp_port)
    try:
        deliver_mail(tmp_path, "Monitor flickers")
        app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
        wait_until(lambda: staller.accepted >= 1 and the_row(store) is not None
                   and the_row(store).status == "sending", 60, "the sender did not get into its SMTP session")
        worker.kill()
        staller.close()
        assert the_row(store).status == "sending" and the_row(store).sent_at is None

        smtp.start()
        worker = WorkerProcess(fleet_config.path, tmp_path / "worker2.log", env=env).start()
        # Beat's sweep, run as it would be once the dead sender's lease has run out.
        later = (datetime.now(timezone.utc) + timedelta(seconds=LEASE_SECONDS + 60)).isoformat()
        app.send_task("pipeline.tasks.notify.sweep", kwargs={"now": later})
        wait_until(lambda: smtp.inbox.count() >= 1, 60, "the notification was not sent after the restart")
        wait_until(lambda: the_row(store).status == "sent", 10, "the row was not marked sent")
        app.send_task("pipeline.tasks.notify.sweep", kwargs={"now": later})  # and never again
        time.sleep(3)
    finally:
        worker.stop()
        app.close()
        smtp.stop()
        staller.close()
    assert smtp.inbox.count() == 1
    row = the_row(store)
    assert smtp.inbox.received[0].message["Message-ID"] == row.message_id and row.attempts == 2
