"""mailloop: a Celery-based mail-processing pipeline worker for managed service providers."""

__version__ = "0.1.0"
