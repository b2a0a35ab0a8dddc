#!/usr/bin/env python3
"""An IMAP fetch into the journal: mails/s and CPU per mail, against a real Dovecot.

Appends the realistic corpus (bench/make_corpus.py) to a private Dovecot's INBOX (the test
suite's helper, tests/sources/dovecot.py: own configuration, loopback ports), then runs one
`pipeline.sources.imap.fetch_once` pass into a fresh database — fetch, journal, move to
Processed; processing is left out (the process task's business) — in two ways, alternately:
each fetched batch journaled in one commit (`Sink.journal_many`, as the fetch task does), and
one mail a commit (a Sink without it).

    python bench/imap_fetch.py                       # 1,000 mails, PostgreSQL, two rounds
    python bench/imap_fetch.py --n 2000 --db sqlite --rounds 3

Needs Dovecot (`apt-get install -y dovecot-imapd dovecot-pop3d`, as scripts/test installs it)
and openssl; for PostgreSQL, a server that lets it create a database (`--pg-admin`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import pipeline as bench_pipeline  # noqa: E402  (after the path is set)


def fetch_run(mails: list[bytes], db: str, args, per_batch: bool) -> tuple[int, float, float]:
    """(mails journaled, mails/s, CPU ms a mail) of one fetch pass."""
    import redis

    from pipeline.process import MailProcessor
    from pipeline.sources.base import Sink
    from pipeline.sources.imap import fetch_once
    from pipeline.store.db import Store
    from tests.sources.conftest import PASSWORD_ENV, PASSWORDS, imap_source, write_config
    from tests.sources.dovecot import Dovecot

    for user, variable in PASSWORD_ENV.items():
        os.environ[variable] = PASSWORDS[user]
    dovecot = Dovecot(PASSWORDS).start()
    try:
        dovecot.append("support", mails)
        with bench_pipeline.scratch_database(db, args.pg_admin) as (url, workdir):
            config = write_config(workdir / "mailboxes.toml", url, f"mailloop-bench:{uuid.uuid4().hex}:",
                                  imap_source(dovecot), redis_url=args.redis)
            store = Store(config.database_url)
            store.upgrade()
            client = redis.Redis.from_url(args.redis)
            processor = MailProcessor(config, store, client)
            sink = Sink(processor.journal, lambda ids: None,
                        journal_many=processor.journal_many if per_batch else None)
            cpu, started = time.process_time(), time.perf_counter()
            result = fetch_once(config.mailbox("support"), config, store, client, sink)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            for key in client.scan_iter(match=f"{config.settings.redis.key_prefix}*"):
                client.delete(key)
            store.dispose()
    finally:
        dovecot.destroy()
    return result.journaled, result.journaled / elapsed, cpu / max(result.journaled, 1) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="mails in the INBOX (default 1000)")
    bench_pipeline.add_run_options(ap, both=False)
    ap.add_argument("--rounds", type=int, default=2, help="alternating pairs of runs (default 2)")
    args = ap.parse_args()

    size = max(args.n, 2000)
    mails = bench_pipeline.corpus(size, args.corpus / str(size))[:args.n]
    print(f"INBOX: {len(mails)} mails, {sum(map(len, mails)) / 2**20:.1f} MiB (bench/make_corpus.py); "
          f"one fetch pass (default fetch_batch) into {args.db}, without processing")
    for _ in range(args.rounds):
        for per_batch, label in ((False, "one mail a commit"), (True, "a batch a commit")):
            journaled, rate, cpu_ms = fetch_run(mails, args.db, args, per_batch)
            print(f"{label:<20} {journaled:5d} journaled  {rate:7.1f} mails/s   CPU {cpu_ms:.2f} ms a mail (this process)")


if __name__ == "__main__":
    main()
