"""Rows the pipeline only appends — timeline entries, notes, attachments, processed-mail marks,
outbox rows — written with Core inserts in the caller's transaction.

Nothing changes these rows in the transaction that writes them, so nothing needs them in the
ORM's identity map, and the unit of work is the costliest part of a mail: flushing one such
object costs about 0.4 ms of CPU, a Core insert 0.08 ms (bench/README.md, issue 10). `append`
inserts at once, so a later query in the same transaction (or savepoint) sees the row, and a
savepoint's rollback takes it back like any other.

A batch without savepoints holds back the rows nobody needs the id of (`append_later`: a
mail's timeline entries and processed-identity mark) and writes each table's rows in one
statement (`flush_appended`) instead of a round trip each: before it commits, before an
`append` to a table with rows held back, and before an ORM query reads such a table. Until
then the rows count as the mail's changes (`db.changes`), so a mail that fails after holding
one back is undone by running the batch again with savepoints, which writes at once.
"""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar

from sqlalchemy import Column, Insert, bindparam, event, insert, inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import ORMExecuteState, Session, make_transient_to_detached
from sqlalchemy.sql.util import find_tables

from pipeline.store.db import count_change, counted_already
from pipeline.store.models import Base


@cache
def _insert(model: type[Base]) -> Insert:
    return insert(model.__table__)  # type: ignore[arg-type]


def append(session: Session, model: type[Base], **values: Any) -> int:
    """Insert one row of `model`'s table now; its new id."""
    _held_rows_first(session, model)
    return session.connection().execute(_insert(model), values).inserted_primary_key[0]


def _held_rows_first(session: Session, *models: type[Base]) -> None:
    """Before an immediate insert into these tables, write their held-back rows: ids in the order rows came."""
    pending = session.info.get(_PENDING)
    if pending and any(held in models for held, _ in pending):
        flush_appended(session)


# session.info key: the rows `append_later` holds back, by table and columns, in order.
_PENDING = "mailloop.pending"


def hold_back_appends(session: Session) -> None:
    """From now on in this transaction, `append_later` holds its rows back until `flush_appended`."""
    session.info[_PENDING] = {}


def append_later(session: Session, model: type[Base], **values: Any) -> None:
    """Append a row whose id nobody needs: held back if the transaction asked for it, else now."""
    pending = session.info.get(_PENDING)
    if pending is None:
        append(session, model, **values)
        return
    pending.setdefault((model, tuple(values)), []).append(values)
    count_change(session)


def flush_appended(session: Session) -> None:
    """Write the rows held back, one statement (executemany) per table and set of columns."""
    pending = session.info.get(_PENDING)
    if not pending:
        return
    groups = list(pending.items())
    pending.clear()
    conn = session.connection()
    with counted_already(session):
        for (model, _columns), rows in groups:
            conn.execute(_insert(model), rows)


@event.listens_for(Session, "do_orm_execute")
def _flush_before_reading(state: ORMExecuteState) -> None:
    """An ORM query of a table with rows held back sees them, as it would have had they been written."""
    pending = state.session.info.get(_PENDING)
    if pending and state.is_select:
        held = {model.__table__ for model, _ in pending}
        if not held.isdisjoint(find_tables(state.statement, include_aliases=True, include_joins=True)):
            flush_appended(state.session)


Model = TypeVar("Model", bound=Base)


@cache
def _columns(model: type[Base]) -> tuple[tuple[str, Column], ...]:
    """(attribute key, column) of every mapped column but the primary key."""
    return tuple((a.key, a.columns[0]) for a in inspect(model).column_attrs if not a.columns[0].primary_key)


def add_inserted(session: Session, obj: Model) -> Model:
    """Insert a new object's row with a Core insert, then put the object in `session` as if loaded.

    For rows the transaction goes on changing (a new ticket, a new contact): they must be in the
    identity map, but the unit of work's insert costs five times a Core insert (bench/README.md,
    issue 10). Column defaults are applied here, so every attribute is loaded and reading one
    never goes back to the database; a later change is an ordinary UPDATE at the next flush.
    """
    obj.id = append(session, type(obj), **_row(obj))
    _as_loaded(session, obj)
    return obj


def add_new(session: Session, obj: Model, unique: str) -> Model | None:
    """`add_inserted`, unless a row with the same value in the `unique` column exists: then None, and
    nothing is written.

    For a row another transaction may create meanwhile (the same new sender in two workers'
    batches): a plain insert would fail and cost the whole batch a second run; this one waits for
    the other transaction, as the plain insert does, and on its commit writes nothing.
    """
    _held_rows_first(session, type(obj))
    statement = _insert_new(type(obj), unique, session.get_bind().dialect.name)
    row = session.connection().execute(statement, _row(obj)).first()
    if row is None:
        return None
    obj.id = row[0]
    _as_loaded(session, obj)
    return obj


@cache
def _insert_new(model: type[Base], unique: str, dialect: str) -> Insert:
    table = model.__table__
    make = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return make(table).on_conflict_do_nothing(index_elements=[table.c[unique]]).returning(table.c.id)


def add_inserted_with(session: Session, parent: Base, child: Model, foreign_key: str, *,
                      unless_exists: str | None = None) -> Model | None:
    """`add_inserted` for a new `parent` and a new `child` whose `foreign_key` is the parent's id.

    On PostgreSQL one statement inserts both (`WITH p AS (INSERT … RETURNING id) INSERT … SELECT
    …, p.id FROM p`): a new sender's contact and their first ticket were two of a new ticket's
    four round trips (bench/README.md, issue 10). Elsewhere, one insert after the other.
    `unless_exists` names the parent's unique column: when a row with its value exists (`add_new`),
    neither row is written and the answer is None.
    """
    if session.get_bind().dialect.name != "postgresql":
        if unless_exists is None:
            add_inserted(session, parent)
        elif add_new(session, parent, unless_exists) is None:
            return None
        setattr(child, foreign_key, parent.id)
        return add_inserted(session, child)
    setattr(child, foreign_key, None)
    parent_row, child_row = _row(parent), _row(child)
    _held_rows_first(session, type(parent), type(child))
    params = {f"p_{k}": v for k, v in parent_row.items()}
    params.update({f"c_{k}": v for k, v in child_row.items() if k != foreign_key})
    statement = _insert_with(type(parent), type(child), foreign_key, unless_exists)
    row = session.connection().execute(statement, params).first()
    if row is None:  # the parent's row exists: nothing was written
        return None
    child.id, parent.id = row
    setattr(child, foreign_key, parent.id)
    _as_loaded(session, parent)
    _as_loaded(session, child)
    return child


@cache
def _insert_with(parent: type[Base], child: type[Base], foreign_key: str, unless_exists: str | None) -> Insert:
    """The parent-and-child insert of `add_inserted_with`, built once per pair."""
    p_table, c_table = parent.__table__, child.__table__
    new = postgresql.insert(p_table).values(
        {c.name: bindparam(f"p_{c.name}", type_=c.type) for _, c in _columns(parent)})
    if unless_exists is not None:
        new = new.on_conflict_do_nothing(index_elements=[p_table.c[unless_exists]])
    new = new.returning(p_table.c.id).cte(f"new_{p_table.name}")
    names = [c.name for _, c in _columns(child) if c.name != foreign_key]
    row = select(*[bindparam(f"c_{n}", type_=c_table.c[n].type) for n in names], new.c.id)
    return insert(c_table).from_select([*names, foreign_key], row).add_cte(new) \
        .returning(c_table.c.id, c_table.c[foreign_key])


def _row(obj: Base) -> dict[str, Any]:
    """The new object's column values, by column name, with column defaults applied (on the object too)."""
    values: dict[str, Any] = {}
    given = obj.__dict__
    for key, column in _columns(type(obj)):
        if key in given:
            value = given[key]
        elif column.default is not None:
            value = column.default.arg(None) if column.default.is_callable else column.default.arg
            setattr(obj, key, value)
        else:
            value = None
            setattr(obj, key, value)
        values[column.name] = value
    return values


def _as_loaded(session: Session, obj: Base) -> None:
    make_transient_to_detached(obj)
    session.add(obj)
    session.info.setdefault(_INSERTED, []).append(obj)


# session.info key: the objects `add_inserted` put in the session, in order.
_INSERTED = "mailloop.inserted"


def inserted_mark(session: Session) -> int:
    """A mark to give `take_back` when what follows may be rolled back to a savepoint."""
    return len(session.info.get(_INSERTED, ()))


def take_back(session: Session, mark: int) -> None:
    """Remove from the session the objects `add_inserted` put there since `mark`: after a rollback
    to a savepoint their rows are gone, but the session took them for loaded rows and keeps them
    (and the database may give their ids to new rows)."""
    inserted = session.info.get(_INSERTED, [])
    for obj in inserted[mark:]:
        if obj in session:
            session.expunge(obj)
    del inserted[mark:]


def append_many(session: Session, model: type[Base], rows: list[dict[str, Any]]) -> None:
    """Insert several rows of `model`'s table in one statement (executemany): their ids are not needed."""
    if rows:
        session.connection().execute(_insert(model), rows)
