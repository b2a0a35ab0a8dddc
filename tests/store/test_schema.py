"""The schema's revision: the embedded SQLite store brings itself to the newest one, and knows
that it is there without importing Alembic (a command that runs once a mail, the MTA pipe's
`ingest`, would pay a third of a second for it each time)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import text

from pipeline.runtime import Runtime
from pipeline.store.db import MIGRATIONS_DIR, Store, alembic_config, newest_revision
from tests.conftest import config_text


def test_each_migration_file_is_named_after_its_revision_and_the_newest_is_alembic_s_head() -> None:
    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    for script in scripts.walk_revisions():
        assert Path(script.path).name.startswith(f"{script.revision}_"), script.path
    assert scripts.get_current_head() == newest_revision()
    assert len(list((MIGRATIONS_DIR / "versions").glob("[0-9]*_*.py"))) == len(list(scripts.walk_revisions()))


def _version(store: Store) -> str | None:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_sqlite_store_a_revision_behind_is_upgraded_by_the_next_command(db_url: str, tmp_path: Path,
                                                                            key_prefix: str) -> None:
    store = Store(db_url)
    with store.engine.begin() as conn:
        cfg = alembic_config(store.url)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "-1")  # as a store left by the release before the newest migration
    assert not store.at_newest()
    config = tmp_path / "mailboxes.toml"
    config.write_text(config_text(db_url, key_prefix), encoding="utf-8")

    runtime = Runtime(config)
    runtime.store()
    runtime.close()

    assert _version(store) == newest_revision() and store.at_newest()
    store.dispose()


def test_an_empty_sqlite_file_is_not_at_the_newest_revision_until_set_up(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'new.db'}")
    assert not store.at_newest()
    store.upgrade()
    assert store.at_newest()
    store.dispose()
