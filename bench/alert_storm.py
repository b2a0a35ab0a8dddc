#!/usr/bin/env python3
"""An RMM alert storm through the Celery fleet: time to drain, tickets opened, peak worker memory.

10,000 Datto-RMM-style alert mails (by default) for DEVICES devices × TYPES monitors land
in a Maildir at once, as a flood from a misbehaving site does; one fetch journals them
and real `celery -A pipeline.worker worker` processes drain them on PostgreSQL and a Redis
broker. The RMM stage claims each alert (exempt from the loop guard) and keeps one ticket
per device and monitor with a repeat count, so the storm must end in DEVICES × TYPES
tickets.

    python bench/alert_storm.py [--alerts 10000] [--devices 20] [--types 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.fleet import _fresh, _lags, _pct, _stop, _wait_done, _workers, smtp_sink  # noqa: E402
from bench.pipeline import PG_ADMIN_URL, REDIS_URL  # noqa: E402

MONITORS = ["Disk Usage Monitor", "CPU Monitor", "Memory Monitor", "Service Monitor - Spooler",
            "Event Log Monitor", "Patch Monitor", "Antivirus Monitor", "Online Status Monitor"]

ALERT = """Date: Thu, 26 Nov 2026 03:{minute:02d}:{second:02d} +0000
From: Datto RMM <noreply@merlot.centrastage.net>
To: support@acme-helpdesk.example
Message-ID: <storm.{i}@merlot-mailer-3.centrastage.net>
Subject: Alert: {monitor} - {device} - Priority: High
MIME-Version: 1.0
Content-Type: text/plain; charset=UTF-8
Auto-Submitted: auto-generated

An alert has been raised on a device in your account.

Site: {site}
Device: {device}
Alert: {monitor} - threshold exceeded (sample {i})
Priority: High
Alert UID: {i:08d}-9b2d-4e85-a6c4-1d0f3b5e7a92
"""


def storm(alerts: int, devices: int, types: int) -> list[bytes]:
    sites = ["Contoso", "Fabrikam"]
    return [ALERT.format(i=i, minute=(i // 60) % 60, second=i % 60, monitor=MONITORS[i % types],
                         device=f"SRV{(i // types) % devices:03d}", site=sites[i % 2]).encode()
            for i in range(alerts)]


def peak_rss_mb(root_pid: int) -> float:
    """The largest VmHWM (peak resident set) among the worker's processes, in MB."""
    peak = 0
    pids = [root_pid]
    while pids:
        pid = pids.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
        pids.extend(int(c) for c in children)
    return peak / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alerts", type=int, default=10_000)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--types", type=int, default=5, choices=range(1, len(MONITORS) + 1))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--redis", default=REDIS_URL)
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/14", help="flushed before the run")
    ap.add_argument("--pg-admin", default=PG_ADMIN_URL)
    args = ap.parse_args()

    from celery import Celery
    from sqlalchemy import func, select

    from pipeline.store.models import Ticket

    mails = storm(args.alerts, args.devices, args.types)
    sink = smtp_sink(args)
    with tempfile.TemporaryDirectory(prefix="mailloop-storm-") as tmp:
        workdir = Path(tmp)
        config_path, config, store, drop = _fresh(
            args, workdir, mailbox_extra='parser_stages = ["datto_rmm", "ticket_number", "reply_reference"]\n')
        for i, raw in enumerate(mails):
            (workdir / "maildir" / "new" / f"{1764100000 + i}.M{i}P1.storm").write_bytes(raw)
        Celery(broker=args.broker).connection().default_channel.client.flushdb()
        worker = _workers(config_path, args.broker, args.workers, workdir / "worker.log")
        try:
            time.sleep(3)  # the workers connect
            started = time.perf_counter()
            Celery(broker=args.broker).send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"],
                                                 queue="fetch")
            _wait_done(store, len(mails), 1800)
            drained = time.perf_counter() - started
            rss = peak_rss_mb(worker.pid)
            lags, _, _ = _lags(store)
            with store.sessions() as s:
                tickets = s.scalar(select(func.count()).select_from(Ticket))
                repeats = s.scalar(select(func.coalesce(func.sum(Ticket.alert_repeat_count), 0)))
        finally:
            _stop(worker)
            store.dispose()
            drop()
    sink.stop()
    expected = min(args.alerts, args.devices * args.types)
    print(f"{args.alerts} alerts, {args.devices} devices × {args.types} monitors, {args.workers} worker process(es)")
    print(f"drained in {drained:.1f} s ({args.alerts / drained:.0f} alerts/s, including the fetch); "
          f"lag p50 {_pct(lags, .5):.0f} ms, p99 {_pct(lags, .99):.0f} ms")
    print(f"tickets opened: {tickets} (expected {expected}); repeats counted: {repeats} "
          f"(expected {args.alerts - expected})")
    print(f"peak resident memory of a worker process: {rss:.0f} MB")


if __name__ == "__main__":
    main()
