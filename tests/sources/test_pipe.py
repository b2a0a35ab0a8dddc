"""The MTA pipe (`pipeline ingest --mailbox NAME -`): 75 while it cannot journal, so the MTA
keeps the mail and retries; 0 for the same mail once the outage is over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.store.db import Store
from tests.conftest import make_mail, run_cli
from tests.services import PrivateRedis
from tests.sources.conftest import journal_count, ticket_titles, write_config

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_the_pipe_exits_75_while_redis_is_down_and_0_for_the_same_mail_once_it_is_back(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store) -> None:
    server = PrivateRedis(tmp_path / "redis").start()
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, {"kind": "stdin"}, redis_url=server.url)
    mail = make_mail(subject="Backup job failed")
    try:
        server.stop()
        down = run_cli("--config", str(config.path), "ingest", "--mailbox", "support", "--json", "-", input=mail)
        assert down.returncode == 75
        assert down.stdout == b"" and "Redis" in down.stderr.decode()
        assert journal_count(store) == 0  # nothing half-taken: the MTA still holds the mail

        server.start()
        back = run_cli("--config", str(config.path), "ingest", "--mailbox", "support", "--json", "-", input=mail)
    finally:
        server.stop()
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["outcome"] == "ticket_created"
    assert journal_count(store) == 1
    assert ticket_titles(store) == ["Backup job failed"]
