"""Rows the pipeline only appends — timeline entries, notes, attachments, processed-mail marks,
outbox rows — written with Core inserts in the caller's transaction.

Nothing changes these rows in the transaction that writes them, so nothing needs them in the
ORM's identity map, and the unit of work is the costliest part of a mail: flushing one such
object costs about 0.4 ms of CPU, a Core insert 0.08 ms (bench/README.md, issue 10). The
insert runs at once, so a later query in the same transaction (or savepoint) sees the row,
and a savepoint's rollback takes it back like any other.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import Insert, insert
from sqlalchemy.orm import Session

from pipeline.store.models import Base


@cache
def _insert(model: type[Base]) -> Insert:
    return insert(model.__table__)  # type: ignore[arg-type]


def append(session: Session, model: type[Base], **values: Any) -> int:
    """Insert one row of `model`'s table now; its new id."""
    return session.connection().execute(_insert(model), values).inserted_primary_key[0]


def append_many(session: Session, model: type[Base], rows: list[dict[str, Any]]) -> None:
    """Insert several rows of `model`'s table in one statement (executemany): their ids are not needed."""
    if rows:
        session.connection().execute(_insert(model), rows)
