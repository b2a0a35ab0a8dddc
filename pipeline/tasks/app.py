"""The Celery app for a mailloop configuration (the fleet's entry point is pipeline/worker.py)."""

from __future__ import annotations

from celery import Celery

from pipeline.config import Config
from pipeline.tasks.policy import celery_settings

TASK_MODULES = ["pipeline.tasks.fetch", "pipeline.tasks.process", "pipeline.tasks.maintenance",
                "pipeline.tasks.notify", "pipeline.tasks.resolve_back"]


def create_app(config: Config, mailboxes: list[str] | None = None) -> Celery:
    """A Celery app with mailloop's queues, routes, limits and schedule for `config`."""
    app = Celery("mailloop", include=TASK_MODULES)
    app.conf.update(celery_settings(config, mailboxes))
    return app
