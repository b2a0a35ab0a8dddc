#!/usr/bin/env python3
"""What one round trip to Redis and to PostgreSQL costs, back to back and between spells of work.

The pipeline makes about ten round trips per mail (bench/pipeline.py prints how many), each
one after a millisecond or so of Python work on the mail. A server that had nothing to do in
the meantime went idle, and waking it is part of the round trip's cost. This script measures
that cost on this machine: the same call back to back (the server kept busy), then after
1 and 5 ms of busy work in the client between calls (as the pipeline does it).

    python bench/round_trip.py [--calls 1500] [--gaps 0 1 5]

The loop guard's script call (one per mail) stands for Redis; `SELECT 1` on one open
connection stands for PostgreSQL. What the difference means for the targets is in
bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _spin(ms: float) -> None:
    """Keep this process busy (not asleep) for `ms` milliseconds, as parsing a mail does."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def per_call_ms(call: Callable[[int], object], calls: int, gap_ms: float) -> float:
    """Mean wall milliseconds of `call`, with `gap_ms` of work before each (not timed)."""
    timed = 0.0
    for i in range(calls):
        _spin(gap_ms)
        started = time.perf_counter()
        call(i)
        timed += time.perf_counter() - started
    return timed / calls * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1500, help="calls per measurement (default 1500)")
    ap.add_argument("--gaps", type=float, nargs="+", default=[0, 1, 5],
                    help="milliseconds of client work between calls (default: 0 1 5)")
    ap.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="a PostgreSQL to send SELECT 1 to (libpq URL)")
    args = ap.parse_args()

    import psycopg
    import redis

    from pipeline.dedup.loop_guard import LoopGuard

    client = redis.Redis.from_url(args.redis)
    prefix = f"mailloop-bench:{uuid.uuid4().hex}:"
    guard = LoopGuard(client, prefix)
    run = uuid.uuid4().hex[:8]

    def loop_guard_check(i: int) -> object:
        return guard.check(mailbox="support", sender=f"user-{run}-{i}@customer.example",
                           normalised_subject="printer down", at=1_700_000_000.0 + i, member=f"{run}-{i}",
                           limit=2, window_seconds=300)

    pg = psycopg.connect(args.pg, autocommit=True)

    def select_one(_i: int) -> object:
        return pg.execute("SELECT 1").fetchone()

    print(f"{'call':<28}" + "".join(f"{f'{g:g} ms work between':>24}" for g in args.gaps))
    try:
        for name, call in [("Redis: loop-guard check", loop_guard_check), ("PostgreSQL: SELECT 1", select_one)]:
            call(-1)  # connect and warm up outside the timing
            cells = [per_call_ms(call, args.calls, gap) for gap in args.gaps]
            print(f"{name:<28}" + "".join(f"{c:>21.3f} ms" for c in cells))
    finally:
        pg.close()
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)


if __name__ == "__main__":
    main()
