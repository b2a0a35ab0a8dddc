"""SMTP and LMTP intake with smtplib: 250 only after the journal write, 552 over the size
limit, 451 while the database or Redis is down — and the retried mail is taken afterwards."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from aiosmtpd.controller import Controller

from pipeline.config import Config
from pipeline.process import MailProcessor, connect_redis
from pipeline.sources.intake import plan_listeners, start_listener
from pipeline.store.db import Store
from pipeline.store.directory import load_directory
from tests.conftest import DIRECTORY
from tests.conftest import make_mail as _make_mail
from tests.services import PrivatePostgres, PrivateRedis, free_port
from tests.sources.conftest import (
    journal_count,
    outcomes,
    processing_sink,
    ticket_titles,
    write_config,
)

pytestmark = pytest.mark.timeout(180)


def make_mail(**kw: str) -> bytes:
    """A mail as it goes over SMTP: CRLF line ends (smtplib leaves bytes as they are)."""
    return _make_mail(**kw).replace(b"\n", b"\r\n")


def _smtp_source(port: int, kind: str = "smtp", **extra: object) -> dict[str, object]:
    return {"kind": kind, "host": "127.0.0.1", "port": port, "security": "none", **extra}


def _listen(config: Config, processor: MailProcessor, client: redis.Redis) -> Iterator[Controller]:
    """The configuration's listeners in this process; journaled mail is processed at once."""
    controllers = [start_listener(listener, processing_sink(processor), client)
                   for listener in plan_listeners(config.mailboxes)]
    try:
        yield controllers[0]
    finally:
        for controller in controllers:
            controller.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_oversize_mail_gets_552_an_unknown_recipient_550_and_neither_is_journaled(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client: redis.Redis) -> None:
    port = free_port()
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix,
                          _smtp_source(port, max_message_bytes=10_000, recipients=["helpdesk@msp.example"]))
    for _ in _listen(config, MailProcessor(config, store, redis_client), redis_client):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            huge = make_mail(subject="Huge scan", body="scanned page\n" * 2_000)
            # A client that declares the size (smtplib does) is refused at MAIL FROM …
            with pytest.raises(smtplib.SMTPSenderRefused) as declared:
                smtp.sendmail("jane@acme.example", ["support@msp.example"], huge)
            assert declared.value.smtp_code == 552
            # … one that does not, after the data.
            assert smtp.mail("jane@acme.example")[0] == 250
            assert smtp.rcpt("support@msp.example")[0] == 250
            assert smtp.data(huge)[0] == 552
            smtp.rset()
            with pytest.raises(smtplib.SMTPRecipientsRefused) as unknown:
                smtp.sendmail("jane@acme.example", ["nobody@msp.example"], make_mail())
            assert unknown.value.recipients["nobody@msp.example"][0] == 550
            smtp.rset()
            # The mailbox's own address and its extra recipient are both taken.
            assert smtp.sendmail("jane@acme.example", ["HelpDesk@msp.example"], make_mail(subject="Fax")) == {}
    assert journal_count(store) == 1
    assert ticket_titles(store) == ["Fax"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_lmtp_answers_once_per_recipient_and_each_mailbox_journals_the_mail(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client: redis.Redis) -> None:
    port = free_port()
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, _smtp_source(port, "lmtp"),
                          billing=_smtp_source(port, "lmtp"))
    for _ in _listen(config, MailProcessor(config, store, redis_client), redis_client):
        lmtp = smtplib.LMTP("127.0.0.1", port)
        try:
            lmtp.ehlo_or_helo_if_needed()
            assert lmtp.mail("jane@acme.example")[0] == 250
            assert lmtp.rcpt("support@msp.example")[0] == 250
            assert lmtp.rcpt("billing@msp.example")[0] == 250
            first = lmtp.data(make_mail(to="support@msp.example, billing@msp.example", subject="Invoice wrong"))
            second = lmtp.getreply()  # RFC 2033: one reply per recipient after DATA
        finally:
            lmtp.close()
    assert first[0] == 250 and second[0] == 250
    assert journal_count(store) == 2
    # To one mailbox and Cc another: one ticket (D1.5.1).
    assert outcomes(store) == {"ticket_created": 1, "already_processed": 1}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_smtp_intake_answers_451_while_redis_is_down_and_takes_the_retried_mail_afterwards(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store) -> None:
    port = free_port()
    server = PrivateRedis(tmp_path / "redis").start()
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, _smtp_source(port), redis_url=server.url)
    client = connect_redis(server.url)
    mail = make_mail(subject="Keyboard missing keys")
    try:
        for _ in _listen(config, MailProcessor(config, store, client), client):
            server.stop()
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp, pytest.raises(smtplib.SMTPDataError) as down:
                smtp.sendmail("jane@acme.example", ["support@msp.example"], mail)
            assert down.value.smtp_code == 451 and b"Redis" in down.value.smtp_error
            assert journal_count(store) == 0
            server.start()
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                assert smtp.sendmail("jane@acme.example", ["support@msp.example"], mail) == {}
    finally:
        client.close()
        server.stop()
    assert ticket_titles(store) == ["Keyboard missing keys"]


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres().start()
    yield server
    server.destroy()


def test_smtp_intake_answers_451_while_the_database_is_down_and_takes_the_retried_mail_afterwards(
        tmp_path: Path, key_prefix: str, redis_client: redis.Redis, private_pg: PrivatePostgres) -> None:
    port = free_port()
    config = write_config(tmp_path / "mailboxes.toml", private_pg.url, key_prefix, _smtp_source(port))
    store = Store(private_pg.url)
    store.upgrade()
    (tmp_path / "directory.toml").write_text(DIRECTORY, encoding="utf-8")
    load_directory(store, tmp_path / "directory.toml", config.settings.numbering)
    accepted = make_mail(subject="Outlook keeps asking for the password")
    retried = make_mail(subject="Printer offline after the update")
    try:
        for _ in _listen(config, MailProcessor(config, store, redis_client), redis_client):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                assert smtp.sendmail("jane@acme.example", ["support@msp.example"], accepted) == {}
            private_pg.stop()
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp, pytest.raises(smtplib.SMTPDataError) as down:
                smtp.sendmail("jane@acme.example", ["support@msp.example"], retried)
            assert down.value.smtp_code == 451
            private_pg.start()
            # The sending MTA retries the same mail.
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                assert smtp.sendmail("jane@acme.example", ["support@msp.example"], retried) == {}
        assert outcomes(store) == {"ticket_created": 2}
        assert ticket_titles(store) == ["Outlook keeps asking for the password", "Printer offline after the update"]
    finally:
        store.dispose()
