"""The Maildir source: journal first, then move; a chunk at a time (D1.1)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from pipeline.sources.maildir import CHUNK, ensure_maildir, fetch_maildir
from pipeline.store.models import JournalEntry
from tests.conftest import journal_inserts, make_mail


def _drop(maildir: Path, count: int) -> list[str]:
    ensure_maildir(maildir)
    names = [f"1764000000.M{i:04d}P7.mx01" for i in range(count)]
    for i, name in enumerate(names):
        (maildir / "new" / name).write_bytes(make_mail(subject=f"Disk {i} failing"))
    return names


def _journaled(store) -> int:
    with store.sessions() as s:
        return s.scalar(select(func.count()).select_from(JournalEntry))


def test_a_fetch_hands_each_chunk_to_processing_as_soon_as_it_is_journaled(tmp_path, processor, store) -> None:
    maildir = tmp_path / "Maildir"
    _drop(maildir, 2 * CHUNK + 20)
    handed: list[list[int]] = []

    def enqueue(ids: list[int]) -> None:
        # A chunk's files have left new/ by the time its ids are handed on.
        assert _journaled(store) == sum(map(len, handed)) + len(ids)
        handed.append(ids)

    ids = fetch_maildir(maildir, "support", store, processor.journal_many, enqueue)
    assert [len(chunk) for chunk in handed] == [CHUNK, CHUNK, 20]
    assert ids == [i for chunk in handed for i in chunk] and len(set(ids)) == 2 * CHUNK + 20
    assert not any((maildir / "new").iterdir())
    assert len(list((maildir / "cur").iterdir())) == 2 * CHUNK + 20


def test_a_mail_journaled_before_a_crash_is_only_moved_by_the_next_fetch(tmp_path, processor, store) -> None:
    maildir = tmp_path / "Maildir"
    names = _drop(maildir, 3)
    # The crash came after the journal commit of the first file, before its move.
    (first,) = processor.journal_many("support", [((maildir / "new" / names[0]).read_bytes(),
                                                   f"maildir:{names[0]}")])
    ids = fetch_maildir(maildir, "support", store, processor.journal_many)
    assert ids[0] == first and len(set(ids)) == 3
    assert _journaled(store) == 3  # not journaled twice
    assert sorted(p.name for p in (maildir / "cur").iterdir()) == sorted(f"{n}:2," for n in names)


def test_a_chunk_of_big_mails_is_journaled_a_few_at_a_time(tmp_path, processor, store) -> None:
    # Scans of 7 MiB each: one statement for the chunk would carry 21 MiB; at most 16 MiB go together.
    maildir = tmp_path / "Maildir"
    ensure_maildir(maildir)
    for i in range(3):
        (maildir / "new" / f"1764000000.M{i:04d}P7.mx01").write_bytes(
            make_mail(subject=f"Scan {i}", body="x" * (7 * 2**20)))
    with journal_inserts(store) as inserts:
        ids = fetch_maildir(maildir, "support", store, processor.journal_many)
    assert len(inserts) == 2 and len(set(ids)) == 3
    assert _journaled(store) == 3 and len(list((maildir / "cur").iterdir())) == 3
