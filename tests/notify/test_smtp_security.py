"""SMTP with TLS or STARTTLS, and credentials that come only from the environment (D1.7, D5)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from pipeline.process import MailProcessor
from pipeline.store.db import Store
from tests.conftest import make_mail
from tests.notify.conftest import smtp_table
from tests.notify.helpers import outbox, send_pending
from tests.notify.smtp import SmtpServer, self_signed

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory):
    return self_signed(tmp_path_factory.mktemp("tls"))


def run(make_config, redis_client, server: SmtpServer, **smtp: str) -> Store:
    config = make_config(smtp_table(server.port, **smtp))
    store = Store(config.database_url)
    MailProcessor(config, store, redis_client).ingest("support", make_mail(subject="Printer jams"), received_at=T0)
    send_pending(store, config)
    return store


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("security", ["starttls", "tls"])
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_a_login_over_tls_with_the_password_from_the_environment(
        make_config, redis_client, certificate, monkeypatch, security: str) -> None:
    cert, context = certificate
    login = ("mailloop", "s3cret-from-env")
    server = SmtpServer(**{security: context}, login=login).start()
    monkeypatch.setenv("MAILLOOP_SMTP_PASSWORD", login[1])
    try:
        store = run(make_config, redis_client, server, security=f'"{security}"', username='"mailloop"',
                    password_env='"MAILLOOP_SMTP_PASSWORD"', ca_file=f'"{cert}"')
    finally:
        server.stop()
    assert server.inbox.count() == 1
    assert outbox(store)[0].status == "sent"
    store.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_wrong_password_is_retried_not_lost_and_the_error_says_why(
        make_config, redis_client, certificate, monkeypatch) -> None:
    cert, context = certificate
    server = SmtpServer(starttls=context, login=("mailloop", "right")).start()
    monkeypatch.setenv("MAILLOOP_SMTP_PASSWORD", "wrong")
    try:
        store = run(make_config, redis_client, server, security='"starttls"', username='"mailloop"',
                    password_env='"MAILLOOP_SMTP_PASSWORD"', ca_file=f'"{cert}"')
    finally:
        server.stop()
    [row] = outbox(store)
    assert server.inbox.count() == 0
    assert row.status == "pending" and "535" in row.last_error
    store.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_server_certificate_we_cannot_verify_sends_nothing(make_config, redis_client, certificate) -> None:
    _, context = certificate
    server = SmtpServer(starttls=context).start()
    try:
        store = run(make_config, redis_client, server, security='"starttls"')  # no ca_file: the system's CAs
    finally:
        server.stop()
    [row] = outbox(store)
    assert server.inbox.count() == 0
    assert row.status == "pending" and "CERTIFICATE_VERIFY_FAILED" in row.last_error
    store.dispose()


def test_check_config_warns_when_the_password_variable_is_not_set_here(tmp_path: Path, monkeypatch) -> None:
    from tests.conftest import config_text, run_cli

    path = tmp_path / "mailboxes.toml"
    path.write_text(config_text("sqlite:///x.db", "t:", smtp_table(2525, username='"u"',
                                                                    password_env='"NO_SUCH_VARIABLE_SET"')))
    result = run_cli("check-config", str(path))
    assert result.returncode == 0
    assert b"warning: smtp: environment variable(s) NO_SUCH_VARIABLE_SET not set here" in result.stderr
