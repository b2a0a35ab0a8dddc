"""Quarantine (D1): a mail that fails is kept with its stage and error, listed, shown and replayed."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from sqlalchemy import func, select

from pipeline.config import Config
from pipeline.process import MailProcessor
from pipeline.stages import Resolve
from pipeline.store.models import JournalEntry, Ticket
from tests.conftest import REDIS_URL, fixture_bytes, make_mail, run_cli

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)


def _poison(processor: MailProcessor, monkeypatch) -> int:
    """Quarantine one mail by a bug in a stage; the bug is fixed again when this returns."""
    def broken(self, ctx, env):
        raise KeyError("account_manager")

    monkeypatch.setattr(Resolve, "__call__", broken)
    result = processor.ingest("support", make_mail(subject="Scanner offline"), received_at=T0)
    monkeypatch.undo()
    assert result.outcome == "quarantined"
    return result.journal_id


def _cli(config: Config, *args: str):
    return run_cli("--config", str(config.path), *args, env={"REDIS_URL": REDIS_URL})


def test_quarantine_list_and_show_name_the_stage_and_the_error(processor, config, monkeypatch) -> None:
    bad = _poison(processor, monkeypatch)
    processor.ingest("support", make_mail(subject="Monitor flickers"), received_at=T0)

    listed = [json.loads(line) for line in _cli(config, "quarantine", "list", "--json").stdout.splitlines()]
    assert [(r["id"], r["stage"], r["subject"]) for r in listed] == [(bad, "resolve", "Scanner offline")]
    assert listed[0]["reason"] == "stage resolve failed: KeyError: 'account_manager'"

    shown = json.loads(_cli(config, "quarantine", "show", "--json", str(bad)).stdout)
    assert "KeyError: 'account_manager'" in shown["error"]
    assert [s["stage"] for s in shown["trace"]][-1] == "resolve"


def test_a_replayed_mail_is_processed_once_the_cause_is_fixed_and_a_second_replay_does_nothing(
        processor, config, store, monkeypatch) -> None:
    bad = _poison(processor, monkeypatch)

    first = _cli(config, "quarantine", "replay", "--json", str(bad))
    assert first.returncode == 0, first.stderr.decode()
    assert json.loads(first.stdout)["outcome"] == "ticket_created"

    again = _cli(config, "quarantine", "replay", "--json", str(bad))
    assert again.returncode == 1
    assert f"mail #{bad} is not in quarantine" in again.stderr.decode()
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 1
        assert s.get(JournalEntry, bad).outcome == "ticket_created"
    assert _cli(config, "quarantine", "list", "--json").stdout == b""


def test_an_unparseable_mail_replayed_stays_in_quarantine(processor, config) -> None:
    result = processor.ingest("support", fixture_bytes("no_header_block.eml"), received_at=T0)
    assert result.outcome == "quarantined"
    replayed = processor.replay(result.journal_id)
    assert replayed is not None and replayed.outcome == "quarantined"
    assert processor.replay(processor.ingest("support", make_mail()).journal_id) is None  # not quarantined


def test_quarantine_show_of_an_unknown_id_fails_in_one_line(config, store) -> None:
    proc = _cli(config, "quarantine", "show", "999999")
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == "pipeline: error: no journaled mail #999999"
