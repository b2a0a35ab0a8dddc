"""Structured logs: one JSON object per line, with the mail's Message-ID, mailbox and stage.

The mail being processed is kept in context variables that `MailProcessor` sets as
the mail moves through the stages; every log record made meanwhile — ours, Celery's,
a plug-in's — carries them. Workers log JSON by default (`PIPELINE_LOG_FORMAT=text`
for people reading a terminal).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Iterator

_mail: ContextVar[dict[str, Any] | None] = ContextVar("mailloop_mail", default=None)

FIELDS = ("journal_id", "mailbox", "message_id", "stage")


@contextmanager
def mail_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Log records made inside carry these fields; update the yielded dict as more is known."""
    current = {k: None for k in FIELDS} | fields
    token = _mail.set(current)
    try:
        yield current
    finally:
        _mail.reset(token)


def update_mail_context(**fields: Any) -> None:
    current = _mail.get()
    if current is not None:
        current.update(fields)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        data.update(_mail.get() or {k: None for k in FIELDS})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def configure(level: int = logging.INFO, fmt: str | None = None) -> None:
    """Send every log record to stderr as JSON (or text), replacing handlers set before."""
    fmt = fmt or os.environ.get("PIPELINE_LOG_FORMAT", "json")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
