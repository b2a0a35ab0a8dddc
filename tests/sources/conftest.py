"""Fixtures for the mail sources: a real Dovecot per test, configurations that point at it,
and a sink that processes what a source journals right away (the Celery hop is covered by
the worker and `pipeline run` tests)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from pipeline.config import Config, parse_config
from pipeline.process import MailProcessor
from pipeline.sources.base import Sink
from pipeline.store.db import Store
from pipeline.store.models import JournalEntry, Note, Ticket, TimeEntry
from tests.conftest import REDIS_URL, config_text, make_mail
from tests.sources.dovecot import Dovecot, TokenServer

PASSWORDS = {"support": "support-secret", "billing": "billing-secret"}
PASSWORD_ENV = {"support": "MAILLOOP_TEST_SUPPORT_PASSWORD", "billing": "MAILLOOP_TEST_BILLING_PASSWORD"}
TOKEN = "ya29.test-access-token"


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    server = TokenServer()
    server.tokens[TOKEN] = "support"
    yield server
    server.close()


@pytest.fixture
def dovecot(token_server: TokenServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dovecot]:
    server = Dovecot(PASSWORDS, token_server.url).start()
    for user, variable in PASSWORD_ENV.items():
        monkeypatch.setenv(variable, PASSWORDS[user])
    yield server
    server.destroy()


def toml_inline(values: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + " }"


def imap_source(server: Dovecot, user: str = "support", **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"kind": "imap", "host": "127.0.0.1", "port": server.imaps_port, "security": "tls",
                              "ca_file": str(server.cert), "username": user, "password_env": PASSWORD_ENV[user],
                              "poll_seconds": 3600}
    values.update(overrides)
    return values


def pop3_source(server: Dovecot, user: str = "support", **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"kind": "pop3", "host": "127.0.0.1", "port": server.pop3s_port, "security": "tls",
                              "ca_file": str(server.cert), "username": user, "password_env": PASSWORD_ENV[user]}
    values.update(overrides)
    return values


def write_config(path: Path, db_url: str, key_prefix: str, support: dict[str, Any],
                 billing: dict[str, Any] | None = None, redis_url: str | None = None) -> Config:
    """A configuration with `support` (and optionally `billing`) reading from these sources."""
    extra = ""
    if billing:
        extra = "[mailbox.source]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in billing.items())
    text = config_text(db_url, key_prefix, extra, source=toml_inline(support))
    if redis_url:
        text = text.replace(f'url = "{REDIS_URL}"', f'url = "{redis_url}"', 1)
    path.write_text(text, encoding="utf-8")
    return parse_config(text, path)


def processing_sink(processor: MailProcessor) -> Sink:
    """Journal through the processor and process each batch at once, in this process."""
    return Sink(processor.journal, lambda ids: [processor.process(i) for i in ids],
                journal_many=processor.journal_many)


def outcomes(store: Store) -> Counter[str | None]:
    with store.sessions() as session:
        rows = session.execute(select(JournalEntry.outcome, func.count()).group_by(JournalEntry.outcome))
        return Counter({outcome: n for outcome, n in rows})


def journal_rows(store: Store) -> list[tuple[str | None, str | None]]:
    """(source_ref, Message-ID) of every journal row."""
    with store.sessions() as session:
        return [(ref, mid) for ref, mid in session.execute(select(JournalEntry.source_ref, JournalEntry.message_id))]


def journal_count(store: Store) -> int:
    with store.sessions() as session:
        return session.scalar(select(func.count()).select_from(JournalEntry))


def ticket_titles(store: Store) -> list[str]:
    with store.sessions() as session:
        return sorted(session.scalars(select(Ticket.title)))


# A technician's mail as a forger writes it: a DMARC pass "from our MX", below the Received:
# line of the outside host it really came through (D8).
OUTSIDE_RECEIVED = ("Received: from evil-laptop ([198.51.100.66]) by relay.evil.example with ESMTP id 7Q; "
                    "Mon, 23 Nov 2026 09:29:58 +0000")
MX_PASS = ("Authentication-Results: mx.msp.example; dkim=pass header.d=msp.example header.s=sel1; "
           "spf=pass smtp.mailfrom=msp.example; dmarc=pass header.from=msp.example")


def technician_mail(top_headers: list[str], subject: str = "Printer fixed") -> bytes:
    """Tom's mail opening a ticket with commands that, if believed, resolve it and log 8 hours."""
    return make_mail(from_="Tom Tech <tom@msp.example>", subject=subject, top_headers=top_headers,
                     body="#time 8h\n#status Resolved\nReplaced the fuser.\n")


def forged_technician_mail(subject: str = "Printer fixed") -> bytes:
    return technician_mail([OUTSIDE_RECEIVED, MX_PASS], subject)


def what_the_commands_did(store: Store, subject: str = "Printer fixed") -> tuple[str, list[float], bool]:
    """(status, hours logged, whether the mail is an internal note) of the ticket the mail opened."""
    with store.sessions() as session:
        ticket = session.scalars(select(Ticket).where(Ticket.title == subject)).one()
        hours = list(session.scalars(select(TimeEntry.hours).where(TimeEntry.entity_id == ticket.id)))
        internal = session.scalars(select(Note.internal).where(Note.entity_id == ticket.id)).all()
        return ticket.status, hours, all(internal) and bool(internal)
