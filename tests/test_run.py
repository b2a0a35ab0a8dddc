"""`pipeline run`: worker, scheduler and fetching on one machine; a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from pipeline.store.db import Store
from pipeline.store.models import JournalEntry
from tests.services import private_redis, wait_until
from tests.conftest import config_text

pytestmark = pytest.mark.timeout(240)

DEMO_MAIL = Path(__file__).resolve().parents[1] / "pipeline" / "demo" / "maildir" / "new"


def _processes_using(config_path: Path) -> list[int]:
    """Pids whose environment names this test's configuration: the run and all its children."""
    needle = f"PIPELINE_CONFIG={config_path}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _maildir_config(tmp_path: Path, db_url: str, key_prefix: str, maildir: Path, poll_seconds: int) -> Path:
    path = tmp_path / "mailboxes.toml"
    path.write_text(config_text(db_url, key_prefix, source=f'{{ kind = "maildir", path = "{maildir}", '
                                                           f'poll_seconds = {poll_seconds} }}'), encoding="utf-8")
    return path


def _start_run(config_path: Path, broker: str, log: Path, *mailboxes: str) -> subprocess.Popen[bytes]:
    args = [a for m in mailboxes for a in ("--mailbox", m)]
    env = {**os.environ, "PIPELINE_CONFIG": str(config_path), "CELERY_BROKER_URL": broker}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--concurrency", "1", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_run_processes_the_demo_maildir_and_stops_cleanly_on_sigterm(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client: redis.Redis) -> None:
    maildir = tmp_path / "maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    for mail in DEMO_MAIL.iterdir():
        (maildir / "new" / mail.name).write_bytes(mail.read_bytes())
    config_path = _maildir_config(tmp_path, db_url, key_prefix, maildir, poll_seconds=1)

    def outcomes() -> int:
        with store.sessions() as session:
            return session.scalar(select(func.count()).select_from(JournalEntry)
                                  .where(JournalEntry.outcome.is_not(None)))

    with private_redis(tmp_path / "broker") as broker:
        log = tmp_path / "run.log"
        run = _start_run(config_path, broker, log, "support")
        try:
            wait_until(lambda: outcomes() == 9, 90, "the demo Maildir was not processed")
            assert len(_processes_using(config_path)) >= 3  # the run, its worker and its beat
            run.send_signal(signal.SIGTERM)
            assert run.wait(90) == 0, log.read_text()
        finally:
            if run.poll() is None:
                run.kill()  # its children follow it (they get SIGTERM when it dies)
        wait_until(lambda: not _processes_using(config_path), 30, "children outlived `pipeline run`")
    # The scheduler lock was released for the next machine.
    assert not redis_client.exists(f"{key_prefix}lock:scheduler")
    assert not any((maildir / "new").iterdir())
    assert len(list((maildir / "cur").iterdir())) == 9
    assert "stopped" in log.read_text()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_two_machines_never_both_schedule_and_the_second_takes_over(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store) -> None:
    maildir = tmp_path / "maildir"
    config_path = _maildir_config(tmp_path, db_url, key_prefix, maildir, poll_seconds=5)
    schedules = "this machine schedules for the fleet"
    with private_redis(tmp_path / "broker") as broker:
        first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
        first = _start_run(config_path, broker, first_log)
        second = None
        try:
            wait_until(lambda: schedules in first_log.read_text(), 60, "the first machine did not schedule")
            second = _start_run(config_path, broker, second_log)
            wait_until(lambda: "worker started" in second_log.read_text(), 60, "the second machine did not start")
            assert schedules not in second_log.read_text()
            first.send_signal(signal.SIGTERM)
            assert first.wait(90) == 0
            wait_until(lambda: schedules in second_log.read_text(), 30, "the second machine did not take over")
        finally:
            for run in (first, second):
                if run is not None and run.poll() is None:
                    run.send_signal(signal.SIGTERM)
                    run.wait(90)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_killed_run_leaves_no_worker_or_beat_behind(tmp_path: Path, db_url: str, key_prefix: str) -> None:
    config_path = tmp_path / "mailboxes.toml"
    config_path.write_text(config_text(db_url, key_prefix), encoding="utf-8")
    with private_redis(tmp_path / "broker") as broker:
        log = tmp_path / "run.log"
        run = _start_run(config_path, broker, log)
        wait_until(lambda: "beat started" in log.read_text(), 60, "`pipeline run` did not start")
        assert len(_processes_using(config_path)) >= 3
        run.kill()
        run.wait(10)
        wait_until(lambda: not _processes_using(config_path), 90, "children outlived a SIGKILLed `pipeline run`")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_second_bare_celery_beat_waits_until_the_first_is_gone(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store) -> None:
    maildir = tmp_path / "maildir"
    config_path = _maildir_config(tmp_path, db_url, key_prefix, maildir, poll_seconds=1)
    sends = "Scheduler: Sending due task fetch:support"

    def beat(name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        env = {**os.environ, "PIPELINE_CONFIG": str(config_path), "CELERY_BROKER_URL": broker}
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "pipeline.worker", "beat", "--loglevel",
                                 "INFO", "--schedule", str(tmp_path / f"{name}.schedule")],
                                env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        return proc, log

    with private_redis(tmp_path / "broker") as broker:
        first, first_log = beat("first")
        second, second_log = beat("second")
        try:
            wait_until(lambda: sends in first_log.read_text() or sends in second_log.read_text(), 60,
                       "no beat scheduled anything")
            holder, holder_log, waiter, waiter_log = (
                (first, first_log, second, second_log) if sends in first_log.read_text()
                else (second, second_log, first, first_log))
            wait_until(lambda: "waiting to take over" in waiter_log.read_text(), 30, "the second beat did not wait")
            time.sleep(3)
            assert sends not in waiter_log.read_text()
            holder.send_signal(signal.SIGTERM)
            assert holder.wait(60) == 0
            wait_until(lambda: sends in waiter_log.read_text(), 60, "the waiting beat did not take over")
        finally:
            for proc in (first, second):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
