"""Permanent trouble (a wrong password, an expired token) is reported once, clearly, and marks
only that mailbox failing in `pipeline status`; the other mailboxes go on."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import redis

import pipeline.tasks
from pipeline.process import MailProcessor
from pipeline.sources.idle import IdleFetcher
from pipeline.store.db import Store
from pipeline.tasks.fetch import fetch_mailbox
from tests.conftest import make_mail, run_cli
from tests.services import wait_until
from tests.sources.conftest import imap_source, outcomes, processing_sink, write_config
from tests.sources.dovecot import Dovecot

pytestmark = [pytest.mark.timeout(120), pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)]


def test_bad_credentials_are_reported_once_and_mark_only_that_mailbox_failing(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, imap_source(dovecot),
                          billing=imap_source(dovecot, "billing", idle=False))
    monkeypatch.setenv("MAILLOOP_TEST_BILLING_PASSWORD", "changed-by-someone")
    monkeypatch.setenv("PIPELINE_CONFIG", str(config.path))
    monkeypatch.setattr(pipeline.tasks, "_runtime", None)
    caplog.set_level(logging.INFO, logger="pipeline")
    dovecot.append("support", [make_mail(subject="Mouse dead")])

    # support: an IDLE fetcher that works; billing: polled by the fetch task, wrong password.
    stop = threading.Event()
    fetcher = IdleFetcher(config.mailbox("support"), config, store, redis_client,
                          processing_sink(MailProcessor(config, store, redis_client)), stop)
    thread = threading.Thread(target=fetcher.run, daemon=True)
    thread.start()
    try:
        assert fetch_mailbox.run("billing") == 0
        assert fetch_mailbox.run("billing") == 0  # the next scheduled turn
        wait_until(lambda: outcomes(store)["ticket_created"] == 1, 30, "support stopped with billing")
    finally:
        stop.set()
        thread.join(30)
        if pipeline.tasks._runtime is not None:
            pipeline.tasks._runtime.close()

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith("mailbox billing: IMAP 127.0.0.1:")
    assert "login as billing refused" in errors[0] and "AUTHENTICATIONFAILED" in errors[0]

    status = run_cli("--config", str(config.path), "status", "--json", env={"CELERY_BROKER_URL": "memory://"})
    boxes = {b["name"]: b for b in json.loads(status.stdout)["mailboxes"]}
    assert "login as billing refused" in boxes["billing"]["failing"]
    assert boxes["support"]["failing"] is None and boxes["support"]["last_fetch"]

    # Someone fixes the password: the next turn clears the mark.
    monkeypatch.setenv("MAILLOOP_TEST_BILLING_PASSWORD", "billing-secret")
    monkeypatch.setattr(pipeline.tasks, "_runtime", None)
    try:
        assert fetch_mailbox.run("billing") == 0  # its folder is empty: nothing to enqueue
    finally:
        pipeline.tasks._runtime.close()
    status = run_cli("--config", str(config.path), "status", "--json", env={"CELERY_BROKER_URL": "memory://"})
    boxes = {b["name"]: b for b in json.loads(status.stdout)["mailboxes"]}
    assert boxes["billing"]["failing"] is None and boxes["billing"]["last_fetch"]
