"""Test fixtures: real SQLite and PostgreSQL, real Redis — no mocks of either.

Store-backed tests run once per database (`db` is parametrised). PostgreSQL gets one
database per test session (`mailloop_test_<pid>`), emptied between tests; SQLite gets a
copy of a migrated file per test. Redis keys live under a prefix of each test's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, event, text

from pipeline.config import Config, parse_config
from pipeline.process import MailProcessor
from pipeline.store.db import Store
from pipeline.store.directory import load_directory
from pipeline.store.models import Base

FIXTURES = Path(__file__).parent / "fixtures"
PG_ADMIN_URL = os.environ.get("MAILLOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MAILLOOP_TEST_REDIS", "redis://127.0.0.1:6379/15")

DIRECTORY = """
[[resource]]
email = "tom@msp.example"
name = "Tom Tech"
roles = ["Engineer", "Senior Engineer"]

[[account]]
name = "Acme Corp"
domains = ["acme.example"]
manager = "tom@msp.example"

[[account]]
name = "Fabrikam"
domains = ["fabrikam.example"]

[[contact]]
email = "jane@acme.example"
name = "Jane Doe"
account = "Acme Corp"

[[contact]]
email = "kim.lee@fabrikam.example"
name = "Kim Lee"
account = "Fabrikam"

[[queue]]
name = "Service Desk"
members = ["tom@msp.example"]
"""


def config_text(db_url: str, key_prefix: str, extra_mailbox: str = "", **mailbox_extra: str) -> str:
    extra = "\n".join(f"{k} = {v}" for k, v in mailbox_extra.items())
    return f"""
[database]
url = "{db_url}"

[redis]
url = "{REDIS_URL}"
key_prefix = "{key_prefix}"

[[mailbox]]
name = "support"
address = "support@msp.example"
{extra}

[mailbox.ticket_defaults]
queue = "Service Desk"
priority = "Medium"

[mailbox.trust]
authserv_ids = ["mx.msp.example"]
require = "dmarc"

[[mailbox]]
name = "billing"
address = "billing@msp.example"

[mailbox.trust]
authserv_ids = ["mx.msp.example"]
{extra_mailbox}
"""


@pytest.fixture(autouse=True)
def _restore_current_celery_app():
    """A test that builds an app (create_app) makes it Celery's current one; a later test's
    in-process `task.delay()` would then use that test's broker, long gone. Put the previous one back."""
    from celery import _state

    before = _state.get_current_app()
    yield
    before.set_current()


@pytest.fixture(scope="session")
def pg_database() -> str:
    name = f"mailloop_test_{os.getpid()}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    store = Store(url)
    store.upgrade()
    store.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    store = Store(f"sqlite:///{path}")
    store.upgrade()
    store.dispose()
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        path = tmp_path / "mailloop.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("pg_database")
    engine = create_engine(url)
    with engine.begin() as conn:
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> str:
    prefix = f"mailloop-test:{uuid.uuid4().hex}:"
    yield prefix
    for key in redis_client.scan_iter(match=prefix + "*"):
        redis_client.delete(key)


@pytest.fixture
def make_config(tmp_path: Path, db_url: str, key_prefix: str):
    def make(extra_mailbox: str = "", **mailbox_extra: str) -> Config:
        path = tmp_path / "mailboxes.toml"
        path.write_text(config_text(db_url, key_prefix, extra_mailbox, **mailbox_extra), encoding="utf-8")
        return parse_config(path.read_text(encoding="utf-8"), path)

    return make


@pytest.fixture
def config(make_config) -> Config:
    return make_config()


@pytest.fixture
def store(config: Config, tmp_path: Path) -> Store:
    s = Store(config.database_url)
    directory = tmp_path / "directory.toml"
    directory.write_text(DIRECTORY, encoding="utf-8")
    load_directory(s, directory, config.settings.numbering)
    yield s
    s.dispose()


@pytest.fixture
def processor(config: Config, store: Store, redis_client: redis.Redis) -> MailProcessor:
    return MailProcessor(config, store, redis_client)


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def run_cli(*args: str, input: bytes | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], input=input, capture_output=True,
                          env=full_env, cwd=cwd, timeout=120)


def make_mail(from_: str = "Jane Doe <jane@acme.example>", subject: str = "Printer jams",
              body: str = "The printer on floor 3 jams.\n", *, message_id: str | None = None,
              to: str = "support@msp.example", headers: dict[str, str] | None = None,
              top_headers: list[str] | None = None) -> bytes:
    """A plain mail as a client would send it; `top_headers` are raw lines put above everything."""
    from datetime import datetime, timezone
    from email.message import EmailMessage
    from email.utils import format_datetime, make_msgid

    msg = EmailMessage()
    msg["From"] = from_
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime(2026, 11, 23, 9, 30, tzinfo=timezone.utc))
    msg["Message-ID"] = message_id or make_msgid(domain="mail.example")
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(body)
    raw = msg.as_bytes()
    if top_headers:
        raw = "".join(line + "\n" for line in top_headers).encode() + raw
    return raw


@contextmanager
def journal_inserts(store: Store) -> Iterator[list[str]]:
    """The INSERT statements into the journal that `store`'s engine sends meanwhile: how many
    statements (not rows) a batch took."""
    heard: list[str] = []

    def listener(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("INSERT INTO JOURNAL"):
            heard.append(statement)

    event.listen(store.engine, "before_cursor_execute", listener)
    try:
        yield heard
    finally:
        event.remove(store.engine, "before_cursor_execute", listener)


@contextmanager
def journal_refusing(store: Store, marker: str, errcode: str = "raise_exception") -> Iterator[None]:
    """A PostgreSQL trigger that fails the insert of any journal row whose raw mail holds `marker`
    — a real refusal by the server (`errcode`: the SQLSTATE condition, e.g. serialization_failure
    for a transient one). Dropped afterwards: the test database outlives the test."""
    with store.engine.begin() as conn:
        conn.execute(text("CREATE FUNCTION refuse_marked() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                          f"IF position('{marker}'::bytea in NEW.raw) > 0 THEN "
                          f"RAISE EXCEPTION 'refused by policy' USING ERRCODE = '{errcode}'; END IF; "
                          "RETURN NEW; END $$"))
        conn.execute(text("CREATE TRIGGER refuse_marked BEFORE INSERT ON journal FOR EACH ROW "
                          "EXECUTE FUNCTION refuse_marked()"))
    try:
        yield
    finally:
        with store.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse_marked ON journal"))
            conn.execute(text("DROP FUNCTION refuse_marked()"))
