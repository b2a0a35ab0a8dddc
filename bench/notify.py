"""Sending the outbox: CPU per notification, and where it goes, over real SMTP.

The in-process pipeline first writes the corpus's tickets, each with its ticket_created
notification in the outbox (PostgreSQL, or SQLite); then `pipeline.notify.send.deliver`
sends them in batches of `--batch`, as the notify task does, over one SMTP connection per
batch to an aiosmtpd sink running in another process (so that its CPU is not counted here).
Printed: CPU and wall time per notification in this process, and the CPU of each part —
claiming the rows, building each message, `smtplib`'s `send_message` (flattening the MIME
tree and the SMTP dialogue) and the sent mark written after each send.

    python bench/notify.py                     # 1,000 notifications, PostgreSQL
    python bench/notify.py --n 2000 --db sqlite --batch 50
"""

from __future__ import annotations

import argparse
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import portpicker

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import pipeline as bench_pipeline  # noqa: E402  (after the path is set)

SINK = """
import sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Sink
Controller(Sink(), hostname="127.0.0.1", port=int(sys.argv[1])).start()
print("ready", flush=True)
time.sleep(3600)
"""


class _CpuOf:
    """CPU seconds spent in some functions, by label (process time, wrapped around each call)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.process_time() - started

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="notifications (one per corpus mail; default 1000)")
    bench_pipeline.add_run_options(ap, both=False)
    ap.add_argument("--batch", type=int, default=50, help="notifications per deliver() call (default 50)")
    args = ap.parse_args()

    port = portpicker.pick_unused_port()
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        mails = bench_pipeline.corpus(max(args.n, 2000), args.corpus / str(max(args.n, 2000)))[:args.n]
        with bench_pipeline.scratch_database(args.db, args.pg_admin) as (url, workdir):
            bench_pipeline.CONFIG = bench_pipeline.CONFIG.replace(
                "[[mailbox]]", f'[smtp]\nhost = "127.0.0.1"\nport = {port}\n\n[[mailbox]]', 1)
            bench_pipeline.pipeline_run(mails, url, args.redis, workdir, False, 50)
            report(args, workdir / "mailboxes.toml")
    finally:
        sink.kill()


def report(args, config_path: Path) -> None:
    from sqlalchemy import select

    from pipeline.config import load_config
    from pipeline.notify import send
    from pipeline.store.db import Store
    from pipeline.store.models import Notification

    config = load_config(config_path)
    store = Store(config.database_url)
    with store.sessions() as session:
        ids = list(session.scalars(select(Notification.id).where(Notification.status == "pending")
                                  .order_by(Notification.id)))
    parts = _CpuOf()
    parts.wrap(send, "claim", "claim the rows")
    parts.wrap(send, "build_message", "build each message")
    parts.wrap(smtplib.SMTP, "send_message", "smtplib send_message")
    parts.wrap(send.SentMarks, "__call__", "sent mark")
    sent = 0
    cpu_started, started = time.process_time(), time.perf_counter()
    for start in range(0, len(ids), args.batch):
        sent += len(send.deliver(store, config, ids[start:start + args.batch]).sent)
    cpu, wall = time.process_time() - cpu_started, time.perf_counter() - started
    store.dispose()
    print(f"outbox: {len(ids)} notifications ({args.db}), {sent} sent in batches of {args.batch} "
          "to an SMTP sink in another process")
    print(f"deliver: CPU {cpu / sent * 1000:.3f} ms per notification (this process), "
          f"wall {wall / sent * 1000:.3f} ms; {sent / wall:.1f} notifications/s")
    for label, seconds in parts.seconds.items():
        print(f"  {label:<24} CPU {seconds / sent * 1000:.3f} ms per notification")


if __name__ == "__main__":
    main()
