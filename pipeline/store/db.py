"""Engine, sessions and schema migrations for the ticket store."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.errors import CannotRun

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class Store:
    """One database: an engine and a session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: committed on success, rolled back on any exception."""
        with self.sessions() as session, session.begin():
            yield session

    def check(self) -> None:
        """Raise CannotRun when the database is unreachable or has no schema."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("select 1"))
                if not inspect(conn).has_table("journal"):
                    raise CannotRun(
                        f"database {self.safe_url} has no mailloop schema; run `pipeline db upgrade`"
                    )
        except OperationalError as exc:
            raise CannotRun(f"database {self.safe_url} is unreachable: {_first_line(exc.orig)}") from None

    @property
    def safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def at_newest(self) -> bool:
        """Is the schema at the newest revision already? Asked without importing Alembic, which
        costs a short command about a third of a second — the MTA pipe's `ingest` runs once a mail."""
        try:
            with self.engine.connect() as conn:
                current = list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
        except DBAPIError:  # no schema yet, or none this can read: `upgrade` will tell
            return False
        return current == [newest_revision()]  # one row: several are branches, Alembic's to sort out

    def upgrade(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from alembic import command

        try:
            with self.engine.begin() as conn:
                cfg = alembic_config(self.url)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except OperationalError as exc:
            raise CannotRun(f"database {self.safe_url} is unreachable: {_first_line(exc.orig)}") from None

    def dispose(self) -> None:
        from pipeline.store.numbers import dispose_counters

        dispose_counters(self.engine)
        self.engine.dispose()


def newest_revision() -> str:
    """The newest migration's revision: each file's name starts with its revision (a test checks
    that, and that Alembic finds the same head)."""
    return max(path.name.split("_", 1)[0] for path in (MIGRATIONS_DIR / "versions").glob("[0-9]*_*.py"))


def alembic_config(url: str):  # -> alembic.config.Config
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


# conn.info key: how many INSERT, UPDATE and DELETE statements this connection has sent.
_CHANGES = "mailloop.changes"


def changes(session: Session) -> int:
    """A counter of the statements that changed rows on the session's connection; compare two readings."""
    return session.connection().info.get(_CHANGES, 0)


def count_change(session: Session) -> None:
    """Count a change the session holds back to write later (`rows.append_later`): it is one."""
    conn = session.connection()
    conn.info[_CHANGES] = conn.info.get(_CHANGES, 0) + 1


@contextmanager
def counted_already(session: Session) -> Iterator[None]:
    """Statements that write what `count_change` counted when it was held back: not counted again,
    or a mail that flushes an earlier mail's rows would look as if it had changed something."""
    conn = session.connection()
    before = conn.info.get(_CHANGES, 0)
    try:
        yield
    finally:
        conn.info[_CHANGES] = before


def _count_changes(conn, _cursor, _statement, _params, context, _many) -> None:  # type: ignore[no-untyped-def]
    if context is not None and (context.isinsert or context.isupdate or context.isdelete):
        conn.info[_CHANGES] = conn.info.get(_CHANGES, 0) + 1


# On every engine, however made (a test may build its own): `changes` must never read a constant.
event.listen(Engine, "before_cursor_execute", _count_changes)


def make_engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # Let SQLAlchemy's `begin` event issue BEGIN instead of pysqlite's implicit one.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            # WAL lets readers run beside the one writer; busy_timeout makes writers queue.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
            # Take the write lock at BEGIN so read-then-write transactions never deadlock.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})


def _first_line(exc: object) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
