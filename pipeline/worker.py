"""The Celery app of a mailloop fleet (D9): `celery -A worker worker`, `celery -A worker beat`.

The configuration is found as every command finds it (`$PIPELINE_CONFIG`, else
`./mailboxes.toml`); the broker is `CELERY_BROKER_URL`, else `[celery].broker_url`, else
the Redis URL. `$PIPELINE_MAILBOXES` (comma-separated) limits which mailboxes this
beat schedules — `pipeline run --mailbox` sets it. With `$PIPELINE_METRICS_PORT` the
worker serves Prometheus metrics for all its processes on that port, on 127.0.0.1 only
(the endpoint has no authentication) unless `$PIPELINE_METRICS_BIND` names another
address: 0.0.0.0 for every IPv4 interface, :: for every interface, or one of this machine's.
"""

from __future__ import annotations

import os
import sys
import tempfile

if os.environ.get("PIPELINE_METRICS_PORT") and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Must be set before prometheus_client is imported, in this process and the pool's.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mailloop-metrics-")

from celery import Celery

from pipeline.config import ConfigError, load_config
from pipeline.tasks.app import create_app


def _app_from_environment() -> Celery:
    try:
        config = load_config(None)
    except ConfigError as exc:
        # A worker with a broken configuration must say why in one line, not a traceback.
        sys.stderr.write(f"mailloop worker: error: {exc}\n")
        raise SystemExit(78) from None  # EX_CONFIG
    mailboxes = [m for m in os.environ.get("PIPELINE_MAILBOXES", "").split(",") if m]
    return create_app(config, mailboxes or None)


app = _app_from_environment()
