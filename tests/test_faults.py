"""Fault tests (issue 8): crashes and outages under real workers, each ending with an accounting.

Every test drops distinct customer mails into a Maildir, lets real Celery workers fetch
and process them while something breaks, and ends with a query on the journal and the
store: every mail journaled once, every journal row with exactly one outcome, one
ticket per `ticket_created`, no note written twice, nothing left unaccounted.

Reconciliation runs as beat would run it, with a short threshold (`older_than_seconds`)
instead of the production ten minutes, so that a test does not wait ten minutes.
"""

from __future__ import annotations

import random
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import func, select

from pipeline.config import parse_config
from pipeline.sources.base import LOCK_SECONDS
from pipeline.store.db import Store
from pipeline.store.directory import load_directory
from pipeline.store.models import JournalEntry, Note, Ticket
from pipeline.tasks.app import create_app
from tests.conftest import DIRECTORY, REDIS_URL, config_text, make_mail, run_cli
from tests.services import PrivatePostgres, PrivateRedis, WorkerProcess, wait_until

pytestmark = pytest.mark.timeout(420)


# -- set-up and accounting ---------------------------------------------------------------------

def _maildir(tmp_path: Path, count: int, subject: str = "Laptop {i:03d} will not boot") -> Path:
    maildir = tmp_path / "maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        raw = make_mail(subject=subject.format(i=i), body=f"Mail {i}.\n", message_id=f"<fault-{i:03d}@acme.example>")
        (maildir / "new" / f"1764000000.M{i}P9.mx01").write_bytes(raw)
    return maildir


def _config(tmp_path: Path, db_url: str, key_prefix: str, maildir: Path, **extra: str) -> Path:
    path = tmp_path / "mailboxes.toml"
    path.write_text(config_text(db_url, key_prefix, source=f'{{ kind = "maildir", path = "{maildir}" }}', **extra),
                    encoding="utf-8")
    return path


def _app(config_path: Path, broker: str) -> Celery:
    app = create_app(parse_config(config_path.read_text(encoding="utf-8"), config_path))
    app.conf.broker_url = broker
    return app


def _outcomes(store: Store) -> Counter:
    with store.sessions() as s:
        return Counter(dict(s.execute(select(JournalEntry.outcome, func.count()).group_by(JournalEntry.outcome)).all()))


def _all_done(store: Store, total: int) -> bool:
    outcomes = _outcomes(store)
    return outcomes[None] == 0 and sum(outcomes.values()) == total


def account(store: Store, maildir: Path, total: int, expected: Counter) -> None:
    """Mails in = outcomes out; no duplicate tickets or notes; nothing unaccounted."""
    with store.sessions() as s:
        journaled = s.scalar(select(func.count()).select_from(JournalEntry))
        distinct_sources = s.scalar(select(func.count(func.distinct(JournalEntry.source_ref))))
        outcomes = Counter(dict(s.execute(select(JournalEntry.outcome, func.count())
                                          .group_by(JournalEntry.outcome)).all()))
        tickets = s.scalar(select(func.count()).select_from(Ticket))
        distinct_titles = s.scalar(select(func.count(func.distinct(Ticket.title))))
        created_numbers = s.scalar(select(func.count(func.distinct(JournalEntry.entity_number)))
                                   .where(JournalEntry.outcome == "ticket_created"))
        notes_twice = s.execute(select(Note.journal_id).where(Note.journal_id.is_not(None))
                                .group_by(Note.journal_id).having(func.count() > 1)).all()
    assert journaled == distinct_sources == total, "a mail was journaled twice or not at all"
    assert outcomes == expected, f"outcomes {outcomes} != {expected}"
    assert tickets == distinct_titles == created_numbers == expected["ticket_created"], "duplicate tickets"
    assert notes_twice == [], "a mail wrote two notes"
    assert not any((maildir / "new").iterdir()) and len(list((maildir / "cur").iterdir())) == total


# -- the tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_four_workers_one_killed_every_three_seconds_process_500_mails_exactly_once(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store) -> None:
    total = 500
    maildir = _maildir(tmp_path, total)
    config = _config(tmp_path, db_url, key_prefix, maildir)
    rng = random.Random(8)
    with_broker = PrivateRedis(tmp_path / "broker").start()
    env = {"CELERY_BROKER_URL": with_broker.url}
    workers = [WorkerProcess(config, tmp_path / f"w{i}.log", concurrency=1, env=env).start() for i in range(4)]
    app = _app(config, with_broker.url)
    kills = 0
    try:
        app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
        deadline = time.monotonic() + 240
        while not _all_done(store, total) and time.monotonic() < deadline:
            time.sleep(rng.uniform(2, 4))
            if _all_done(store, total):
                break
            victim = rng.randrange(len(workers))
            workers[victim].kill()
            kills += 1
            workers[victim] = WorkerProcess(config, tmp_path / f"w{victim}.log", concurrency=1, env=env).start()
            # What beat's reconcile would do (after minutes in production, after seconds here).
            app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
            app.send_task("pipeline.tasks.maintenance.reconcile", kwargs={"older_than_seconds": 3})
        assert _all_done(store, total), f"not done after {kills} kill(s): {_outcomes(store)}"
        _fetch_until_moved(app, maildir)
    finally:
        for w in workers:
            w.stop()
        app.close()
        with_broker.stop()
    assert kills >= 1, "nothing was killed while mail was in flight"
    account(store, maildir, total, Counter(ticket_created=total))


def _fetch_until_moved(app: Celery, maildir: Path) -> None:
    """Fetch as beat would, until `new/` is empty: a fetcher killed between a chunk's journal
    commit and its moves leaves those files behind (journaled, processed by reconcile), and the
    next fetch, once the dead fetcher's lock has expired, only moves them."""
    deadline = time.monotonic() + LOCK_SECONDS + 60
    while any((maildir / "new").iterdir()) and time.monotonic() < deadline:
        app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
        time.sleep(3)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_private_redis_restarted_mid_run_loses_and_doubles_nothing(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store) -> None:
    total = 300
    maildir = _maildir(tmp_path, total)
    config = _config(tmp_path, db_url, key_prefix, maildir)
    server = PrivateRedis(tmp_path / "redis").start()
    # The private Redis is everything Redis does here: broker, loop guard and locks.
    env = {"CELERY_BROKER_URL": server.url, "REDIS_URL": server.url}
    workers = [WorkerProcess(config, tmp_path / f"w{i}.log", concurrency=1, env=env).start() for i in range(2)]
    app = _app(config, server.url)
    try:
        app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
        wait_until(lambda: _outcomes(store)["ticket_created"] >= 20, 90, "processing did not start")
        server.stop()  # queued tasks, loop-guard windows and locks are gone with it (no persistence)
        time.sleep(2)
        server.start()
        wait_until(lambda: all(w.proc.poll() is None for w in workers), 5, "a worker died of the outage")
        deadline = time.monotonic() + 180
        while not _all_done(store, total) and time.monotonic() < deadline:
            app.send_task("pipeline.tasks.maintenance.reconcile", kwargs={"older_than_seconds": 3})
            time.sleep(3)
        assert _all_done(store, total), _outcomes(store)
    finally:
        for w in workers:
            w.stop()
        app.close()
        server.stop()
    account(store, maildir, total, Counter(ticket_created=total))


def test_a_private_postgresql_restarted_mid_run_loses_and_doubles_nothing(
        tmp_path: Path, key_prefix: str) -> None:
    total = 300
    pg = PrivatePostgres().start()
    broker = PrivateRedis(tmp_path / "broker").start()
    store = Store(pg.url)
    workers: list[WorkerProcess] = []
    app = None
    try:
        store.upgrade()
        (tmp_path / "directory.toml").write_text(DIRECTORY, encoding="utf-8")
        maildir = _maildir(tmp_path, total)
        config = _config(tmp_path, pg.url, key_prefix, maildir)
        load_directory(store, tmp_path / "directory.toml", parse_config(config.read_text(), config).settings.numbering)
        env = {"CELERY_BROKER_URL": broker.url}
        workers = [WorkerProcess(config, tmp_path / f"w{i}.log", concurrency=1, env=env).start() for i in range(2)]
        app = _app(config, broker.url)
        app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
        wait_until(lambda: _outcomes(store)["ticket_created"] >= 20, 90, "processing did not start")
        store.engine.dispose()
        pg.stop()
        time.sleep(3)  # tasks meanwhile fail with the database down and retry with backoff
        pg.start()
        deadline = time.monotonic() + 180
        while not _all_done(store, total) and time.monotonic() < deadline:
            app.send_task("pipeline.tasks.maintenance.reconcile", kwargs={"older_than_seconds": 30})
            time.sleep(3)
        assert _all_done(store, total), _outcomes(store)
        assert any("Retry in" in w.log() for w in workers), "the outage was not felt; nothing was tested"
        account(store, maildir, total, Counter(ticket_created=total))
    finally:
        for w in workers:
            w.stop()
        if app is not None:
            app.close()
        store.dispose()
        broker.stop()
        pg.destroy()


POISON_STAGE = '''
from pathlib import Path


class PoisonStage:
    """Crashes on mail whose subject says POISON until the operator fixes the cause."""

    name = "poison"
    fixed = Path({fixed!r})

    def __call__(self, ctx):
        if "POISON" in ctx.parsed.subject and not self.fixed.exists():
            raise ValueError("cannot handle this mail yet")
        ctx.note(self.name, "ok", "")
'''


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_poison_mail_is_quarantined_while_the_others_flow_and_replays_once_fixed(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store, monkeypatch) -> None:
    total = 40
    maildir = _maildir(tmp_path, total)
    (maildir / "new" / "1764000000.M20P9.mx01").write_bytes(
        make_mail(subject="POISON: printer exploded", message_id="<poison@acme.example>"))
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    fixed = tmp_path / "fixed"
    (plugins / "poison_stage.py").write_text(textwrap.dedent(POISON_STAGE.format(fixed=str(fixed))))
    monkeypatch.syspath_prepend(str(plugins))  # the configuration is checked here too
    config = _config(tmp_path, db_url, key_prefix, maildir,
                     parser_stages='["ticket_number", "reply_reference", "poison_stage:PoisonStage"]')
    broker = PrivateRedis(tmp_path / "broker").start()
    env = {"CELERY_BROKER_URL": broker.url, "PYTHONPATH": str(plugins)}
    worker = WorkerProcess(config, tmp_path / "w.log", env=env).start()
    app = _app(config, broker.url)
    try:
        app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
        wait_until(lambda: _all_done(store, total), 90, "the mail did not flow")
    finally:
        worker.stop()
        app.close()
        broker.stop()
    account(store, maildir, total, Counter(ticket_created=total - 1, quarantined=1))
    with store.sessions() as s:
        poison = s.scalar(select(JournalEntry).where(JournalEntry.outcome == "quarantined"))
        assert poison.failed_stage == "extract" and "cannot handle this mail yet" in poison.reason

    fixed.touch()  # the operator deploys the fix, then replays
    proc = run_cli("--config", str(config), "quarantine", "replay", "--json", str(poison.id),
                   env={"REDIS_URL": REDIS_URL, "PYTHONPATH": str(plugins)})
    assert proc.returncode == 0, proc.stderr.decode()
    assert '"outcome": "ticket_created"' in proc.stdout.decode()
    account(store, maildir, total, Counter(ticket_created=total))
