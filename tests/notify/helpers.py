"""Small helpers shared by the notification tests."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from pipeline.config import Config
from pipeline.notify.send import Report, deliver
from pipeline.store.db import Store
from pipeline.store.models import Notification


def outbox(store: Store, *where) -> list[Notification]:
    with store.sessions() as s:
        # Recipients loaded with the rows: they are read after the session has ended.
        return list(s.scalars(select(Notification).options(selectinload(Notification.recipients))
                              .where(*where).order_by(Notification.id)))


def send_pending(store: Store, config: Config) -> Report:
    """What the notify task does with the rows a commit wrote: all pending rows, one batch."""
    ids = [n.id for n in outbox(store, Notification.status == "pending")]
    return deliver(store, config, ids)


def without_number(subject: str) -> str:
    """A subject as a careless client leaves it: tag and number gone."""
    return re.sub(r"\s+", " ", re.sub(r"\[?Ticket#T\d{8}\.\d+\]?", "", subject)).strip()
