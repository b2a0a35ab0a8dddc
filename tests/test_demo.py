"""`pipeline demo`: the first command a new user runs (README), on the embedded defaults."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import REDIS_URL, run_cli


def test_demo_shows_tickets_and_notes_from_the_shipped_mail(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    proc = run_cli("demo", "--dir", str(run_dir), env={"REDIS_URL": REDIS_URL}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    for outcome in ("ticket_created", "note_added", "discarded", "already_processed", "quarantined"):
        assert outcome in out
    assert "Tickets" in out and "Acme Corp" in out
    # Every shipped mail left new/ for cur/ only after it was journaled.
    maildir = run_dir / "maildir"
    assert not any((maildir / "new").iterdir())
    assert len(list((maildir / "cur").iterdir())) == 9

    # What the table promised is in the store.
    shown = run_cli("--config", str(run_dir / "mailboxes.toml"), "tickets", "list", "--json",
                    env={"REDIS_URL": REDIS_URL})
    tickets = [json.loads(line) for line in shown.stdout.decode().splitlines()]
    assert len(tickets) == 6
    assert {t["status"] for t in tickets} <= {"New", "In Progress"}


def test_demo_without_redis_says_how_to_start_one_in_one_line(tmp_path: Path) -> None:
    proc = run_cli("demo", "--dir", str(tmp_path / "demo"), env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert proc.returncode == 75
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1, err
    assert "redis-server" in err and "REDIS_URL" in err
