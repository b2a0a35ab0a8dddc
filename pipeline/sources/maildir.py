"""Maildir source: journal the mail in `new/`, then move it to `cur/` (D1.1)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pipeline.process import by_bytes
from pipeline.sources.base import chunks, known_refs
from pipeline.store.db import Store


def ensure_maildir(path: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)


# Mails per journal commit: one commit (and one look-up of known names) per chunk, not per mail,
# and each chunk is handed to processing at once instead of after the whole folder.
CHUNK = 50


def fetch_maildir(path: Path, mailbox: str, store: Store,
                  journal_many: Callable[[str, list[tuple[bytes, str | None]]], list[int]],
                  enqueue: Callable[[list[int]], object] = lambda ids: None,
                  keepalive: Callable[[], None] = lambda: None) -> list[int]:
    """Journal every mail in `new/` and move it to `cur/`; returns the journal ids to process.

    A chunk's files move only after its journal commit. A crash between the two leaves
    them in `new/`; the next fetch finds their names already journaled and only moves
    them. Each chunk's ids go to `enqueue` once moved; `keepalive` is called after each
    chunk (it renews the mailbox's fetch lock).
    """
    ensure_maildir(path)
    names = sorted(e.name for e in os.scandir(path / "new") if e.is_file() and not e.name.startswith("."))
    ids: list[int] = []
    for chunk in chunks(names, CHUNK):
        refs = {name: f"maildir:{name}" for name in chunk}
        known = known_refs(store, mailbox, list(refs.values()))
        fresh = [name for name in chunk if refs[name] not in known]
        # Read as they are journaled, 16 MiB at most a statement: a chunk of big mails is never
        # one statement over the database's limit, nor held whole.
        files = (((path / "new" / name).read_bytes(), refs[name]) for name in fresh)
        for run in by_bytes(files, lambda mail: len(mail[0])):
            known.update(zip((ref for _, ref in run), journal_many(mailbox, run)))
        # Processing is idempotent: a row journaled before a crash is processed now.
        chunk_ids = [known[refs[name]] for name in chunk]
        for name in chunk:
            os.replace(path / "new" / name, path / "cur" / f"{name.split(':', 1)[0]}:2,")
        enqueue(chunk_ids)
        ids += chunk_ids
        keepalive()
    return ids
