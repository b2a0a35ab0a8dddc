"""SMTP and LMTP intake with smtplib: 250 only after the journal write, 552 over the size
limit, 451 while the database or Redis is down — and the retried mail is taken afterwards.
The intake is a receiving host (D8): its own trace headers on top, an Authentication-Results
believed only from an intake relay, a cap on sessions and an idle timeout."""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from aiosmtpd.controller import Controller

from pipeline.config import Config, parse_config
from pipeline.process import MailProcessor, connect_redis
from pipeline.sources.intake import plan_listeners, start_listener
from pipeline.store.db import Store
from pipeline.store.directory import load_directory
from tests.conftest import DIRECTORY
from tests.conftest import make_mail as _make_mail
from tests.services import PrivatePostgres, PrivateRedis, free_port, wait_until
from tests.sources.conftest import (
    MX_PASS,
    OUTSIDE_RECEIVED,
    journal_count,
    outcomes,
    processing_sink,
    technician_mail,
    ticket_titles,
    what_the_commands_did,
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
            assert b"127.0.0.1" not in down.value.smtp_error  # where our services run is not the peer's business
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


MX_RECEIVED = ("Received: from laptop.msp.example (laptop.msp.example [10.0.0.5]) by mx.msp.example (Postfix) "
               "with ESMTPSA id 4A; Mon, 23 Nov 2026 09:29:59 +0000")


def _send(port: int, kind: str, raw: bytes) -> None:
    client = smtplib.LMTP("127.0.0.1", port) if kind == "lmtp" else smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        crlf = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # as it goes over the wire
        assert client.sendmail("tom@msp.example", ["support@msp.example"], crlf) == {}
    finally:
        client.quit()


def _journaled_raw(store: Store) -> bytes:
    from sqlalchemy import select

    from pipeline.store.models import JournalEntry

    with store.sessions() as session:
        return session.scalars(select(JournalEntry.raw)).one()


@pytest.mark.parametrize("kind", ["smtp", "lmtp"])
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_forged_authentication_results_sent_straight_to_the_intake_applies_nothing(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client: redis.Redis, kind: str) -> None:
    # Anyone who can connect: a DMARC pass "from our MX" written at the very top of the mail.
    port = free_port()
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, _smtp_source(port, kind))
    for _ in _listen(config, MailProcessor(config, store, redis_client), redis_client):
        _send(port, kind, technician_mail([MX_PASS]))

    assert what_the_commands_did(store) == ("New", [], True)
    raw = _journaled_raw(store)
    # Our own verdict and Received: line sit above what the peer sent.
    assert raw.startswith(b"Authentication-Results: mx.msp.example; none (mailloop intake: peer 127.0.0.1 is "
                          b"not one of intake_relays)\r\nReceived: from ")
    assert b"\r\n\tby mx.msp.example (mailloop) with " + (b"LMTP" if kind == "lmtp" else b"ESMTP") in raw
    assert raw.index(b"(mailloop)") < raw.index(MX_PASS.encode())


def _with_relays(config: Config, relays: list[str]) -> Config:
    """`config` with the `support` mailbox's trust policy naming these intake relays."""
    listed = ", ".join(f'"{relay}"' for relay in relays)
    text = config.path.read_text().replace('require = "dmarc"', f'require = "dmarc"\nintake_relays = [{listed}]', 1)
    config.path.write_text(text)
    return parse_config(text, config.path)


@pytest.mark.parametrize("kind", ["smtp", "lmtp"])
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_from_an_intake_relay_the_verdict_of_our_mx_is_believed_and_the_commands_apply(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client: redis.Redis, kind: str) -> None:
    port = free_port()
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, _smtp_source(port, kind))
    config = _with_relays(config, ["192.0.2.0/24", "127.0.0.1"])
    assert config.mailbox("support").trust.intake_relays == ["192.0.2.0/24", "127.0.0.1"]
    for _ in _listen(config, MailProcessor(config, store, redis_client), redis_client):
        _send(port, kind, technician_mail([MX_PASS, MX_RECEIVED]))
        # The relay is believed for what our MX wrote, not for what the mail brought along.
        _send(port, kind, technician_mail([OUTSIDE_RECEIVED, MX_PASS], subject="Server rebooted"))

    assert what_the_commands_did(store) == ("Resolved", [8.0], False)
    assert what_the_commands_did(store, "Server rebooted") == ("New", [], True)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_relay_range_that_does_not_hold_the_peer_does_not_vouch_for_it(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client: redis.Redis) -> None:
    port = free_port()
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, _smtp_source(port))
    config = _with_relays(config, ["10.0.0.0/8"])
    for _ in _listen(config, MailProcessor(config, store, redis_client), redis_client):
        _send(port, "smtp", technician_mail([MX_PASS, MX_RECEIVED]))
    assert what_the_commands_did(store) == ("New", [], True)


def _session(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A session held open from `source` (any 127.x address is this machine), its first line read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.recv(512)
    return sock


def _greeting(port: int, source: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        return int(sock.recv(512)[:3])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_strangers_hold_half_the_sessions_each_at_most_and_our_mx_is_never_refused(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client: redis.Redis) -> None:
    port = free_port()
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, _smtp_source(port, max_sessions=4))
    config = _with_relays(config, ["127.0.0.9"])
    for _ in _listen(config, MailProcessor(config, store, redis_client), redis_client):
        held = [_session(port, "127.0.0.1"), _session(port, "127.0.0.1")]
        assert _greeting(port, "127.0.0.1") == 421  # a third from one stranger
        held += [_session(port, "127.0.0.2"), _session(port, "127.0.0.2")]
        assert _greeting(port, "127.0.0.3") == 421  # four open: the cap
        # Our MX gets in all the same, and its mail is taken.
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.9", 0)) as mx:
            assert mx.sendmail("jane@acme.example", ["support@msp.example"],
                               make_mail(subject="Monitor flickers")) == {}
        held.pop(0).close()
        # The listener notices the closed session on its own loop: its place is given again soon.
        wait_until(lambda: _greeting(port, "127.0.0.3") == 220, 10, "a freed place was not given again")
        for sock in held:
            sock.close()
    assert ticket_titles(store) == ["Monitor flickers"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_idle_session_is_closed_and_its_place_given_to_the_next(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client: redis.Redis) -> None:
    port = free_port()
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix,
                          _smtp_source(port, max_sessions=2, idle_timeout_seconds=1))
    for _ in _listen(config, MailProcessor(config, store, redis_client), redis_client):
        idle = [_session(port) for _ in range(2)]
        started = time.monotonic()
        for sock in idle:
            assert sock.recv(512) == b""  # the server hung up on a session that said nothing
        assert time.monotonic() - started < 5
        _send(port, "smtp", make_mail(subject="Mouse lags"))
    assert ticket_titles(store) == ["Mouse lags"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_slow_sender_of_a_big_mail_is_not_cut_off_by_the_idle_timeout(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client: redis.Redis) -> None:
    # The timeout is for silence: a mail arriving over 3 s in pieces 0.3 s apart is taken whole.
    port = free_port()
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix, _smtp_source(port, idle_timeout_seconds=1))
    mail = make_mail(subject="Scanned contract", body="page of the contract\n" * 5_000)
    for _ in _listen(config, MailProcessor(config, store, redis_client), redis_client):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo()
            assert smtp.mail("jane@acme.example")[0] == 250 and smtp.rcpt("support@msp.example")[0] == 250
            assert smtp.docmd("DATA")[0] == 354
            chunks = [mail[i:i + len(mail) // 10 + 1] for i in range(0, len(mail), len(mail) // 10 + 1)]
            for chunk in chunks:
                smtp.sock.sendall(chunk)
                time.sleep(0.3)
            smtp.sock.sendall(b"\r\n.\r\n")
            assert smtp.getreply()[0] == 250
    assert ticket_titles(store) == ["Scanned contract"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_peer_that_stops_reading_is_cut_off_when_silent_and_its_place_freed(
        tmp_path: Path, db_url: str, key_prefix: str, store: Store, redis_client: redis.Redis) -> None:
    # It pipelines commands without reading a reply, then says nothing: our replies can never drain.
    port = free_port()
    config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix,
                          _smtp_source(port, max_sessions=2, idle_timeout_seconds=1))
    for _ in _listen(config, MailProcessor(config, store, redis_client), redis_client):
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        stuck.connect(("127.0.0.1", port))
        stuck.setblocking(False)
        until = time.monotonic() + 3
        while time.monotonic() < until:
            try:
                stuck.send(b"HELP\r\n" * 1000)
            except BlockingIOError:  # the server stopped reading: its replies are stuck
                time.sleep(0.05)
            except ConnectionError:  # silent for a second while stuck: cut off
                break
        # One peer may hold one of these two places; once the stuck one is gone, it may come back.
        wait_until(lambda: _greeting(port, "127.0.0.1") == 220, 10, "the silent session was never ended")
        stuck.close()


def test_one_ipv6_host_counts_as_one_peer_however_many_addresses_of_its_64_it_uses() -> None:
    from pipeline.sources.intake import _host_of

    assert _host_of("2001:db8:1:2::1") == _host_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert _host_of("2001:db8:1:3::1") != _host_of("2001:db8:1:2::1")
    assert _host_of("::ffff:192.0.2.7") == _host_of("192.0.2.7") == "192.0.2.7"
    assert _host_of(None) is None
