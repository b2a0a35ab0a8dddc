"""Backlogs for `pipeline import`: .eml files, folders of them, Maildirs and mbox files."""

from __future__ import annotations

import mailbox
from datetime import datetime, timezone
from email.parser import BytesHeaderParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Iterator

Loader = Callable[[], bytes]


def _is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() and (path / "new").is_dir()


def _is_mbox(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(5) == b"From "


def iter_backlog(paths: tuple[Path, ...] | list[Path]) -> Iterator[tuple[str, Loader]]:
    """(source reference, loader of the raw bytes) for every mail under `paths`, in a stable order."""
    for path in paths:
        if path.is_dir() and _is_maildir(path):
            md = mailbox.Maildir(path, factory=None, create=False)
            for key in sorted(md.keys()):
                yield f"maildir:{path}:{key}", (lambda md=md, key=key: md.get_bytes(key))
        elif path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                yield from iter_backlog([child])
        elif _is_mbox(path):
            box = mailbox.mbox(path, create=False)
            for key in box.keys():
                yield f"mbox:{path}:{key}", (lambda box=box, key=key: box.get_bytes(key))
        else:
            yield f"file:{path}", path.read_bytes


def mail_date(raw: bytes) -> datetime | None:
    """The mail's own Date: (its time for the loop guard on import), or None."""
    try:
        # Only the header block: the parser would otherwise read a big attachment's lines too.
        ends = [i for i in (raw.find(b"\n\n", 0, 65536), raw.find(b"\r\n\r\n", 0, 65536)) if i >= 0]
        value = BytesHeaderParser().parsebytes(raw[:min(ends, default=65536)]).get("Date")
        date = parsedate_to_datetime(str(value)) if value else None
    except (TypeError, ValueError, IndexError):
        return None
    if date is None:
        return None
    return date if date.tzinfo else date.replace(tzinfo=timezone.utc)
