"""Prometheus metrics (D9, issue 8).

Counters and histograms are updated where the work happens — in worker processes — and
kept in prometheus_client's multiprocess directory (`PROMETHEUS_MULTIPROC_DIR`), so one
HTTP endpoint per machine reports the sum over its processes. Gauges that describe the
whole fleet (quarantine size, mail waiting, queue depth, last fetch per mailbox) are read
from the journal, Redis and the broker when the endpoint is scraped.

The endpoint has no authentication, so it listens on 127.0.0.1 unless told otherwise
(`pipeline run --metrics-bind`, `$PIPELINE_METRICS_BIND`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from datetime import datetime
from functools import cache
from typing import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.errors import CannotRun

log = logging.getLogger("pipeline.metrics")

MAILS = Counter("mailloop_mails", "Mails that reached an outcome, by mailbox and outcome.", ["mailbox", "outcome"])
LOOP_GUARD_DISCARDS = Counter("mailloop_loop_guard_discards", "Mails discarded by the loop guard.", ["mailbox"])
STAGE_SECONDS = Histogram("mailloop_stage_seconds", "Time spent in each stage per mail.", ["stage"],
                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
LAG_SECONDS = Histogram("mailloop_journal_to_written_seconds", "From the journal's received time to the outcome.",
                        ["mailbox"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
RETRIES = Counter("mailloop_task_retries", "Celery task retries (transient Redis, database or broker trouble).",
                  ["task"])
FETCHED = Counter("mailloop_fetched_mails", "Mails journaled by a fetch, by mailbox.", ["mailbox"])

# /metrics has no authentication: only this machine may scrape it unless an address is given.
DEFAULT_BIND = "127.0.0.1"


@cache
def stage_seconds(stage: str) -> Histogram:
    """The stage's own histogram child: `labels()` takes a lock and builds a key on every call,
    13 times a mail (bench/README.md, issue 10)."""
    return STAGE_SECONDS.labels(stage)


def mail_done(mailbox: str, outcome: str, reason: str | None, received_at: datetime | None,
              processed_at: datetime, imported: bool) -> None:
    MAILS.labels(mailbox, outcome).inc()
    if outcome == "discarded" and (reason or "").startswith("loop guard"):
        LOOP_GUARD_DISCARDS.labels(mailbox).inc()
    if received_at is not None and not imported:  # an import's time is the mail's own Date
        LAG_SECONDS.labels(mailbox).observe(max(0.0, (processed_at - received_at).total_seconds()))


class FleetCollector(Collector):
    """Gauges read at scrape time from the journal, Redis and the broker."""

    def __init__(self, read_status: Callable[[], object]) -> None:
        self.read_status = read_status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            status = self.read_status()
        except Exception as exc:  # the store or Redis down: say so with a gauge, don't fail the scrape
            log.warning("metrics: cannot read the fleet's status: %s", exc)
            up = GaugeMetricFamily("mailloop_status_up", "1 when the store and Redis could be read.")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("mailloop_status_up", "1 when the store and Redis could be read.")
        up.add_metric([], 1)
        yield up
        quarantine = GaugeMetricFamily("mailloop_quarantine_size", "Mails in quarantine.")
        quarantine.add_metric([], status.quarantine)
        yield quarantine
        waiting = GaugeMetricFamily("mailloop_journal_waiting", "Journaled mails without an outcome yet.")
        waiting.add_metric([], status.waiting)
        yield waiting
        depth = GaugeMetricFamily("mailloop_queue_depth", "Tasks waiting in each queue.", labels=["queue"])
        for queue, n in status.queues.items():
            if n is not None:
                depth.add_metric([queue], n)
        yield depth
        last = GaugeMetricFamily("mailloop_last_fetch_timestamp_seconds",
                                 "Unix time of the last successful fetch.", labels=["mailbox"])
        failing = GaugeMetricFamily("mailloop_mailbox_failing", "1 when the mailbox's last fetch failed.",
                                    labels=["mailbox"])
        for box in status.mailboxes:
            if box.last_fetch:
                last.add_metric([box.name], datetime.fromisoformat(box.last_fetch).timestamp())
            failing.add_metric([box.name], 1 if box.failing else 0)
        yield last
        yield failing


def bind_address(value: str) -> str:
    """`value` as an IP address to listen on; a one-line ValueError when it is not one.

    Only IP addresses: a host name could resolve to an address other than the one meant.
    """
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address: give 127.0.0.1, 0.0.0.0 (every IPv4 interface), "
                         ":: (every interface) or one address of this machine") from None


def endpoint(bind: str, port: int) -> str:
    """`address:port` as a person writes it: an IPv6 address in brackets."""
    return f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"


def serve(port: int, read_status: Callable[[], object], multiproc_dir: str | None = None,
          bind: str = DEFAULT_BIND) -> CollectorRegistry:
    """Serve /metrics on `bind`:`port`: the sum over this machine's processes plus the fleet gauges.

    Raises CannotRun (one line) when the address cannot be listened on: in use, or not this machine's.
    """
    from prometheus_client import multiprocess

    path = multiproc_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
    else:  # one process does all the work: its own counters are the whole story
        registry = REGISTRY
    registry.register(FleetCollector(read_status))
    try:
        start_http_server(port, addr=bind, registry=registry)
    except OSError as exc:
        raise CannotRun(f"cannot serve metrics on {endpoint(bind, port)}: {exc.strerror or exc}") from None
    log.info("metrics on %s/metrics", endpoint(bind, port))
    return registry
