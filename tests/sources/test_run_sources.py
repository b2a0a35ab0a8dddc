"""`pipeline run` with an IMAP IDLE mailbox and an SMTP listener: both are children of the
run, their mail becomes tickets through the Celery worker, SIGTERM stops them all."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from pipeline.store.db import Store
from tests.conftest import make_mail, run_cli
from tests.services import accepts, free_port, private_redis, wait_until
from tests.sources.conftest import imap_source, outcomes, ticket_titles, write_config
from tests.sources.dovecot import Dovecot
from tests.test_run import _processes_using

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_run_serves_an_idle_mailbox_and_an_smtp_listener_and_stops_them_on_sigterm(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis) -> None:
    port = free_port()
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, imap_source(dovecot),
                          billing={"kind": "smtp", "host": "127.0.0.1", "port": port, "security": "none"})
    dovecot.append("support", [make_mail(subject="Wi-Fi down in room 4", message_id="<wifi@acme.example>")])
    with private_redis(tmp_path / "broker") as broker:
        env = {**os.environ, "PIPELINE_CONFIG": str(config.path), "CELERY_BROKER_URL": broker}
        log = tmp_path / "run.log"
        run = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--concurrency", "1"], env=env,
                               stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        try:
            wait_until(lambda: outcomes(store)["ticket_created"] == 1, 60,
                       "the mail waiting in the IMAP folder did not become a ticket")
            wait_until(lambda: accepts(port), 30, "the SMTP listener did not come up")
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.sendmail("kim.lee@fabrikam.example", ["billing@msp.example"],
                              make_mail(from_="Kim Lee <kim.lee@fabrikam.example>", to="billing@msp.example",
                                        subject="Invoice 2211 twice").replace(b"\n", b"\r\n"))
            dovecot.append("support", [make_mail(subject="Printer jams again", message_id="<jam@acme.example>")])
            wait_until(lambda: outcomes(store)["ticket_created"] == 3, 60, "SMTP and IDLE mail did not arrive")

            status = run_cli("--config", str(config.path), "status", "--json", env={"CELERY_BROKER_URL": broker})
            boxes = {b["name"]: b for b in json.loads(status.stdout)["mailboxes"]}
            assert boxes["support"]["source"] == "imap" and boxes["support"]["last_fetch"] is not None
            assert boxes["support"]["failing"] is None

            run.send_signal(signal.SIGTERM)
            assert run.wait(90) == 0, log.read_text()
        finally:
            if run.poll() is None:
                run.kill()
        wait_until(lambda: not _processes_using(config.path), 30, "children outlived `pipeline run`")
    assert ticket_titles(store) == ["Invoice 2211 twice", "Printer jams again", "Wi-Fi down in room 4"]
    assert dovecot.count("support", "Processed") == 2
    assert not redis_client.exists(f"{key_prefix}lock:fetch:support")  # released for the next machine
    assert not accepts(port)

