"""A real Celery worker process (D9): Maildir mail becomes tickets, exactly once, whatever crashes.

The worker runs as `celery -A pipeline.worker worker` in a process of its own, on a
broker of the test's own (a private redis-server, or a RabbitMQ vhost), against the
real PostgreSQL. Tasks are sent by name, as beat sends them.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
from celery import Celery
from sqlalchemy import func, select

from pipeline.config import Config, parse_config
from pipeline.stages import PIPELINE
from pipeline.store.db import Store
from pipeline.store.models import JournalEntry, Ticket
from pipeline.tasks.app import create_app
from tests.services import WorkerProcess, private_redis, rabbitmq_vhost, wait_until
from tests.conftest import config_text, make_mail

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "redis":
        with private_redis(tmp_path / "broker") as url:
            yield url
    else:
        with rabbitmq_vhost() as url:
            yield url


@pytest.fixture
def fleet_config(tmp_path: Path, db_url: str, key_prefix: str, store: Store) -> Config:
    path = tmp_path / "mailboxes.toml"
    maildir = tmp_path / "maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    path.write_text(config_text(db_url, key_prefix,
                                source=f'{{ kind = "maildir", path = "{maildir}", poll_seconds = 1 }}'),
                    encoding="utf-8")
    return parse_config(path.read_text(encoding="utf-8"), path)


def _drop(maildir: Path, count: int) -> list[str]:
    """Deliver `count` distinct customer mails into the Maildir's new/, as an MTA does (via tmp/)."""
    names = []
    for i in range(count):
        raw = make_mail(subject=f"Laptop {i:03d} will not boot", body=f"Laptop {i} shows a black screen.\n",
                        message_id=f"<boot-{i:03d}@acme.example>")
        name = f"1764000000.M{i}P42.mx01"
        (maildir / "tmp" / name).write_bytes(raw)
        (maildir / "tmp" / name).rename(maildir / "new" / name)
        names.append(name)
    return names


def _outcomes(store: Store) -> Counter[str | None]:
    with store.sessions() as session:
        rows = session.execute(select(JournalEntry.outcome, func.count()).group_by(JournalEntry.outcome))
        return Counter({outcome: n for outcome, n in rows})


def _app(config: Config, broker_url: str) -> Celery:
    app = create_app(config)
    app.conf.broker_url = broker_url
    return app


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_maildir_mail_becomes_tickets_through_a_real_worker(
        fleet_config: Config, broker_url: str, store: Store, tmp_path: Path) -> None:
    maildir = tmp_path / "maildir"
    _drop(maildir, 5)
    worker = WorkerProcess(fleet_config.path, tmp_path / "worker.log",
                           env={"CELERY_BROKER_URL": broker_url}).start()
    app = _app(fleet_config, broker_url)
    try:
        app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
        wait_until(lambda: _outcomes(store)["ticket_created"] == 5, 60,
                   "five mails did not become tickets")
    finally:
        worker.stop()
        app.close()
    assert not any((maildir / "new").iterdir())
    assert sorted(p.name for p in (maildir / "cur").iterdir()) == \
        sorted(f"1764000000.M{i}P42.mx01:2," for i in range(5))
    with store.sessions() as session:
        titles = set(session.scalars(select(Ticket.title)))
    assert titles == {f"Laptop {i:03d} will not boot" for i in range(5)}

    # Structured logs: every line is JSON; a mail's lines carry its Message-ID, mailbox and stage.
    lines = [json.loads(line) for line in worker.log_path.read_text().splitlines() if line.startswith("{")]
    written = [r for r in lines if r["logger"] == "pipeline.process" and "ticket_created" in r["msg"]]
    assert {r["message_id"] for r in written} == {f"<boot-{i:03d}@acme.example>" for i in range(5)}
    assert {(r["mailbox"], r["stage"]) for r in written} == {("support", PIPELINE[-1].name)}


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_worker_killed_mid_batch_leaves_every_mail_processed_exactly_once(
        fleet_config: Config, broker_url: str, store: Store, tmp_path: Path) -> None:
    total = 400
    maildir = tmp_path / "maildir"
    _drop(maildir, total)
    env = {"CELERY_BROKER_URL": broker_url}
    app = _app(fleet_config, broker_url)
    worker = WorkerProcess(fleet_config.path, tmp_path / "worker.log", env=env).start()
    try:
        app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
        wait_until(lambda: _outcomes(store)["ticket_created"] >= 10, 90, "processing did not start")
        worker.kill()
        done_at_kill = _outcomes(store)["ticket_created"]
        assert done_at_kill < total, "the worker finished before it could be killed; nothing was tested"

        # A new worker; the scheduled reconciliation and fetch find what the dead one left.
        worker = WorkerProcess(fleet_config.path, tmp_path / "worker2.log", env=env).start()
        app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
        app.send_task("pipeline.tasks.maintenance.reconcile", kwargs={"older_than_seconds": 0})
        try:
            wait_until(lambda: _outcomes(store)[None] == 0 and sum(_outcomes(store).values()) == total, 180,
                       "not every mail was processed after the restart")
        except AssertionError as exc:  # say what the workers saw, for a failure that shows only under load
            raise AssertionError(f"{exc}: {_outcomes(store)}\n--- killed worker ---\n"
                                 f"{(tmp_path / 'worker.log').read_text()[-3000:]}\n--- new worker ---\n"
                                 f"{worker.log()[-3000:]}") from None
    finally:
        worker.stop()
        app.close()

    assert _outcomes(store) == Counter({"ticket_created": total})
    with store.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Ticket)) == total
        assert session.scalar(select(func.count(func.distinct(Ticket.number)))) == total
        journaled = session.scalar(select(func.count(func.distinct(JournalEntry.source_ref))))
    assert journaled == total  # no mail journaled twice
    assert not any((maildir / "new").iterdir())
    assert len(list((maildir / "cur").iterdir())) == total


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_the_beat_task_for_scheduled_transitions_closes_a_resolved_ticket_after_its_window(
        fleet_config: Config, broker_url: str, store: Store, processor, tmp_path: Path) -> None:
    number = processor.ingest("support", make_mail(subject="Printer toner")).entity["number"]
    resolved = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    with store.transaction() as session:
        ticket = session.scalar(select(Ticket).where(Ticket.number == number))
        ticket.status, ticket.resolved_at, ticket.status_changed_at = "Resolved", resolved, resolved
    assert "maintenance:scheduled_transitions" in _app(fleet_config, broker_url).conf.beat_schedule

    worker = WorkerProcess(fleet_config.path, tmp_path / "worker.log",
                           env={"CELERY_BROKER_URL": broker_url}).start()
    app = _app(fleet_config, broker_url)
    try:
        # The clock is the task's argument: two days after resolving, the 3-day window is still open.
        app.send_task("pipeline.tasks.maintenance.scheduled_transitions",
                      kwargs={"now": (resolved + timedelta(days=2)).isoformat()})
        app.send_task("pipeline.tasks.maintenance.scheduled_transitions",
                      kwargs={"now": (resolved + timedelta(days=4)).isoformat()})
        wait_until(lambda: _status_of(store, number) == "Closed", 60, "the ticket was not closed")
    finally:
        worker.stop()
        app.close()
    assert "Task pipeline.tasks.maintenance.scheduled_transitions" in worker.log()


def _status_of(store: Store, number: str) -> str:
    with store.sessions() as session:
        return session.scalar(select(Ticket.status).where(Ticket.number == number))
