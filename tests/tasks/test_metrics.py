"""Prometheus metrics from a real worker: scraped over HTTP, the counts match the journal."""

from __future__ import annotations

import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from pipeline.config import Config
from pipeline.store.db import Store
from pipeline.store.models import JournalEntry
from tests.services import WorkerProcess, free_port, private_redis, wait_until
from tests.conftest import fixture_bytes, make_mail
from tests.tasks.test_worker import _app, fleet_config  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(240)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def broker_url(tmp_path: Path):
    with private_redis(tmp_path / "broker") as url:
        yield url


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_scraped_counts_match_the_outcomes_in_the_journal(
        fleet_config: Config, broker_url: str, store: Store, tmp_path: Path) -> None:  # noqa: F811
    maildir = tmp_path / "maildir"
    mails = [make_mail(subject=f"Printer {i} offline", message_id=f"<p{i}@acme.example>") for i in range(4)]
    mails += [make_mail(subject="Disk full", message_id=f"<disk{i}@acme.example>") for i in range(3)]  # 3rd: loop
    mails += [mails[0], fixture_bytes("no_header_block.eml")]  # already processed; quarantined
    for i, raw in enumerate(mails):
        (maildir / "new" / f"17640000{i:02d}.M{i}P7.mx01").write_bytes(raw)

    port = free_port()
    worker = WorkerProcess(fleet_config.path, tmp_path / "worker.log",
                           env={"CELERY_BROKER_URL": broker_url, "PIPELINE_METRICS_PORT": str(port)}).start()
    app = _app(fleet_config, broker_url)
    try:
        wait_until(lambda: _up(port), 60, "the metrics endpoint did not come up")
        app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
        with store.sessions() as s:
            wait_until(lambda: s.scalar(select(func.count()).select_from(JournalEntry)
                                        .where(JournalEntry.outcome.is_not(None))) == len(mails), 60,
                       "not every mail reached an outcome")
            journal = Counter(dict(s.execute(select(JournalEntry.outcome, func.count())
                                             .group_by(JournalEntry.outcome)).all()))
        metrics = _scrape(port)
    finally:
        worker.stop()
        app.close()

    assert journal == Counter(ticket_created=5, note_added=1, discarded=1, already_processed=1, quarantined=1)
    scraped = Counter({dict(labels)["outcome"]: int(value) for (name, labels), value in metrics.items()
                       if name == "mailloop_mails_total" and dict(labels)["mailbox"] == "support"})
    assert scraped == journal
    assert metrics[("mailloop_loop_guard_discards_total", (("mailbox", "support"),))] == 1
    assert metrics[("mailloop_quarantine_size", ())] == 1
    assert metrics[("mailloop_journal_waiting", ())] == 0
    assert metrics[("mailloop_fetched_mails_total", (("mailbox", "support"),))] == len(mails)
    assert metrics[("mailloop_last_fetch_timestamp_seconds", (("mailbox", "support"),))] > 0
    assert metrics[("mailloop_mailbox_failing", (("mailbox", "support"),))] == 0
    assert metrics[("mailloop_queue_depth", (("queue", "process"),))] == 0
    # Every mail goes through parse (the unparseable one stops there); only mails that passed
    # every gate reach write.
    assert metrics[("mailloop_stage_seconds_count", (("stage", "parse"),))] == len(mails)
    assert metrics[("mailloop_stage_seconds_count", (("stage", "write"),))] == 6
    lag_count = metrics[("mailloop_journal_to_written_seconds_count", (("mailbox", "support"),))]
    assert lag_count == len(mails)


def _up(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read()
        return True
    except OSError:
        return False
