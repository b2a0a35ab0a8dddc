#!/usr/bin/env python3
"""`pipeline import` of a backlog: mails/s for the whole command, as an operator runs it.

Writes the realistic corpus (bench/make_corpus.py) as a folder of .eml files, then runs
`pipeline --config … import --mailbox support FOLDER` in a child process against a fresh
SQLite file and a fresh PostgreSQL database (the local Redis for the loop guard), and prints
the mails per second of the whole command (start-up included), the CPU it used per mail, and
its summary line.

    python bench/import_backlog.py                  # 2,000 mails, SQLite and PostgreSQL
    python bench/import_backlog.py --n 10000 --db postgresql
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import pipeline as bench_pipeline  # noqa: E402  (after the path is set)


def run_import(mails: list[bytes], db_url: str, redis_url: str, workdir: Path) -> dict:
    from pipeline.config import load_config
    from pipeline.store.db import Store
    from pipeline.store.directory import load_directory

    config_path = workdir / "mailboxes.toml"
    config_path.write_text(bench_pipeline.CONFIG.format(db=db_url, redis=redis_url,
                                                        prefix=f"mailloop-bench:{os.getpid()}:{time.time_ns()}:"),
                           encoding="utf-8")
    (workdir / "directory.toml").write_text(bench_pipeline.DIRECTORY, encoding="utf-8")
    config = load_config(config_path)
    store = Store(config.database_url)
    store.upgrade()
    load_directory(store, workdir / "directory.toml", config.settings.numbering)
    store.dispose()
    backlog = workdir / "backlog"
    backlog.mkdir()
    for i, raw in enumerate(mails):
        (backlog / f"{i:06d}.eml").write_bytes(raw)

    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--config", str(config_path), "import",
                           "--mailbox", "support", str(backlog)], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline import failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    summary = next((line for line in proc.stderr.splitlines() if line.startswith("imported ")), "")
    return {"rate": len(mails) / elapsed, "elapsed": elapsed, "cpu_ms": cpu / len(mails) * 1000,
            "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="mails in the backlog (default 2000)")
    bench_pipeline.add_run_options(ap, both=True)
    args = ap.parse_args()

    mails = bench_pipeline.corpus(args.n, args.corpus / str(args.n))
    print(f"backlog: {len(mails)} mails, {sum(map(len, mails)) / 2**20:.1f} MiB (bench/make_corpus.py), "
          "as a folder of .eml files")
    for db in ["sqlite", "postgresql"] if args.db == "both" else [args.db]:
        with bench_pipeline.scratch_database(db, args.pg_admin) as (url, workdir):
            r = run_import(mails, url, args.redis, workdir)
        print(f"pipeline import, {db:<10} {r['rate']:7.1f} mails/s  ({r['elapsed']:.1f} s in all, start-up "
              f"included; CPU {r['cpu_ms']:.2f} ms per mail)  {r['summary']}")


if __name__ == "__main__":
    main()
