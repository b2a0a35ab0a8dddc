"""Entry point for `celery -A worker worker` and `celery -A worker beat` (see pipeline/worker.py)."""

from pipeline.worker import app

__all__ = ["app"]
