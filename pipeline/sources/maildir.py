"""Maildir source: journal each mail in `new/`, then move it to `cur/` (D1.1)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from pipeline.store.db import Store
from pipeline.store.models import JournalEntry


def ensure_maildir(path: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def fetch_maildir(path: Path, mailbox: str, store: Store, journal: Callable[..., int],
                  keepalive: Callable[[], None] = lambda: None) -> list[int]:
    """Journal every mail in `new/` and move it to `cur/`; returns the journal ids to process.

    The move comes only after the journal commit. A crash between the two leaves the
    file in `new/`; the next fetch finds its name already journaled and only moves it.
    `keepalive` is called after each mail (it renews the mailbox's fetch lock).
    """
    ensure_maildir(path)
    ids: list[int] = []
    for entry in sorted(os.scandir(path / "new"), key=lambda e: e.name):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        ref = f"maildir:{entry.name}"
        with store.sessions() as session:
            known = session.scalar(select(JournalEntry.id).where(JournalEntry.mailbox == mailbox,
                                                                 JournalEntry.source_ref == ref))
        if known is None:
            known = journal(mailbox, Path(entry.path).read_bytes(), source_ref=ref)
        ids.append(known)  # processing is idempotent: a row journaled before a crash is processed now
        base = entry.name.split(":", 1)[0]
        os.replace(entry.path, path / "cur" / f"{base}:2,")
        keepalive()
    return ids
