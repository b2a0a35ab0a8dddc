"""Rows the pipeline only appends — timeline entries, notes, attachments, processed-mail marks,
outbox rows — written with Core inserts in the caller's transaction.

Nothing changes these rows in the transaction that writes them, so nothing needs them in the
ORM's identity map, and the unit of work is the costliest part of a mail: flushing one such
object costs about 0.4 ms of CPU, a Core insert 0.08 ms (bench/README.md, issue 10). Outside a
batch's first attempt on PostgreSQL (below), `append` inserts at once, so a later query in the
same transaction (or savepoint) sees the row, and a savepoint's rollback takes it back like any other.

A batch without savepoints holds back the rows nobody needs the id of (`append_later`: a
mail's timeline entries and processed-identity mark) and writes each table's rows in one
statement (`flush_appended`) instead of a round trip each: before it commits, before an
`append` to a table with rows held back, and before an ORM query reads such a table. Until
then the rows count as the mail's changes (`db.changes`), so a mail that fails after holding
one back is undone by running the batch again with savepoints, which writes at once.

Such a batch holds back the rows whose id it needs as well — a new ticket, a note, an outbox
row — with ids reserved ahead (`_reserved_id`): on PostgreSQL a batch's worth from the tables'
sequences in one round trip, the insert of each having been a round trip per mail
(bench/README.md, issue 10, session 21); on SQLite the ids past the table's highest, which the
batch alone can write while its BEGIN IMMEDIATE holds the write lock, until it inserts a row of
the table itself (session 22). Held rows are written in foreign-key order, and before
anything that needs them: a read of their table (through the ORM, or `write_held` before a Core
read), an ORM flush that updates one of them or inserts a row referring to their table
(`_held_rows_before_flush`), an immediate insert into their table or a child of it. A row that
another worker may write meanwhile (a new sender's contact) is not held: `add_new` asks at once
and waits for the other worker, where a held row refused would cost the batch a second run (a
PostgreSQL batch asks for all its new senders' contacts in one statement, `new_contacts`).
"""

from __future__ import annotations

from functools import cache
from itertools import chain
from typing import Any, Iterable, TypeVar

from sqlalchemy import Column, Connection, Insert, Select, Table, bindparam, event, func, insert, inspect, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import ORMExecuteState, Session, make_transient_to_detached
from sqlalchemy.sql.util import find_tables

from pipeline.store.db import count_change, counted_already
from pipeline.store.models import Base


@cache
def _insert(model: type[Base]) -> Insert:
    return insert(model.__table__)  # type: ignore[arg-type]


def append(session: Session, model: type[Base], **values: Any) -> int:
    """Insert one row of `model`'s table (now, or held back with an id reserved ahead); its new id."""
    # Rows of the table held without an id get theirs when written, after every id reserved now:
    # this one is written at once after them instead, so ids keep the order rows came in.
    if _holds_ids(session) and not any(held is model and "id" not in columns
                                       for held, columns in session.info[_PENDING]):
        row_id = _reserved_id(session, model)
        session.info[_HELD_IDS].setdefault(model.__table__, set()).add(row_id)
        append_later(session, model, id=row_id, **values)
        return row_id
    write_held(session, model)
    return session.connection().execute(_insert(model), values).inserted_primary_key[0]


def write_held(session: Session, *models: type[Base]) -> None:
    """Write the held-back rows of these tables and of the tables they refer to: before a Core
    read of them, or an immediate insert into them (ids in the order rows came)."""
    if session.info.get(_PENDING):
        _flush(session, {model.__table__ for model in models})
    _forget_reserved(session, models)


def _forget_reserved(session: Session, models: Iterable[type[Base]]) -> None:
    """On SQLite, the ids reserved for these tables and not used: the insert about to be made
    takes the table's highest id plus one, which may be one of them (the next reservation reads
    the highest again). A PostgreSQL sequence never hands out a reserved id twice."""
    reserved = session.info.get(_RESERVED)
    if reserved and session.get_bind().dialect.name != "postgresql":
        for model in models:
            reserved.pop(model, None)


# session.info keys: the rows `append_later` holds back, by model and columns, in order; the ids
# of the rows held back with a reserved id, by table (`_flush` forgets a table's when it writes
# them); the ids reserved ahead and not yet used, by model; how many mails the transaction has
# left to run (`mails_left`).
_PENDING = "mailloop.pending"
_HELD_IDS = "mailloop.held_ids"
_RESERVED = "mailloop.reserved_ids"
_LEFT = "mailloop.mails_left"


def hold_back_appends(session: Session) -> None:
    """From now on in this transaction, `append_later` holds its rows back until `flush_appended`
    (and on PostgreSQL, `append`, `add_inserted` and the child of `add_inserted_with` too)."""
    session.info[_PENDING] = {}
    session.info[_HELD_IDS] = {}
    session.info[_RESERVED] = {}


def holding_back(session: Session) -> bool:
    """Does this transaction hold rows back (a batch's first attempt)?"""
    return session.info.get(_PENDING) is not None


def mails_left(session: Session, n: int) -> None:
    """Tell the transaction how many of its mails are still to run, this one included: how many
    ids of a table to reserve when it needs one (a new ticket, an outbox row per mail is usual)."""
    session.info[_LEFT] = n


def _holds_ids(session: Session) -> bool:
    """Does this transaction hold back rows whose id it needs, with ids reserved ahead?"""
    return holding_back(session) and session.get_bind().dialect.name in ("postgresql", "sqlite")


_RESERVE = text("SELECT nextval(pg_get_serial_sequence(:table, 'id')) FROM generate_series(1, :n)")


def _reserved_id(session: Session, model: type[Base]) -> int:
    """An id for a new row of `model`'s table, from a reservation of one per mail left in the batch.

    On PostgreSQL what the batch does not use is a gap in the ids, which nothing reads meaning
    into. On SQLite the reservation is the ids past the highest written or held: no other
    connection can insert while the batch holds the write lock, and `write_held` forgets the
    reservation before the batch inserts a row of the table itself.
    """
    ids = session.info[_RESERVED].setdefault(model, [])
    if not ids:
        n = max(1, session.info.get(_LEFT, 1))
        conn = session.connection()
        if conn.dialect.name == "postgresql":
            ids.extend(reversed(conn.execute(_RESERVE, {"table": model.__tablename__, "n": n}).scalars().all()))
        else:
            table = model.__table__
            top = max(highest_id(conn, table), max(session.info[_HELD_IDS].get(table, ()), default=0))
            ids.extend(range(top + n, top, -1))
    return ids.pop()


def highest_id(conn: Connection, table: Table) -> int:
    """The table's highest id written so far (0 when empty): on SQLite, under the write lock, the ids
    past it are the transaction's to give."""
    return conn.execute(_highest_id(table)).scalar() or 0


@cache
def _highest_id(table: Table) -> Select:
    return select(func.max(table.c.id))


def append_later(session: Session, model: type[Base], **values: Any) -> None:
    """Append a row whose id nobody needs: held back if the transaction asked for it, else now."""
    pending = session.info.get(_PENDING)
    if pending is None:
        append(session, model, **values)
        return
    # By the set of columns, in whatever order they were named: one statement for all such rows, in order.
    pending.setdefault((model, tuple(sorted(values))), []).append(values)
    count_change(session)


def flush_appended(session: Session) -> None:
    """Write the rows held back, one statement (executemany) per table and set of columns."""
    if session.info.get(_PENDING):
        _flush(session, None)


def _flush(session: Session, tables: Iterable[Table] | None) -> None:
    """Write the held-back rows of `tables` and of the tables they refer to (all when None),
    parents before children."""
    pending = session.info[_PENDING]
    if tables is None:
        keys = list(pending)
    else:
        needed = set().union(*(_referred(table) for table in tables))
        keys = [key for key in pending if key[0].__table__ in needed]
    if not keys:
        return
    keys.sort(key=lambda key: _dependency_order()[key[0].__table__])
    groups = [(key[0], pending.pop(key)) for key in keys]
    held = session.info.get(_HELD_IDS)
    conn = session.connection()
    with counted_already(session):
        for model, rows in groups:
            if held:
                held.pop(model.__table__, None)
            conn.execute(_insert(model), rows)


@cache
def _dependency_order() -> dict[Table, int]:
    """Tables by foreign-key dependency: a row's parents are written before it."""
    return {table: i for i, table in enumerate(Base.metadata.sorted_tables)}


@cache
def _referred(table: Table) -> frozenset[Table]:
    """`table` and every table its rows refer to, directly or not."""
    found, todo = {table}, [table]
    while todo:
        for fk in todo.pop().foreign_keys:
            if fk.column.table not in found:
                found.add(fk.column.table)
                todo.append(fk.column.table)
    return frozenset(found)


@event.listens_for(Session, "do_orm_execute")
def _flush_before_reading(state: ORMExecuteState) -> None:
    """An ORM query of a table with rows held back sees them, as it would have had they been written."""
    pending = state.session.info.get(_PENDING)
    if pending and state.is_select:
        held = {model.__table__ for model, _ in pending}
        read = held.intersection(find_tables(state.statement, include_aliases=True, include_joins=True))
        if read:
            _flush(state.session, read)


@event.listens_for(Session, "before_flush")
def _held_rows_before_flush(session: Session, _context: Any, _instances: Any) -> None:
    """The unit of work's UPDATE of a held row, or INSERT of a row referring to a held table,
    finds the held rows written; its INSERT of a row into a table with ids reserved (SQLite)
    forgets the reservation, as `write_held` does."""
    if session.info.get(_RESERVED):
        _forget_reserved(session, {type(obj) for obj in session.new})
    pending = session.info.get(_PENDING)
    if not pending:
        return
    held_ids = session.info.get(_HELD_IDS) or {}
    held_tables = {model.__table__ for model, _ in pending}
    tables = set()
    for obj in chain(session.dirty, session.deleted):
        table = type(obj).__table__
        if getattr(obj, "id", None) in held_ids.get(table, ()):
            tables.add(table)
    for obj in session.new:
        table = type(obj).__table__
        if not held_tables.isdisjoint(_referred(table)):
            tables.add(table)
    if tables:
        _flush(session, tables)


Model = TypeVar("Model", bound=Base)


@cache
def _columns(model: type[Base]) -> tuple[tuple[str, Column], ...]:
    """(attribute key, column) of every mapped column but the primary key."""
    return tuple((a.key, a.columns[0]) for a in inspect(model).column_attrs if not a.columns[0].primary_key)


def add_inserted(session: Session, obj: Model) -> Model:
    """Insert a new object's row with a Core insert (`append`: held back in a PostgreSQL batch), then
    put the object in `session` as if loaded.

    For rows the transaction goes on changing (a new ticket, a new contact): they must be in the
    identity map, but the unit of work's insert costs five times a Core insert (bench/README.md,
    issue 10). Column defaults are applied here, so every attribute is loaded and reading one
    never goes back to the database; a later change is an ordinary UPDATE at the next flush.
    """
    obj.id = append(session, type(obj), **new_row(obj))
    as_loaded(session, obj)
    return obj


def add_new(session: Session, obj: Model, unique: str) -> Model | None:
    """`add_inserted`, unless a row with the same value in the `unique` column exists: then None, and
    nothing is written.

    For a row another transaction may create meanwhile (the same new sender in two workers'
    batches): a plain insert would fail and cost the whole batch a second run; this one waits for
    the other transaction, as the plain insert does, and on its commit writes nothing.
    """
    write_held(session, type(obj))
    statement = _insert_new(type(obj), unique, session.get_bind().dialect.name)
    row = session.connection().execute(statement, new_row(obj)).first()
    if row is None:
        return None
    obj.id = row[0]
    as_loaded(session, obj)
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
    four round trips (bench/README.md, issue 10). Elsewhere, and where a batch holds rows back, one
    insert after the other.
    `unless_exists` names the parent's unique column: when a row with its value exists (`add_new`),
    neither row is written and the answer is None. A SQLite batch holding its rows back holds the
    parent back too, without asking: the caller looked for it in this transaction, which has kept
    every other writer out since (were it there after all, the batch's flush fails and the batch
    runs again with savepoints, which ask).
    """
    dialect, holds_ids = session.get_bind().dialect.name, _holds_ids(session)
    if dialect != "postgresql" or holds_ids:
        # Held back, the child waits for the batch's end; the parent, if it may exist, is asked at
        # once — except on SQLite, where no other writer can have written it since the caller
        # looked in this transaction (its write lock is held from BEGIN IMMEDIATE).
        if unless_exists is None or (dialect == "sqlite" and holds_ids):
            add_inserted(session, parent)
        elif add_new(session, parent, unless_exists) is None:
            return None
        setattr(child, foreign_key, parent.id)
        return add_inserted(session, child)
    setattr(child, foreign_key, None)
    parent_row, child_row = new_row(parent), new_row(child)
    write_held(session, type(parent), type(child))
    params = {f"p_{k}": v for k, v in parent_row.items()}
    params.update({f"c_{k}": v for k, v in child_row.items() if k != foreign_key})
    statement = _insert_with(type(parent), type(child), foreign_key, unless_exists)
    row = session.connection().execute(statement, params).first()
    if row is None:  # the parent's row exists: nothing was written
        return None
    child.id, parent.id = row
    setattr(child, foreign_key, parent.id)
    as_loaded(session, parent)
    as_loaded(session, child)
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


def new_row(obj: Base) -> dict[str, Any]:
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


def held_objects(session: Session, model: type[Model]) -> list[Model]:
    """The objects of `model` whose rows the transaction holds back, oldest first."""
    held = (session.info.get(_HELD_IDS) or {}).get(model.__table__)
    if not held:
        return []
    return [obj for obj in session.info.get(_INSERTED, ()) if type(obj) is model and obj.id in held]


def as_loaded(session: Session, obj: Base) -> None:
    """Put a new object whose row is written (or held back) in `session`, as if loaded from it."""
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
    """Insert several rows of `model`'s table in one statement (executemany): their ids are not needed.
    Held back with the batch's other rows where it holds rows back."""
    if holding_back(session):
        for row in rows:
            append_later(session, model, **row)
    elif rows:
        write_held(session, model)
        session.connection().execute(_insert(model), rows)
