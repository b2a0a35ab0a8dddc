#!/usr/bin/env python3
"""The loop guard (D1.5.2) on the local Redis: checks per second, one client and several.

Each check is what the pipeline does per mail: one atomic script call counting the mail
in its sender + subject window. Keys spread over many senders, as real traffic does;
every tenth check repeats a hot key, as an auto-reply loop does.

    python bench/loop_guard.py [--checks 50000] [--processes 1 2 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _run(redis_url: str, prefix: str, checks: int, worker: int, out: mp.Queue) -> None:
    import redis

    from pipeline.dedup.loop_guard import LoopGuard

    guard = LoopGuard(redis.Redis.from_url(redis_url), prefix)
    now = time.time()
    admitted = 0
    started = time.perf_counter()
    for i in range(checks):
        sender = "loop@auto.example" if i % 10 == 0 else f"user{worker}-{i}@customer.example"
        decision = guard.check(mailbox="support", sender=sender, normalised_subject="printer down",
                               at=now + i * 0.001, member=f"{worker}-{i}", limit=2, window_seconds=300)
        admitted += decision.admitted
    out.put((checks / (time.perf_counter() - started), admitted))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checks", type=int, default=50_000, help="checks per process")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = ap.parse_args()

    import redis

    client = redis.Redis.from_url(args.redis)
    for n in args.processes:
        prefix = f"mailloop-bench:{uuid.uuid4().hex}:"
        out: mp.Queue = mp.Queue()
        procs = [mp.Process(target=_run, args=(args.redis, prefix, args.checks, w, out)) for w in range(n)]
        started = time.perf_counter()
        for p in procs:
            p.start()
        results = [out.get() for _ in procs]
        wall = time.perf_counter() - started
        for p in procs:
            p.join()
        total = n * args.checks
        admitted = sum(a for _, a in results)
        print(f"{n} process(es): {total / wall:9.0f} checks/s in all, "
              f"{sum(r for r, _ in results) / n:8.0f} per process, "
              f"{wall / total * 1e3 * n:.3f} ms per check (wall, per process); "
              f"the looping sender admitted {admitted - (total - total // 10)} time(s) across all (limit 2)")
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)


if __name__ == "__main__":
    main()
