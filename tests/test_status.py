"""`pipeline status`: mailboxes, queues, lag and quarantine, read from the journal, Redis and the broker."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

import pipeline.tasks
from pipeline.tasks.fetch import fetch_mailbox
from tests.conftest import REDIS_URL, fixture_bytes, make_mail, run_cli


def _status(config) -> dict:
    proc = run_cli("--config", str(config.path), "status", "--json", env={"REDIS_URL": REDIS_URL})
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def test_status_counts_outcomes_quarantine_and_lag_per_mailbox(processor, config) -> None:
    processor.ingest("support", make_mail(subject="Wi-Fi down"))
    processor.ingest("support", fixture_bytes("no_header_block.eml"))
    processor.ingest("billing", make_mail(subject="Invoice 4711 wrong", to="billing@msp.example"))
    processor.journal("support", make_mail(subject="still waiting"))  # journaled, not yet processed

    st = _status(config)
    boxes = {b["name"]: b for b in st["mailboxes"]}
    assert boxes["support"]["outcomes"] == {"ticket_created": 1, "quarantined": 1}
    assert boxes["support"]["waiting"] == 1
    assert boxes["billing"]["outcomes"] == {"ticket_created": 1}
    assert st["quarantine"] == 1 and st["waiting"] == 1
    assert st["lag_samples"] == 3 and 0 <= st["lag_p50_seconds"] <= st["lag_p99_seconds"] < 60
    assert set(st["queues"]) == {"fetch", "process", "notify", "maintenance"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_mailbox_whose_maildir_cannot_be_read_is_marked_failing_until_a_fetch_succeeds(
        make_config, store, tmp_path, monkeypatch) -> None:
    maildir = tmp_path / "maildir"
    config = make_config(source=f'{{ kind = "maildir", path = "{maildir}" }}')
    monkeypatch.setenv("PIPELINE_CONFIG", str(config.path))
    monkeypatch.setattr(pipeline.tasks, "_runtime", None)
    maildir.write_text("a file where the Maildir should be")

    assert fetch_mailbox.run("support") == 0
    support = next(b for b in _status(config)["mailboxes"] if b["name"] == "support")
    assert support["failing"].startswith(("FileExistsError", "NotADirectoryError"))

    maildir.unlink()
    assert fetch_mailbox.run("support") == 0  # an empty Maildir, created
    support = next(b for b in _status(config)["mailboxes"] if b["name"] == "support")
    assert support["failing"] is None
    assert datetime.fromisoformat(support["last_fetch"]) <= datetime.now(timezone.utc)
    pipeline.tasks._runtime.close()
