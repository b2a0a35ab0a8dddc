"""IMAP against a real Dovecot: mail becomes tickets, is moved only after the journal write,
survives a server restart mid-fetch, arrives by IDLE within seconds, logs in by XOAUTH2."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from imapclient.exceptions import IMAPClientError

from pipeline.process import MailProcessor
from pipeline.sources.base import PermanentSourceError, Sink
from pipeline.sources.idle import IdleFetcher
from pipeline.sources.imap import ImapState, connect, fetch_once, fetch_pass, logout
from pipeline.status import last_fetch_key
from pipeline.store.db import Store
from tests.conftest import journal_inserts, journal_refusing, make_mail
from tests.services import wait_until
from tests.sources.conftest import (
    TOKEN,
    imap_source,
    journal_count,
    journal_rows,
    outcomes,
    processing_sink,
    ticket_titles,
    write_config,
)
from tests.sources.dovecot import Dovecot

pytestmark = [pytest.mark.timeout(180), pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)]


def _mails(count: int, prefix: str = "Laptop", body_bytes: int = 0) -> list[bytes]:
    return [make_mail(subject=f"{prefix} {i:03d} will not boot", message_id=f"<{prefix.lower()}-{i:03d}@acme.example>",
                      body=f"Laptop {i} shows a black screen.\n" + "x" * body_bytes + "\n")
            for i in range(count)]


def _processor(config, store: Store, redis_client: redis.Redis) -> MailProcessor:
    return MailProcessor(config, store, redis_client)


def test_appended_mails_become_tickets_and_end_in_the_processed_folder(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, imap_source(dovecot))
    dovecot.append("support", _mails(5))
    processor = _processor(config, store, redis_client)

    result = fetch_once(config.mailbox("support"), config, store, redis_client, processing_sink(processor))

    assert (result.journaled, result.finished, result.failed) == (5, 5, 0)
    assert outcomes(store) == {"ticket_created": 5}
    assert ticket_titles(store) == [f"Laptop {i:03d} will not boot" for i in range(5)]
    assert dovecot.count("support", "INBOX") == 0
    assert dovecot.message_ids("support", "Processed") == [f"<laptop-{i:03d}@acme.example>" for i in range(5)]
    refs = [ref for ref, _ in journal_rows(store)]
    assert all(ref.startswith("imap:support:") for ref in refs) and len(set(refs)) == 5

    # A second pass finds nothing new and journals nothing twice.
    again = fetch_once(config.mailbox("support"), config, store, redis_client, processing_sink(processor))
    assert (again.journaled, again.finished) == (0, 0)
    assert len(journal_rows(store)) == 5


def test_a_mail_that_cannot_be_fetched_goes_to_the_failed_folder_and_the_rest_go_on(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix,
                          imap_source(dovecot, max_message_bytes=4096))
    small = _mails(3)
    huge = make_mail(subject="Scan of the whole contract", message_id="<huge@acme.example>", body="y" * 20000)
    dovecot.append("support", [small[0], huge, small[1], small[2]])
    processor = _processor(config, store, redis_client)

    result = fetch_once(config.mailbox("support"), config, store, redis_client, processing_sink(processor))

    assert (result.journaled, result.failed) == (3, 1)
    assert dovecot.message_ids("support", "Failed") == ["<huge@acme.example>"]
    assert len(dovecot.message_ids("support", "Processed")) == 3
    assert dovecot.count("support", "INBOX") == 0
    assert outcomes(store) == {"ticket_created": 3}


def test_a_fetched_batch_is_journaled_in_one_statement(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, imap_source(dovecot))
    dovecot.append("support", _mails(12))
    processor = _processor(config, store, redis_client)
    with journal_inserts(store) as inserts:
        result = fetch_once(config.mailbox("support"), config, store, redis_client,
                            Sink(processor.journal, lambda ids: None, journal_many=processor.journal_many))
    assert (result.journaled, result.finished) == (12, 12)
    assert len(inserts) == 1  # one commit for the batch, not one per mail
    assert [ref.rsplit(":", 1)[1] for ref, _ in journal_rows(store)] == [str(uid) for uid in range(1, 13)]


def test_a_mail_the_store_refuses_goes_to_the_failed_folder_and_the_rest_of_its_batch_go_on(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, imap_source(dovecot))
    mails = _mails(4)
    mails[1] = make_mail(subject="Refused by the store", message_id="<refused@acme.example>", body="REFUSE-ME\n")
    dovecot.append("support", mails)
    processor = _processor(config, store, redis_client)

    # A real refusal: a policy trigger, as a DBA might install one.
    with journal_refusing(store, "REFUSE-ME"), caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        result = fetch_once(config.mailbox("support"), config, store, redis_client, processing_sink(processor))

    assert (result.journaled, result.finished, result.failed) == (3, 3, 1)
    assert dovecot.message_ids("support", "Failed") == ["<refused@acme.example>"]
    assert dovecot.message_ids("support", "Processed") == ["<laptop-000@acme.example>", "<laptop-002@acme.example>",
                                                          "<laptop-003@acme.example>"]
    assert outcomes(store) == {"ticket_created": 3}
    assert any("refused" in r.getMessage() and "one by one" in r.getMessage() for r in caplog.records)
    assert any("could not be journaled" in r.getMessage() and "refused by policy" in r.getMessage()
               for r in caplog.records)


def test_a_uid_the_last_uid_skipped_is_found_by_the_periodic_reconciliation(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis) -> None:
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix,
                          imap_source(dovecot, processed="flag", reconcile_seconds=60))
    box = config.mailbox("support")
    dovecot.append("support", _mails(3))
    processor = _processor(config, store, redis_client)
    state = ImapState(redis_client, config, "support")
    imap = connect(box, config)
    try:
        uidvalidity = imap.select_folder("INBOX")[b"UIDVALIDITY"]
        # Redis believes every UID up to 3 was handled and the folder was just scanned — as
        # after a lost write or a UID that became visible late. The normal pass trusts it…
        state.save(uidvalidity, 3, scanned_at=1000.0)
        assert fetch_pass(imap, box, store, state, processing_sink(processor), now=1010.0).journaled == 0
        # … the reconciliation, due after reconcile_seconds, does not.
        found = fetch_pass(imap, box, store, state, processing_sink(processor), now=1061.0)
        assert found.full_scan and found.journaled == 3
        # Flag mode: the mail stays in the folder, flagged, and is not taken again.
        assert dovecot.count("support", "INBOX") == 3
        assert fetch_pass(imap, box, store, state, processing_sink(processor), now=1200.0).journaled == 0
        dovecot.append("support", _mails(1, prefix="Printer"))
        assert fetch_pass(imap, box, store, state, processing_sink(processor), now=1201.0).journaled == 1
    finally:
        logout(imap)
    assert outcomes(store) == {"ticket_created": 4}
    assert len({ref for ref, _ in journal_rows(store)}) == 4


def _start_fetcher(config, store: Store, redis_client: redis.Redis, sink: Sink, name: str = "support"):
    stop = threading.Event()
    fetcher = IdleFetcher(config.mailbox(name), config, store, redis_client, sink, stop)
    thread = threading.Thread(target=fetcher.run, daemon=True)
    thread.start()
    return stop, thread


def test_a_server_crash_and_restart_in_the_middle_of_a_fetch_loses_nothing_and_duplicates_nothing(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    total = 400
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, imap_source(dovecot, fetch_batch=20))
    dovecot.append("support", _mails(total, body_bytes=30000))
    processor = _processor(config, store, redis_client)
    caplog.set_level(logging.WARNING, logger="pipeline.sources")
    stop, thread = _start_fetcher(config, store, redis_client, Sink(processor.journal, lambda ids: None))
    try:
        wait_until(lambda: journal_count(store) >= 40, 60, "the fetch did not start", every=0.01)
        dovecot.crash()
        stopped_at = journal_count(store)
        dovecot.start()
        wait_until(lambda: _inbox_empty(dovecot), 120, "the fetch did not finish after the restart")
    finally:
        stop.set()
        thread.join(30)
    assert stopped_at < total, "the fetch ended before the restart; nothing was tested"
    assert any("connection lost" in r.getMessage() or "cannot connect" in r.getMessage() for r in caplog.records)
    rows = journal_rows(store)
    assert len(rows) == total and len({ref for ref, _ in rows}) == total
    processed = dovecot.message_ids("support", "Processed")
    assert sorted(set(processed)) == [f"<laptop-{i:03d}@acme.example>" for i in range(total)]
    # Dovecot's MOVE is a copy and an expunge: a crash between the two leaves the batch in
    # both folders, and moving it again after the restart leaves a second copy in Processed.
    # That is the server's copy, never a second journal row or ticket; at most one batch.
    assert len(processed) - total <= 20
    for journal_id in range(1, total + 1):
        processor.process(journal_id)
    assert outcomes(store) == {"ticket_created": total}
    assert sorted(mid for _, mid in journal_rows(store)) == [f"<laptop-{i:03d}@acme.example>" for i in range(total)]


def _inbox_empty(dovecot: Dovecot) -> bool:
    """For polling while the server recovers from its crash: a look that times out is "not yet"."""
    try:
        return dovecot.count("support", "INBOX") == 0
    except (OSError, IMAPClientError):  # TimeoutError is an OSError
        return False


def test_idle_picks_up_a_newly_appended_mail_within_seconds(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis) -> None:
    # Polling once an hour: only IDLE can explain a mail taken within seconds.
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, imap_source(dovecot, poll_seconds=3600))
    processor = _processor(config, store, redis_client)
    stop, thread = _start_fetcher(config, store, redis_client, processing_sink(processor))
    try:
        wait_until(lambda: redis_client.hget(last_fetch_key(config), "support") is not None, 30,
                   "the fetcher did not connect")
        time.sleep(1)  # it is in IDLE now
        appended = time.monotonic()
        dovecot.append("support", _mails(1, prefix="Monitor"))
        wait_until(lambda: outcomes(store)["ticket_created"] == 1, 10, "IDLE did not bring the mail in")
        took = time.monotonic() - appended
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive(), "the fetcher did not stop"
    assert took < 5
    assert ticket_titles(store) == ["Monitor 000 will not boot"]
    assert dovecot.count("support", "Processed") == 1


def test_xoauth2_with_a_token_from_a_command_over_starttls(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis) -> None:
    source = imap_source(dovecot, port=dovecot.imap_port, security="starttls", auth="xoauth2",
                         oauth_token_command=[sys.executable, "-c", f"print({TOKEN!r})"])
    del source["password_env"]
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, source)
    dovecot.append("support", _mails(2))
    processor = _processor(config, store, redis_client)

    result = fetch_once(config.mailbox("support"), config, store, redis_client, processing_sink(processor))

    assert result.journaled == 2
    assert outcomes(store) == {"ticket_created": 2}
    assert "method=XOAUTH2" in dovecot.log()


def test_an_expired_token_is_a_permanent_error_that_says_so(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store,
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILLOOP_TEST_TOKEN", "ya29.expired-an-hour-ago")
    source = imap_source(dovecot, auth="xoauth2", oauth_token_env="MAILLOOP_TEST_TOKEN")
    del source["password_env"]
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, source)
    with pytest.raises(PermanentSourceError) as err:
        connect(config.mailbox("support"), config)
    assert "login as support refused (the access token is expired or revoked?)" in str(err.value)
    assert "AUTHENTICATIONFAILED" in str(err.value)
