"""One fetcher per mailbox at a time across the fleet: a Redis lock with an expiry (D9)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from celery import current_app

import pipeline.tasks
from pipeline.tasks.app import create_app
from pipeline.tasks.fetch import fetch_mailbox
from tests.conftest import make_mail


@pytest.fixture
def maildir_config(make_config, store, tmp_path: Path, monkeypatch):
    maildir = tmp_path / "maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1764000000.M1P1.mx").write_bytes(make_mail(subject="Projector broken"))
    config = make_config(source=f'{{ kind = "maildir", path = "{maildir}" }}')
    monkeypatch.setenv("PIPELINE_CONFIG", str(config.path))
    monkeypatch.setattr(pipeline.tasks, "_runtime", None)
    # The fetch enqueues through the current Celery app: make it one of this configuration's.
    previous = current_app._get_current_object()
    app = create_app(config)
    app.set_current()
    yield config, maildir
    previous.set_current()
    app.close()
    if pipeline.tasks._runtime is not None:
        pipeline.tasks._runtime.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_mailbox_being_fetched_elsewhere_is_skipped_until_its_lock_is_free(
        maildir_config, redis_client: redis.Redis, key_prefix: str) -> None:
    config, maildir = maildir_config
    held = redis_client.lock(f"{key_prefix}lock:fetch:support", timeout=30)
    assert held.acquire(blocking=False)  # another machine's fetcher is at work
    try:
        assert fetch_mailbox.run("support") == 0
        assert [p.name for p in (maildir / "new").iterdir()] == ["1764000000.M1P1.mx"]
    finally:
        held.release()
    assert fetch_mailbox.run("support") == 1
    assert not any((maildir / "new").iterdir())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_lock_left_by_a_dead_fetcher_expires(maildir_config, redis_client: redis.Redis, key_prefix: str) -> None:
    config, maildir = maildir_config
    redis_client.set(f"{key_prefix}lock:fetch:support", "a worker that died", px=300)
    assert fetch_mailbox.run("support") == 0
    time.sleep(0.4)
    assert fetch_mailbox.run("support") == 1
