#!/usr/bin/env python3
"""The Celery fleet (Redis broker, PostgreSQL) on the realistic corpus: mails/s and lag.

Two measurements, each with real `celery -A pipeline.worker worker` processes:

1. **burst**: the corpus dropped into a Maildir, one fetch task; mails/s from the first
   journal write to the last outcome, and p50/p99 journal-to-written lag, at 1, 2 and
   4 worker processes;
2. **steady**: mails journaled at a steady offered rate (default 150 mails/s, as an
   SMTP intake or MTA pipe would), each handed to the process queue at once; the
   achieved rate and p50/p99 journal-to-written lag.

    python bench/fleet.py [--n 2000] [--workers 1 2 4] [--rate 150] [--steady-seconds 20]
    python bench/fleet.py --source imap --workers 2 --steady-seconds 0   # the burst fetched over IMAP

Needs the local Redis (broker db 14 by default, loop guard) and PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.pipeline import CONFIG as PIPELINE_CONFIG  # noqa: E402
from bench.pipeline import CORPUS_DIR, DIRECTORY, PG_ADMIN_URL, REDIS_URL, _pg_database, corpus  # noqa: E402
from pipeline.tasks.policy import COALESCE_SECONDS  # noqa: E402

# The in-process benchmark's configuration, with the Maildir the burst is dropped into.
CONFIG = PIPELINE_CONFIG.replace("[[mailbox]]", """[smtp]
host = "127.0.0.1"
port = {smtp_port}

[[mailbox]]""") + """
[mailbox.source]
kind = "maildir"
path = "{maildir}"
poll_seconds = 3600
"""


def _workers(config: Path, broker: str, processes: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PIPELINE_CONFIG": str(config), "CELERY_BROKER_URL": broker,
           "PIPELINE_LOG_FORMAT": "text"}
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "pipeline.worker", "worker", "-Q",
                             "fetch,process,notify,maintenance", "--concurrency", str(processes),
                             "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                             "-n", f"bench-{uuid.uuid4().hex[:6]}@%h"],
                            env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _cpu(worker_sid: int) -> dict[str, float]:
    """CPU seconds used so far, by part: the worker processes (the worker's session), PostgreSQL's
    processes, Redis, and this script (the feeder and the SMTP sink)."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {"workers": 0.0, "postgres": 0.0, "redis": 0.0, "bench": 0.0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if int(fields[3]) == worker_sid:
            used["workers"] += seconds
        elif comm.startswith("postgres"):
            used["postgres"] += seconds
        elif comm.startswith("redis-server"):
            used["redis"] += seconds
        elif int(pid) == os.getpid():
            used["bench"] += seconds
    return used


def _cpu_line(before: dict[str, float], after: dict[str, float], mails: int, elapsed: float) -> str:
    per_mail = {k: (after[k] - before[k]) / mails * 1000 for k in before}
    total = sum(per_mail.values())
    return ("  CPU per mail: " + ", ".join(f"{k} {v:.1f} ms" for k, v in per_mail.items())
            + f"; {total:.1f} ms in all, {total * mails / 1000 / elapsed:.2f} of the {os.cpu_count()} cores busy")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def _lags(store, since_id: int = 0) -> tuple[list[float], float, float]:
    from sqlalchemy import select

    from pipeline.store.models import JournalEntry

    with store.sessions() as s:
        rows = s.execute(select(JournalEntry.received_at, JournalEntry.processed_at)
                         .where(JournalEntry.id > since_id)).all()
    lags = sorted((p - r).total_seconds() for r, p in rows if p is not None)
    first = min(r for r, _ in rows).timestamp()
    last = max(p for _, p in rows if p is not None).timestamp()
    return lags, first, last


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def _fresh(args, workdir: Path, mailbox_extra: str = "", source: dict | None = None):
    """A new PostgreSQL database, configuration and directory; returns (config path, config, store, drop).

    `mailbox_extra`: more keys for the mailbox's table (e.g. its parser stages); `source`: the
    mailbox's source table instead of the Maildir under `workdir`."""
    from pipeline.config import load_config
    from pipeline.store.db import Store
    from pipeline.store.directory import load_directory

    url, drop = _pg_database(args.pg_admin)
    maildir = workdir / "maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    config_path = workdir / "mailboxes.toml"
    text = CONFIG.format(db=url, redis=args.redis, prefix=f"mailloop-bench:{uuid.uuid4().hex}:",
                         maildir=maildir, smtp_port=args.smtp_port)
    if source is not None:
        maildir_source = text[text.index("[mailbox.source]"):]
        text = text.replace(maildir_source, "[mailbox.source]\n" + "".join(
            f"{key} = {json.dumps(value)}\n" for key, value in source.items()))
    address = 'address = "support@acme-helpdesk.example"\n'
    config_path.write_text(text.replace(address, address + mailbox_extra, 1), encoding="utf-8")
    (workdir / "directory.toml").write_text(DIRECTORY, encoding="utf-8")
    config = load_config(config_path)
    store = Store(config.database_url)
    store.upgrade()
    load_directory(store, workdir / "directory.toml", config.settings.numbering)
    return config_path, config, store, drop


def _wait_done(store, total: int, timeout: float) -> None:
    from sqlalchemy import func, select

    from pipeline.store.models import JournalEntry

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with store.sessions() as s:
            done = s.scalar(select(func.count()).select_from(JournalEntry).where(JournalEntry.outcome.is_not(None)))
        if done >= total:
            return
        time.sleep(0.2)
    raise SystemExit(f"not done after {timeout}s: {done}/{total}")


def burst(args, mails: list[bytes], processes: int) -> None:
    from celery import Celery

    with tempfile.TemporaryDirectory(prefix="mailloop-fleet-") as tmp, _imap_server(args, mails) as source:
        workdir = Path(tmp)
        config_path, config, store, drop = _fresh(args, workdir, source=source)
        if source is None:
            for i, raw in enumerate(mails):
                (workdir / "maildir" / "new" / f"{1764000000 + i}.M{i}P1.bench").write_bytes(raw)
        broker = args.broker
        Celery(broker=broker).connection().default_channel.client.flushdb()
        worker = _workers(config_path, broker, processes, workdir / "worker.log")
        try:
            time.sleep(3)  # the workers connect
            app = Celery(broker=broker)
            cpu_before, started = _cpu(worker.pid), time.perf_counter()
            app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"], queue="fetch")
            _wait_done(store, len(mails), 600)
            cpu = _cpu_line(cpu_before, _cpu(worker.pid), len(mails), time.perf_counter() - started)
            lags, first, last = _lags(store)
        finally:
            _stop(worker)
            store.dispose()
            drop()
    print(f"burst, {processes} worker process(es){', IMAP' if args.source == 'imap' else ''}: "
          f"{len(mails) / (last - first):7.1f} mails/s   "
          f"lag p50 {_pct(lags, .5):8.0f} ms  p99 {_pct(lags, .99):8.0f} ms  (the whole backlog waits in line)")
    print(cpu)


def steady(args, mails: list[bytes], processes: int) -> None:
    from celery import Celery

    from pipeline.process import MailProcessor, connect_redis
    from pipeline.tasks.policy import PROCESS_BATCH
    from pipeline.tasks.process import Coalescer

    with tempfile.TemporaryDirectory(prefix="mailloop-fleet-") as tmp:
        workdir = Path(tmp)
        config_path, config, store, drop = _fresh(args, workdir)
        broker = args.broker
        Celery(broker=broker).connection().default_channel.client.flushdb()
        worker = _workers(config_path, broker, processes, workdir / "worker.log")
        processor = MailProcessor(config, store, connect_redis(config.redis_url))
        app = Celery(broker=broker)
        total = int(args.rate * args.steady_seconds)
        try:
            time.sleep(3)
            cpu_before, started = _cpu(worker.pid), time.perf_counter()
            # As the SMTP intake hands mail over: journaled one by one, enqueued in batches of up
            # to 50 ids that wait for company (pipeline.tasks.process.Coalescer, COALESCE_SECONDS).
            enqueue = Coalescer(lambda ids: app.send_task("pipeline.tasks.process.process_batch", args=[ids],
                                                          queue="process"), PROCESS_BATCH, args.coalesce)
            for i in range(total):
                due = started + i / args.rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                enqueue([processor.journal("support", mails[i % len(mails)].replace(
                    b"Message-ID: <", f"Message-ID: <steady{i}.".encode(), 1))])
            enqueue.flush()
            offered = total / (time.perf_counter() - started)
            _wait_done(store, total, 600)
            cpu = _cpu_line(cpu_before, _cpu(worker.pid), total, time.perf_counter() - started)
            lags, first, last = _lags(store)
        finally:
            _stop(worker)
            store.dispose()
            drop()
    print(f"steady {args.rate:.0f}/s offered, ids coalesced for up to {args.coalesce * 1000:.0f} ms ({offered:.0f}/s achieved by the feeder), {processes} worker "
          f"process(es): {total / (last - first):7.1f} mails/s   lag p50 {_pct(lags, .5):6.0f} ms  "
          f"p99 {_pct(lags, .99):6.0f} ms")
    print(cpu)


@contextmanager
def _imap_server(args, mails: list[bytes]) -> Iterator[dict | None]:
    """With `--source imap`: a private Dovecot (the suite's tests/sources/dovecot.py) holding the
    corpus in its INBOX; yields the mailbox's source table (None for the Maildir)."""
    if args.source != "imap":
        yield None
        return
    from tests.sources.conftest import PASSWORD_ENV, PASSWORDS, imap_source
    from tests.sources.dovecot import Dovecot

    os.environ[PASSWORD_ENV["support"]] = PASSWORDS["support"]  # the workers inherit it
    dovecot = Dovecot(PASSWORDS).start()
    try:
        dovecot.append("support", mails)
        yield imap_source(dovecot, idle=False)
    finally:
        dovecot.destroy()


def smtp_sink(args):
    """Every new ticket sends a notification: a real SMTP server takes them, as in production.
    Sets `args.smtp_port`; returns the running aiosmtpd controller (stop it when done)."""
    import socket

    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Sink

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        args.smtp_port = probe.getsockname()[1]
    sink = Controller(Sink(), hostname="127.0.0.1", port=args.smtp_port)
    sink.start()
    return sink


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--corpus", type=Path, default=CORPUS_DIR)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4], help="burst runs (none: only the steady run)")
    ap.add_argument("--source", choices=["maildir", "imap"], default="maildir",
                    help="where the burst waits: a Maildir (default), or the INBOX of a private Dovecot "
                         "(apt-get install dovecot-imapd) fetched over IMAP")
    ap.add_argument("--rate", type=float, default=150.0, help="offered load of the steady run, mails/s")
    ap.add_argument("--steady-seconds", type=float, default=20.0, help="0: no steady run")
    # As the README says to run it: Celery's default, one worker process per core.
    ap.add_argument("--steady-workers", type=int, default=os.cpu_count() or 2,
                    help="worker processes of the steady run (default: one per core, Celery's default)")
    ap.add_argument("--coalesce", type=float, default=COALESCE_SECONDS,
                    help=f"how long the steady feeder's ids wait for company (default {COALESCE_SECONDS} s, as the intake)")
    ap.add_argument("--redis", default=REDIS_URL)
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/14", help="flushed before each run")
    ap.add_argument("--pg-admin", default=PG_ADMIN_URL)
    args = ap.parse_args()

    mails = corpus(args.n, args.corpus / str(args.n))
    sink = smtp_sink(args)
    print(f"corpus: {len(mails)} mails; PostgreSQL store, Redis broker ({args.broker}), "
          f"notifications to an SMTP sink on :{args.smtp_port}")
    for processes in args.workers:
        burst(args, mails, processes)
    if args.rate > 0 and args.steady_seconds > 0:
        steady(args, mails, args.steady_workers)
    sink.stop()


if __name__ == "__main__":
    main()
