"""`pipeline directory load FILE`: accounts, contacts, resources, queues, projects (D5).

TOML with `[[account]]`, `[[contact]]`, `[[resource]]`, `[[queue]]`, `[[project]]` tables,
or CSV with a header row naming the same fields plus a `kind` column (or a file named
after the kind, e.g. `contacts.csv`); list fields are separated by `;` in CSV.
Loading is an idempotent upsert keyed on name or e-mail address.
"""

from __future__ import annotations

import csv
import tomllib
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from pipeline.config import ConfigError, NumberingSettings
from pipeline.store.db import Store
from pipeline.store.models import Account, AccountDomain, Contact, Project, Queue, QueueMember, Resource, Task
from pipeline.store.numbers import allocate_number


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _email(value: str) -> str:
    value = value.strip().lower()
    if "@" not in value:
        raise ValueError(f"a mail address, got {value!r}")
    return value


class AccountRow(_Row):
    name: str = Field(min_length=1)
    domains: list[str] = []
    manager: str | None = None

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        return [d.strip().lower().lstrip("@") for d in v if d.strip()]


class ContactRow(_Row):
    email: str
    name: str = ""
    account: str
    notifications: bool = True

    @field_validator("email")
    @classmethod
    def _address(cls, v: str) -> str:
        return _email(v)


class ResourceRow(_Row):
    email: str
    name: str = ""
    roles: list[str] = []
    default_role: str | None = None

    @field_validator("email")
    @classmethod
    def _address(cls, v: str) -> str:
        return _email(v)


class QueueRow(_Row):
    name: str = Field(min_length=1)
    members: list[str] = []


class ProjectRow(_Row):
    name: str = Field(min_length=1)
    account: str
    tasks: list[str] = []


KINDS: dict[str, type[_Row]] = {"account": AccountRow, "contact": ContactRow, "resource": ResourceRow,
                                "queue": QueueRow, "project": ProjectRow}
_LIST_FIELDS = {"domains", "roles", "members", "tasks"}


def read_directory(path: Path) -> dict[str, list[_Row]]:
    """Validated rows by kind; a bad row is refused with file, row and field."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".csv":
        raw = _csv_rows(path, text)
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        unknown = [k for k in data if k not in KINDS]
        if unknown:
            raise ConfigError(f"{path}: unknown table [[{unknown[0]}]] (expected one of: {', '.join(KINDS)})")
        raw = [(kind, i + 1, row) for kind in KINDS for i, row in enumerate(data.get(kind, []))]
    out: dict[str, list[_Row]] = {k: [] for k in KINDS}
    for kind, where, row in raw:
        try:
            out[kind].append(KINDS[kind].model_validate(row))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or kind
            raise ConfigError(f"{path}: {kind} #{where}: {key}: {err['msg']}") from None
    return out


def _csv_rows(path: Path, text: str) -> list[tuple[str, int, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    stem = path.stem.lower().rstrip("s")
    rows = []
    for lineno, row in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        kind = (row.pop("kind", "") or stem).lower().rstrip("s")
        if kind not in KINDS:
            raise ConfigError(f"{path}:{lineno}: unknown kind {kind!r} (a `kind` column or a file named "
                              f"accounts.csv, contacts.csv, …; one of: {', '.join(KINDS)})")
        clean: dict[str, Any] = {}
        for k, v in row.items():
            if not v:
                continue  # an empty cell takes the default (or is another kind's column)
            if k in _LIST_FIELDS:
                clean[k] = [x.strip() for x in v.split(";") if x.strip()]
            elif k == "notifications":
                clean[k] = v.lower() not in ("false", "no", "0", "off")
            else:
                clean[k] = v
        rows.append((kind, lineno, clean))
    return rows


def load_directory(store: Store, path: Path, numbering: NumberingSettings) -> Counter[str]:
    """Upsert everything in the file in one transaction; returns counts by kind."""
    rows = read_directory(path)
    counts: Counter[str] = Counter()
    with store.transaction() as session:
        for r in rows["resource"]:  # first: accounts and queues refer to resources
            _upsert_resource(session, r)
        for r in rows["account"]:
            _upsert_account(session, r, path)
        for r in rows["contact"]:
            _upsert_contact(session, r, path)
        for r in rows["queue"]:
            _upsert_queue(session, r, path)
        for r in rows["project"]:
            _upsert_project(session, r, path, numbering)
        for kind, items in rows.items():
            counts[kind] = len(items)
    return counts


def _upsert_resource(session: Session, r: ResourceRow) -> None:
    res = session.scalar(select(Resource).where(Resource.email == r.email)) or Resource(email=r.email)
    res.name, res.roles = r.name, list(r.roles)
    res.default_role = r.default_role or (r.roles[0] if r.roles else None)
    session.add(res)
    session.flush()


def _resource_id(session: Session, email: str, path: Path, what: str) -> int:
    rid = session.scalar(select(Resource.id).where(Resource.email == email.lower()))
    if rid is None:
        raise ConfigError(f"{path}: {what}: no resource {email!r} (list it under [[resource]])")
    return rid


def _account(session: Session, name: str, path: Path, what: str) -> Account:
    acc = session.scalar(select(Account).where(Account.name == name))
    if acc is None:
        raise ConfigError(f"{path}: {what}: no account {name!r} (list it under [[account]])")
    return acc


def _upsert_account(session: Session, r: AccountRow, path: Path) -> None:
    acc = session.scalar(select(Account).where(Account.name == r.name)) or Account(name=r.name)
    acc.manager_id = _resource_id(session, r.manager, path, f"account {r.name!r}") if r.manager else None
    session.add(acc)
    session.flush()
    for domain in r.domains:
        owner = session.get(AccountDomain, domain)
        if owner is None:
            session.add(AccountDomain(domain=domain, account_id=acc.id))
        elif owner.account_id != acc.id:
            raise ConfigError(f"{path}: account {r.name!r}: domain {domain!r} already belongs to "
                              f"{owner.account.name!r}")


def _upsert_contact(session: Session, r: ContactRow, path: Path) -> None:
    acc = _account(session, r.account, path, f"contact {r.email!r}")
    c = session.scalar(select(Contact).where(Contact.email == r.email)) or Contact(email=r.email)
    c.name, c.account_id, c.notifications = r.name, acc.id, r.notifications
    session.add(c)


def _upsert_queue(session: Session, r: QueueRow, path: Path) -> None:
    q = session.scalar(select(Queue).where(Queue.name == r.name)) or Queue(name=r.name)
    session.add(q)
    session.flush()
    session.execute(delete(QueueMember).where(QueueMember.queue_id == q.id))
    for email in dict.fromkeys(m.lower() for m in r.members):
        session.add(QueueMember(queue_id=q.id, resource_id=_resource_id(session, email, path, f"queue {r.name!r}")))


def _upsert_project(session: Session, r: ProjectRow, path: Path, numbering: NumberingSettings) -> None:
    acc = _account(session, r.account, path, f"project {r.name!r}")
    now = datetime.now(timezone.utc)
    p = session.scalar(select(Project).where(Project.name == r.name))
    if p is None:
        p = Project(name=r.name, number=allocate_number(session, "project", numbering, now), account_id=acc.id)
    p.account_id = acc.id
    session.add(p)
    session.flush()
    existing = set(session.scalars(select(Task.title).where(Task.project_id == p.id)))
    for title in r.tasks:
        if title not in existing:
            session.add(Task(title=title, project_id=p.id, number=allocate_number(session, "task", numbering, now)))
            existing.add(title)
