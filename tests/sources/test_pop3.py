"""POP3 against a real Dovecot: journaled before deleted; a session lost before QUIT deletes
nothing and the next one journals nothing twice."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from pipeline.process import MailProcessor
from pipeline.sources import pop3
from pipeline.sources.base import PermanentSourceError
from pipeline.store.db import Store
from tests.conftest import journal_refusing, make_mail
from tests.sources.conftest import (
    journal_rows,
    outcomes,
    pop3_source,
    processing_sink,
    ticket_titles,
    write_config,
)
from tests.sources.dovecot import Dovecot

pytestmark = [pytest.mark.timeout(120), pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)]


def _mails(count: int) -> list[bytes]:
    return [make_mail(subject=f"VPN {i} drops", message_id=f"<vpn-{i}@acme.example>",
                      body="It drops every hour.\n" + "a" * 3000 + "\n")  # one line longer than poplib's 2,048
            for i in range(count)]


def test_pop3_mail_is_journaled_then_deleted_and_becomes_tickets(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, pop3_source(dovecot))
    dovecot.append("support", _mails(3))
    sink = processing_sink(MailProcessor(config, store, redis_client))

    assert pop3.fetch_once(config.mailbox("support"), config, store, sink) == 3

    assert dovecot.count("support", "INBOX") == 0
    assert outcomes(store) == {"ticket_created": 3}
    assert ticket_titles(store) == ["VPN 0 drops", "VPN 1 drops", "VPN 2 drops"]
    assert all(ref.startswith("pop3:support:") for ref, _ in journal_rows(store))


def test_a_pop3_session_lost_before_quit_deletes_nothing_and_the_next_journals_nothing_twice(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix,
                          pop3_source(dovecot, port=dovecot.pop3_port, security="starttls"))
    box = config.mailbox("support")
    dovecot.append("support", _mails(4))
    sink = processing_sink(MailProcessor(config, store, redis_client))

    conn = pop3.connect(box, config)
    assert pop3._fetch(conn, box, store, sink) == 4  # journaled and marked deleted …
    conn.close()  # … and the connection dies before QUIT
    assert dovecot.count("support", "INBOX") == 4

    assert pop3.fetch_once(box, config, store, sink) == 0  # nothing journaled twice
    assert dovecot.count("support", "INBOX") == 0
    assert len(journal_rows(store)) == 4
    assert outcomes(store) == {"ticket_created": 4}


def test_a_wrong_pop3_password_is_a_permanent_error_naming_the_user(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, pop3_source(dovecot))
    monkeypatch.setenv("MAILLOOP_TEST_SUPPORT_PASSWORD", "not-the-password")
    with pytest.raises(PermanentSourceError, match=r"POP3 127\.0\.0\.1:\d+: login as support refused: .*AUTH"):
        pop3.connect(config.mailbox("support"), config)


def test_a_pop3_mail_the_store_refuses_stays_on_the_server_and_the_others_go_on(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, pop3_source(dovecot, fetch_batch=3))
    mails = _mails(6)
    mails[1] = make_mail(subject="Refused by the store", message_id="<refused@acme.example>", body="REFUSE-ME\n")
    dovecot.append("support", mails)
    sink = processing_sink(MailProcessor(config, store, redis_client))
    with journal_refusing(store, "REFUSE-ME"):  # a real refusal: a policy trigger, as a DBA might install one
        first = pop3.fetch_once(config.mailbox("support"), config, store, sink)
        again = pop3.fetch_once(config.mailbox("support"), config, store, sink)

    assert (first, again) == (5, 0)  # both batches of three went on; the refused mail is tried again, alone
    assert dovecot.count("support", "INBOX") == 1
    assert outcomes(store) == {"ticket_created": 5}
    assert "Refused by the store" not in ticket_titles(store)
    # Once the store takes it, the next session journals and deletes it.
    assert pop3.fetch_once(config.mailbox("support"), config, store, sink) == 1
    assert dovecot.count("support", "INBOX") == 0
