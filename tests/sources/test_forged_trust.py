"""D8 at every source: an Authentication-Results that came in with the mail, below the Received:
line of the outside host it passed through, never lets a mail speak as a technician. The same
commands under a verdict our own MX wrote apply, so each check can fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from pipeline.process import MailProcessor
from pipeline.sources import imap, pop3
from pipeline.sources.maildir import ensure_maildir, fetch_maildir
from pipeline.store.db import Store
from tests.conftest import run_cli
from tests.sources.conftest import (
    MX_PASS,
    forged_technician_mail,
    imap_source,
    pop3_source,
    processing_sink,
    technician_mail,
    what_the_commands_did,
    write_config,
)
from tests.sources.dovecot import Dovecot

pytestmark = pytest.mark.timeout(120)

MX_RECEIVED = ("Received: from laptop.msp.example (laptop.msp.example [10.0.0.5]) by mx.msp.example (Postfix) "
               "with ESMTPSA id 4A; Mon, 23 Nov 2026 09:29:59 +0000")
FORGED, GENUINE = "Printer fixed", "Server patched"


def both_mails() -> list[bytes]:
    """The forged mail, and the same commands as our MX would have passed them."""
    return [forged_technician_mail(FORGED), technician_mail([MX_PASS, MX_RECEIVED], GENUINE)]


def assert_only_the_genuine_mail_applied(store: Store) -> None:
    assert what_the_commands_did(store, FORGED) == ("New", [], True)
    assert what_the_commands_did(store, GENUINE) == ("Resolved", [8.0], False)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_imap(dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
              redis_client: redis.Redis) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, imap_source(dovecot))
    dovecot.append("support", both_mails())
    sink = processing_sink(MailProcessor(config, store, redis_client))
    assert imap.fetch_once(config.mailbox("support"), config, store, redis_client, sink).journaled == 2
    assert_only_the_genuine_mail_applied(store)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_pop3(dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
              redis_client: redis.Redis) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, pop3_source(dovecot))
    dovecot.append("support", both_mails())
    sink = processing_sink(MailProcessor(config, store, redis_client))
    assert pop3.fetch_once(config.mailbox("support"), config, store, sink) == 2
    assert_only_the_genuine_mail_applied(store)


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_maildir(tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client: redis.Redis) -> None:
    maildir = tmp_path / "Maildir"
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, {"kind": "maildir", "path": str(maildir)})
    ensure_maildir(maildir)
    for i, raw in enumerate(both_mails()):
        (maildir / "new" / f"1764000000.M{i}P7.mx01").write_bytes(raw)
    processor = MailProcessor(config, store, redis_client)
    fetch_maildir(maildir, "support", store, processor.journal_many, lambda ids: [processor.process(i) for i in ids])
    assert_only_the_genuine_mail_applied(store)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_mta_pipe(tmp_path: Path, db_url: str, key_prefix: str, store: Store) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, {"kind": "stdin"})
    for raw in both_mails():
        done = run_cli("--config", str(config.path), "ingest", "--mailbox", "support", "--json", "-", input=raw)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["outcome"] == "ticket_created"
    assert_only_the_genuine_mail_applied(store)
