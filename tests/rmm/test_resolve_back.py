"""Resolving back (issue 9): a completed alert ticket tells its RMM, over real HTTP, on SQLite and PostgreSQL.

The RMM is a real HTTP server on loopback (stdlib http.server in a thread) that records every
request and answers from a script of status codes; nothing about HTTP is mocked. Mails go
through the real processor, calls through `pipeline.resolve_back` as the task makes them, and
at the end through a real Celery worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

from pipeline.config import Config
from pipeline.process import MailProcessor
from pipeline.resolve_back.call import Report, deliver
from pipeline.resolve_back.outbox import due
from pipeline.store.db import Store
from pipeline.store.models import ResolveBackCall
from pipeline.store.queries import show_ticket
from tests.conftest import config_text, make_mail, run_cli
from tests.services import free_port, wait_until

FIXTURES = Path(__file__).parent.parent / "fixtures" / "rmm"
STAGES = '["ticket_number", "reply_reference", "datto_rmm", "kaseya_vsa", "nable", "ninjaone", "cw_automate"]'
T0 = datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc)
AR_PASS = ("Authentication-Results: mx.msp.example; dkim=pass header.d=msp.example header.s=sel1; "
           "spf=pass smtp.mailfrom=msp.example; dmarc=pass header.from=msp.example")
TOKEN_VAR = "MAILLOOP_TEST_DATTO_TOKEN"
ALERT_UID = "7c3e1f0a-9b2d-4e85-a6c4-1d0f3b5e7a92"

# A third mailbox, "alerts", after the shared test configuration's two; it resolves Datto alerts back.
ALERTS_MAILBOX = """
[[mailbox]]
name = "alerts"
address = "alerts@msp.example"
parser_stages = STAGES

[mailbox.trust]
authserv_ids = ["mx.msp.example"]
require = "dmarc"

[mailbox.resolve_back.datto_rmm]
url = "http://127.0.0.1:PORT/api/v2/alert/{{ alert.alert_id }}/resolve?ticket={{ ticket.number }}"
method = "post"
body = '''{"ticket": {{ ticket.number|tojson }}, "resolution": {{ ticket.resolution|tojson }}, \
"device": {{ alert.device|tojson }}, "site": {{ alert.site|tojson }}, "severity": {{ alert.severity|tojson }}}'''
headers = { Authorization = "Bearer {{ secrets.token }}", "Content-Type" = "application/json" }
secrets_env = { token = "MAILLOOP_TEST_DATTO_TOKEN" }
EXTRA
"""


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: str


class RmmServer:
    """A real HTTP server on loopback: records every request, answers the scripted statuses, then 200."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.seen: list[Seen] = []
        self.script: list[int | str] = []  # a status, or "slow": answer 200 after 2 s
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    def start(self) -> "RmmServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                with server._lock:
                    server.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                            body))
                    status = server.script.pop(0) if server.script else 200
                if status == "slow":
                    time.sleep(2)
                    status = 200
                payload = json.dumps({"status": status}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_POST = do_PUT = do_PATCH = do_GET = do_DELETE = answer

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


@pytest.fixture
def rmm_server() -> Iterator[RmmServer]:
    server = RmmServer().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_VAR, "s3cret-token")


def alerts_mailbox(port: int, extra: str = "") -> str:
    return ALERTS_MAILBOX.replace("STAGES", STAGES).replace("PORT", str(port)).replace("EXTRA", extra)


@pytest.fixture
def make_rb_config(make_config):
    def make(port: int, extra: str = "") -> Config:
        return make_config(extra_mailbox=alerts_mailbox(port, extra), parser_stages=STAGES)

    return make


def processor_for(config: Config, store: Store, redis_client) -> MailProcessor:
    return MailProcessor(config, store, redis_client)


def alert(processor: MailProcessor, mailbox: str = "alerts") -> str:
    raw = (FIXTURES / "datto_alert.eml").read_bytes().replace(b"To: support@msp.example", f"To: {mailbox}@msp.example".encode())
    result = processor.ingest(mailbox, raw, received_at=T0)
    assert result.outcome == "ticket_created", result.trace
    return result.entity["number"]


def technician_resolves(processor: MailProcessor, number: str, mailbox: str = "alerts",
                        at: datetime = T0 + timedelta(hours=1)):
    raw = make_mail(from_="Tom Tech <tom@msp.example>", to=f"{mailbox}@msp.example",
                    subject=f"RE: [Ticket#{number}] Alert: Disk Usage Monitor - ACME-SRV01",
                    body="#resolve\nFreed 20 GB on C: (old IIS logs).\n", top_headers=[AR_PASS])
    result = processor.ingest(mailbox, raw, received_at=at)
    assert result.outcome == "note_added", result.trace
    return result


def calls(store: Store) -> list[ResolveBackCall]:
    with store.sessions() as s:
        return list(s.scalars(select(ResolveBackCall).order_by(ResolveBackCall.id)))


def run(store: Store, config: Config, now: datetime | None = None) -> Report:
    """What the task does with the rows a commit handed it: every pending row, one batch."""
    return deliver(store, config, [c.id for c in calls(store) if c.status == "pending"], now=now)


def sweep_ids(store: Store, now: datetime) -> list[int]:
    with store.sessions() as s:
        return due(s, now)


def timeline(store: Store, number: str) -> list[dict]:
    with store.sessions() as s:
        return show_ticket(s, number)["timeline"]


# -- when a row is written ------------------------------------------------------------------------

def test_a_technician_completing_an_alert_ticket_makes_exactly_one_call_with_the_rendered_request(
        make_rb_config, store, redis_client, rmm_server: RmmServer) -> None:
    config = make_rb_config(rmm_server.port)
    processor = processor_for(config, store, redis_client)
    number = alert(processor)
    assert calls(store) == []  # an open alert tells the RMM nothing

    result = technician_resolves(processor, number)

    (row,) = calls(store)
    # Written in the transaction of the mail that resolved the ticket.
    assert (row.status, row.vendor, row.journal_id, row.attempts) == ("pending", "datto_rmm", result.journal_id, 0)
    report = run(store, config)
    assert report.done == [row.id]

    (seen,) = rmm_server.seen
    assert seen.method == "POST"
    assert seen.path == f"/api/v2/alert/{ALERT_UID}/resolve?ticket={number}"
    assert seen.headers["authorization"] == "Bearer s3cret-token"  # the secret, from the environment
    assert seen.headers["content-type"] == "application/json"
    assert json.loads(seen.body) == {"ticket": number, "resolution": "responded to customer",
                                     "device": "ACME-SRV01", "site": "Acme Corp", "severity": "High"}
    (row,) = calls(store)
    assert (row.status, row.response_status, row.attempts, row.last_error) == ("done", 200, 1, None)
    assert "s3cret" not in json.dumps(row.ticket_values)  # secrets are never stored
    assert timeline(store, number)[-1]["what"] == "resolved back to datto_rmm"

    # Exactly once: neither the sweep nor a second task with the same ids calls again.
    assert sweep_ids(store, datetime.now(timezone.utc) + timedelta(days=1)) == []
    assert run(store, config).done == [] and deliver(store, config, [row.id]).skipped == [row.id]
    assert len(rmm_server.seen) == 1


def test_an_alert_and_its_resolution_in_one_batch_make_the_call_for_that_alert(
        make_rb_config, store, redis_client, rmm_server: RmmServer) -> None:
    # The alert's trace is on its journal row only once the batch commits: the call must still find it.
    config = make_rb_config(rmm_server.port)
    processor = processor_for(config, store, redis_client)
    number = datetime.now(timezone.utc).strftime("T%Y%m%d.0001")
    raw = (FIXTURES / "datto_alert.eml").read_bytes().replace(b"To: support@msp.example", b"To: alerts@msp.example")
    resolution = make_mail(from_="Tom Tech <tom@msp.example>", to="alerts@msp.example",
                           subject=f"RE: [Ticket#{number}] Alert: Disk Usage Monitor - ACME-SRV01",
                           body="#resolve\nFreed 20 GB on C: (old IIS logs).\n", top_headers=[AR_PASS])
    ids = [processor.journal("alerts", raw, received_at=T0),
           processor.journal("alerts", resolution, received_at=T0 + timedelta(hours=1))]

    results = processor.process_many(ids)

    assert [(r.outcome, r.entity["number"]) for r in results] == [("ticket_created", number), ("note_added", number)]
    (row,) = calls(store)
    assert row.alert_journal_id == ids[0]
    assert run(store, config).done == [row.id]
    (seen,) = rmm_server.seen
    assert seen.path == f"/api/v2/alert/{ALERT_UID}/resolve?ticket={number}"


def test_the_monitors_own_recovery_makes_no_call(make_rb_config, store, redis_client, rmm_server) -> None:
    config = make_rb_config(rmm_server.port)
    processor = processor_for(config, store, redis_client)
    number = alert(processor)
    raw = (FIXTURES / "datto_recovery.eml").read_bytes().replace(b"To: support@", b"To: alerts@")
    assert processor.ingest("alerts", raw, received_at=T0 + timedelta(minutes=20)).outcome == "note_added"
    with store.sessions() as s:
        assert show_ticket(s, number)["status"] == "Resolved"
    assert calls(store) == [] and sweep_ids(store, T0 + timedelta(days=30)) == []
    assert rmm_server.seen == []


def test_a_mailbox_without_resolve_back_writes_no_row(make_rb_config, store, redis_client, rmm_server) -> None:
    config = make_rb_config(rmm_server.port)  # "alerts" has a table; "support" has none
    processor = processor_for(config, store, redis_client)
    number = alert(processor, mailbox="support")
    technician_resolves(processor, number, mailbox="support")
    with store.sessions() as s:
        assert show_ticket(s, number)["status"] == "Resolved"
    assert calls(store) == [] and rmm_server.seen == []


def test_closing_an_already_resolved_ticket_calls_no_second_time(make_rb_config, store, redis_client,
                                                                 rmm_server) -> None:
    from pipeline.lifecycle import run_scheduled_transitions

    config = make_rb_config(rmm_server.port)
    processor = processor_for(config, store, redis_client)
    number = alert(processor)
    technician_resolves(processor, number)
    with store.transaction() as s:  # the feedback window ends: Resolved → Closed by the clock
        assert run_scheduled_transitions(s, config, T0 + timedelta(days=10))["feedback_window_ended"] == 1
    assert len(calls(store)) == 1


# -- what an answer does --------------------------------------------------------------------------

def test_a_server_error_twice_then_ok_is_delivered_once_after_retries(make_rb_config, store, redis_client,
                                                                      rmm_server) -> None:
    config = make_rb_config(rmm_server.port)
    processor = processor_for(config, store, redis_client)
    technician_resolves(processor, alert(processor))
    rmm_server.script = [500, 503]
    now = datetime.now(timezone.utc)

    first = run(store, config, now)
    (row,) = calls(store)
    assert first.retry == [row.id] and row.status == "pending" and row.response_status == 500
    assert row.last_error.startswith("HTTP 500")
    # Backoff: not due at once, due after it (30 s after the first failure, 60 s after the second).
    assert sweep_ids(store, now + timedelta(seconds=5)) == []
    assert sweep_ids(store, now + timedelta(seconds=31)) == [row.id]
    assert run(store, config, now + timedelta(seconds=31)).retry == [row.id]
    assert sweep_ids(store, now + timedelta(seconds=80)) == []
    assert run(store, config, now + timedelta(seconds=92)).done == [row.id]

    (row,) = calls(store)
    assert (row.status, row.attempts, row.response_status) == ("done", 3, 200)
    assert [s.path for s in rmm_server.seen] == [rmm_server.seen[0].path] * 3
    assert sweep_ids(store, now + timedelta(days=1)) == []


def test_a_404_fails_at_once_without_retry_and_the_reason_is_on_the_timeline(make_rb_config, store, redis_client,
                                                                             rmm_server) -> None:
    config = make_rb_config(rmm_server.port)
    processor = processor_for(config, store, redis_client)
    number = alert(processor)
    technician_resolves(processor, number)
    rmm_server.script = [404]

    report = run(store, config)

    (row,) = calls(store)
    assert report.failed == [row.id] and report.retry == []
    assert (row.status, row.attempts, row.response_status) == ("failed", 1, 404)
    assert row.last_error.startswith("HTTP 404 Not Found")
    last = timeline(store, number)[-1]
    assert last["what"] == "resolving back to datto_rmm failed" and last["to"].startswith("HTTP 404")
    assert sweep_ids(store, datetime.now(timezone.utc) + timedelta(days=1)) == []
    assert len(rmm_server.seen) == 1


@pytest.mark.parametrize("status", [408, 429])
def test_408_and_429_are_retried(make_rb_config, store, redis_client, rmm_server, status: int) -> None:
    config = make_rb_config(rmm_server.port)
    processor = processor_for(config, store, redis_client)
    technician_resolves(processor, alert(processor))
    rmm_server.script = [status]
    assert len(run(store, config).retry) == 1
    assert len(run(store, config).done) == 1


def test_with_the_rmm_down_the_call_waits_and_the_sweep_delivers_it_once_it_is_up(
        make_rb_config, store, redis_client) -> None:
    server = RmmServer()  # its port, with nothing listening yet: connection refused
    config = make_rb_config(server.port)
    processor = processor_for(config, store, redis_client)
    technician_resolves(processor, alert(processor))
    now = datetime.now(timezone.utc)

    assert len(run(store, config, now).retry) == 1
    (row,) = calls(store)
    assert row.status == "pending" and "ConnectError" in row.last_error and row.response_status is None

    server.start()
    try:
        later = now + timedelta(minutes=5)
        ids = sweep_ids(store, later)  # what beat's sweep hands to a call task
        assert ids == [row.id]
        assert deliver(store, config, ids, now=later).done == [row.id]
    finally:
        server.stop()
    (row,) = calls(store)
    assert (row.status, row.attempts) == ("done", 2) and len(server.seen) == 1


def test_an_rmm_that_does_not_answer_in_time_is_retried_and_not_asked_again_in_the_same_batch(
        make_rb_config, store, redis_client, rmm_server) -> None:
    config = make_rb_config(rmm_server.port, extra="timeout_seconds = 0.5")
    processor = processor_for(config, store, redis_client)
    raw = (FIXTURES / "datto_alert.eml").read_bytes().replace(b"To: support@", b"To: alerts@")
    for device in (b"ACME-SRV01", b"ACME-SRV02"):
        number = processor.ingest("alerts", raw.replace(b"ACME-SRV01", device), received_at=T0).entity["number"]
        technician_resolves(processor, number)
    rmm_server.script = ["slow"]

    first = run(store, config)

    assert len(first.retry) == 2 and len(rmm_server.seen) == 1  # the second was not tried
    timed_out, not_tried = calls(store)
    assert "Timeout" in timed_out.last_error and not_tried.last_error.startswith("not tried: datto_rmm did not answer")
    assert len(run(store, config).done) == 2


def test_out_of_attempts_the_call_fails_with_the_reason(make_rb_config, store, redis_client, rmm_server) -> None:
    config = make_rb_config(rmm_server.port, extra="max_attempts = 2")
    processor = processor_for(config, store, redis_client)
    number = alert(processor)
    technician_resolves(processor, number)
    rmm_server.script = [502, 502, 502]
    assert len(run(store, config).retry) == 1
    assert len(run(store, config).failed) == 1
    (row,) = calls(store)
    assert row.status == "failed" and row.last_error.startswith("gave up after 2 attempts: HTTP 502")
    assert timeline(store, number)[-1]["to"].startswith("gave up after 2 attempts")
    assert len(rmm_server.seen) == 2


def test_a_template_that_prints_an_unknown_value_fails_the_row_instead_of_calling(
        make_rb_config, store, redis_client, rmm_server) -> None:
    # Datto's alert mail has an alert UID; NinjaOne's fixture has none: its URL cannot be made.
    extra = """
[mailbox.resolve_back.ninjaone]
url = "http://127.0.0.1:PORT/v2/alert/{{ alert.alert_id }}/reset"
""".replace("PORT", str(rmm_server.port))
    config = make_rb_config(rmm_server.port, extra=extra)
    processor = processor_for(config, store, redis_client)
    raw = (FIXTURES / "ninjaone_alert.eml").read_bytes().replace(b"To: support@", b"To: alerts@")
    number = processor.ingest("alerts", raw, received_at=T0).entity["number"]
    technician_resolves(processor, number)
    assert len(run(store, config).failed) == 1
    (row,) = calls(store)
    assert row.status == "failed" and "url" in row.last_error and "none" in row.last_error
    assert rmm_server.seen == []


# -- check-config ---------------------------------------------------------------------------------

def write_config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "mailboxes.toml"
    path.write_text(config_text(f"sqlite:///{tmp_path / 'x.db'}", "rb-test:", alerts_mailbox(8080, extra)),
                    encoding="utf-8")
    return path


def test_check_config_accepts_a_good_table(tmp_path: Path) -> None:
    proc = run_cli("check-config", str(write_config(tmp_path, "")), env={TOKEN_VAR: "x"})
    assert proc.returncode == 0, proc.stderr


def test_check_config_names_an_unset_secret_variable_with_file_line_and_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "")
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VAR}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "check-config", str(path)], capture_output=True,
                          env=env, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("secrets_env"))
    assert lines == [f"pipeline: error: {path}:{line}: mailbox[2].resolve_back.datto_rmm.secrets_env.token: "
                     f"environment variable {TOKEN_VAR} is not set here (needed where the notify task runs)"]


@pytest.mark.parametrize("table, key, words", [
    ('url = "http://rmm.example/{{ ticket.number"', "url", "syntax error"),
    ('url = "http://rmm.example/{{ tiket.number }}"', "url", "unknown variable 'tiket'"),
    ('url = "http://rmm.example/{{ secrets.tokn }}"', "url", "does not render"),
    ('url = "rmm.example/{{ ticket.number }}"', "url", "does not render to an http(s) URL"),
    ('url = "http://rmm.example/"\nbody = "{% if %}"', "body", "syntax error"),
])
def test_check_config_refuses_a_broken_template_in_one_line_naming_file_line_and_key(
        tmp_path: Path, table: str, key: str, words: str) -> None:
    path = tmp_path / "mailboxes.toml"
    box = f"""
[[mailbox]]
name = "alerts"
address = "alerts@msp.example"
parser_stages = {STAGES}
[mailbox.resolve_back.datto_rmm]
{table}
secrets_env = {{ token = "{TOKEN_VAR}" }}
"""
    path.write_text(config_text(f"sqlite:///{tmp_path / 'x.db'}", "rb-test:", box), encoding="utf-8")
    proc = run_cli("check-config", str(path), env={TOKEN_VAR: "x"})
    assert proc.returncode == 1
    (line,) = proc.stderr.decode().strip().splitlines()
    first = key.split(".")[0]
    number = max(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith(first + " ="))
    assert line.startswith(f"pipeline: error: {path}:{number}: mailbox[2].resolve_back.datto_rmm.{key}: ")
    assert words in line


def test_check_config_refuses_a_table_for_a_stage_the_mailbox_does_not_run(tmp_path: Path) -> None:
    path = tmp_path / "mailboxes.toml"
    box = '\n[mailbox.resolve_back.ninjaone]\nurl = "http://rmm.example/x"\n'  # lands in "billing"
    path.write_text(config_text(f"sqlite:///{tmp_path / 'x.db'}", "rb-test:", box), encoding="utf-8")
    proc = run_cli("check-config", str(path))
    assert proc.returncode == 1
    assert "mailbox[1].resolve_back.ninjaone: the mailbox runs no RMM parser stage named 'ninjaone'" in \
        proc.stderr.decode()


# -- through a real Celery worker -----------------------------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_real_worker_calls_after_commit_retries_a_failing_rmm_and_its_sweep_takes_rows_left_behind(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client, rmm_server: RmmServer) -> None:
    from pipeline.config import parse_config
    from pipeline.tasks.app import create_app
    from tests.services import WorkerProcess, private_redis

    path = tmp_path / "fleet.toml"
    path.write_text(config_text(db_url, key_prefix, alerts_mailbox(rmm_server.port), parser_stages=STAGES),
                    encoding="utf-8")
    config = parse_config(path.read_text(encoding="utf-8"), path)
    processor = processor_for(config, store, redis_client)
    raw_alert = (FIXTURES / "datto_alert.eml").read_bytes().replace(b"To: support@", b"To: alerts@")
    rmm_server.script = [500, 500]  # the RMM fails twice, then takes the call
    with private_redis(tmp_path / "broker") as broker:
        worker = WorkerProcess(path, tmp_path / "worker.log",
                               env={"CELERY_BROKER_URL": broker, TOKEN_VAR: "s3cret-token"}).start()
        app = create_app(config)
        app.conf.broker_url = broker
        try:
            # Processed by the worker: the call is enqueued after the mail's commit, no sweep needed.
            app.send_task("pipeline.tasks.process.process_batch", args=[[processor.journal("alerts", raw_alert, T0)]])
            wait_until(lambda: len(_numbers(store)) == 1, 60, "the alert did not open a ticket")
            (number,) = _numbers(store)
            tech = make_mail(from_="Tom Tech <tom@msp.example>", to="alerts@msp.example",
                             subject=f"RE: [Ticket#{number}] Disk", body="#resolve\nCleaned up.\n",
                             top_headers=[AR_PASS])
            app.send_task("pipeline.tasks.process.process_batch",
                          args=[[processor.journal("alerts", tech, T0 + timedelta(hours=1))]])
            wait_until(lambda: [c.status for c in calls(store)] == ["done"], 90, "the call was not made")
            assert len(rmm_server.seen) == 3 and calls(store)[0].attempts == 3

            # Written outside a worker (`pipeline ingest`): nothing enqueued it; beat's sweep does.
            other = raw_alert.replace(b"ACME-SRV01", b"ACME-SRV02")
            second = processor.ingest("alerts", other, received_at=T0).entity["number"]
            technician_resolves(processor, second)
            assert [c.status for c in calls(store)] == ["done", "pending"]
            later = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
            app.send_task("pipeline.tasks.resolve_back.sweep", kwargs={"now": later})
            wait_until(lambda: [c.status for c in calls(store)] == ["done", "done"], 60, "the sweep did not call")
        finally:
            worker.stop()
            app.close()
    assert len(rmm_server.seen) == 4
    assert "ACME-SRV02" in rmm_server.seen[-1].body
    log = worker.log()
    assert "Task pipeline.tasks.resolve_back.call_rmm" in log and "Retry in" in log


def _numbers(store: Store) -> list[str]:
    from pipeline.store.models import Ticket

    with store.sessions() as s:
        return list(s.scalars(select(Ticket.number).order_by(Ticket.id)))
