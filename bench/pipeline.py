#!/usr/bin/env python3
"""The in-process pipeline (journal → written) on the realistic corpus, next to bare mail-parser.

Prints mails/s for: bare `mailparser.parse_from_bytes` over the same mails, and
mailloop's whole pipeline — journal commit, every stage, the write transaction with its
outbox rows — on SQLite and on PostgreSQL, in one process (one core), in one run. The
ratio pipeline/mail-parser is the headline: how much of a core the rest of the work
costs beyond parsing.

    python bench/pipeline.py                 # 2,000 mails, SQLite and PostgreSQL
    python bench/pipeline.py --n 10000 --db postgresql --profile
    python bench/pipeline.py --db sqlite --batch 50 --stages   # where a mail's time goes
    python bench/pipeline.py --db postgresql --batch 50 --statements   # what waits on the server
    python bench/pipeline.py --senders known   # every sender a contact already, as most are at an MSP

Needs the local Redis (loop guard) and, for PostgreSQL, a server that lets it create a
database (`--pg-admin`, default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import os
import statistics
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

# Where every bench finds its corpus and services unless told otherwise (`add_run_options`).
CORPUS_DIR = Path(tempfile.gettempdir()) / "mailloop-bench-corpus"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

CONFIG = """
[database]
url = "{db}"

[redis]
url = "{redis}"
key_prefix = "{prefix}"

[[mailbox]]
name = "support"
address = "support@acme-helpdesk.example"

[mailbox.ticket_defaults]
queue = "Service Desk"
"""

DIRECTORY = """
[[resource]]
email = "tom@acme-helpdesk.example"
name = "Tom Tech"
roles = ["Engineer"]

[[queue]]
name = "Service Desk"
members = ["tom@acme-helpdesk.example"]

[[account]]
name = "Contoso"
domains = ["contoso.example"]

[[account]]
name = "Fabrikam"
domains = ["fabrikam.example"]
"""


def corpus(n: int, out: Path) -> list[bytes]:
    eml = out / "eml"
    if not eml.is_dir() or len(list(eml.iterdir())) != n:
        subprocess.run([sys.executable, str(HERE / "make_corpus.py"), "--out", str(out), "--n", str(n)],
                       check=True, stdout=subprocess.DEVNULL)
    return [p.read_bytes() for p in sorted(eml.iterdir())]


def bare_mailparser(mails: list[bytes]) -> float:
    import mailparser

    started = time.perf_counter()
    for raw in mails:
        mailparser.parse_from_bytes(raw)
    return len(mails) / (time.perf_counter() - started)


def pipeline_run(mails: list[bytes], db_url: str, redis_url: str, workdir: Path, profile: bool,
                 batch: int, known_senders: bool = False) -> dict:
    import redis

    from pipeline.config import load_config
    from pipeline.process import MailProcessor
    from pipeline.store.db import Store
    from pipeline.store.directory import load_directory

    prefix = f"mailloop-bench:{uuid.uuid4().hex}:"
    config_path = workdir / "mailboxes.toml"
    config_path.write_text(CONFIG.format(db=db_url, redis=redis_url, prefix=prefix), encoding="utf-8")
    (workdir / "directory.toml").write_text(DIRECTORY, encoding="utf-8")
    config = load_config(config_path)
    store = Store(config.database_url)
    store.upgrade()
    load_directory(store, workdir / "directory.toml", config.settings.numbering)
    if known_senders:
        _known_senders(store, mails)
    client = redis.Redis.from_url(redis_url)
    processor = MailProcessor(config, store, client)

    outcomes: dict[str, int] = {}
    per_mail: list[float] = []
    statements = _count_statements()
    profiler = _profiler() if profile else None
    stages_before = _stage_seconds()
    started, cpu_started = time.perf_counter(), time.process_time()
    for start in range(0, len(mails), batch):
        chunk = mails[start:start + batch]
        t0 = time.perf_counter()
        if batch == 1:
            results = [processor.ingest("support", chunk[0])]
        else:  # as a fetch and a process task do it: one journal commit, then one processing transaction
            results = processor.process_many(processor.journal_many("support", [(raw, None) for raw in chunk]))
        per_mail.append((time.perf_counter() - t0) / len(chunk))
        for result in results:
            outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    statements.remove()
    if profiler is not None:
        profiler.stop()
        print(profiler.output_text(unicode=True, color=False, show_all=False), file=sys.stderr)
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)
    store.dispose()
    per_mail.sort()
    stages = {k: (v - stages_before.get(k, 0.0)) / len(mails) * 1000 for k, v in _stage_seconds().items()}
    return {
        "stages_ms": stages,
        "rate": len(mails) / elapsed,
        # CPU time and round trips vary less than wall time on a shared machine: the numbers to compare.
        "cpu_ms": cpu / len(mails) * 1000,
        "statements": statements.count / len(mails),
        "by_statement": {k: (n, wall / len(mails) * 1000, cpu / len(mails) * 1000)
                         for k, (n, wall, cpu) in statements.by_statement.items()},
        "p50_ms": statistics.median(per_mail) * 1000,
        "p99_ms": per_mail[int(0.99 * (len(per_mail) - 1))] * 1000,
        "outcomes": outcomes,
    }


def _known_senders(store, mails: list[bytes]) -> None:
    """Make every sender of the corpus a contact before the run: of the account their domain
    belongs to, else of a "Customers" account (the corpus's senders are all new otherwise)."""
    from email.parser import BytesHeaderParser
    from email.utils import parseaddr

    from sqlalchemy import select

    from pipeline.store.models import Account, AccountDomain, Contact

    senders: dict[str, str] = {}
    for raw in mails:
        name, address = parseaddr(str(BytesHeaderParser().parsebytes(raw).get("From", "")))
        if address:
            senders.setdefault(address.lower(), name)
    with store.transaction() as session:
        by_domain = dict(session.execute(select(AccountDomain.domain, AccountDomain.account_id)).all())
        customers = Account(name="Customers")
        session.add(customers)
        session.flush()
        session.add_all(Contact(email=address, name=name,
                                account_id=by_domain.get(address.rsplit("@", 1)[-1], customers.id))
                        for address, name in senders.items())


class _count_statements:
    """The SQL statements every engine of this process sends, until `remove()`: how many, and by
    statement the wall and this thread's CPU from sending it to its result (`--statements`)."""

    def __init__(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        self.count = 0
        # statement's opening words -> [calls, wall seconds, CPU seconds]
        self.by_statement: dict[str, list[float]] = {}
        self._event, self._engine = event, Engine
        event.listen(Engine, "before_cursor_execute", self._before)
        event.listen(Engine, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.count += 1
        conn.info["bench_started"] = (time.perf_counter(), time.thread_time())

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        wall, cpu = conn.info.pop("bench_started", (time.perf_counter(), time.thread_time()))
        key = " ".join(statement.split())[:70]
        row = self.by_statement.setdefault(key, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += time.perf_counter() - wall
        row[2] += time.thread_time() - cpu

    def remove(self) -> None:
        self._event.remove(self._engine, "before_cursor_execute", self._before)
        self._event.remove(self._engine, "after_cursor_execute", self._after)


def _stage_seconds() -> dict[str, float]:
    """Seconds spent in each stage so far in this process (the pipeline's own histogram)."""
    from pipeline import metrics

    return {s.labels["stage"]: s.value for m in metrics.STAGE_SECONDS.collect() for s in m.samples
            if s.name.endswith("_sum")}


def _profiler():
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("--profile needs pyinstrument (pip install pyinstrument)", file=sys.stderr)
        return None
    p = Profiler()
    p.start()
    return p


def _pg_database(admin_url: str):
    from sqlalchemy import create_engine, text

    name = f"mailloop_bench_{os.getpid()}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return admin_url.rsplit("/", 1)[0] + "/" + name, drop


@contextmanager
def scratch_database(db: str, admin_url: str) -> Iterator[tuple[str, Path]]:
    """A temporary directory, and a fresh database: a SQLite file in it, or one on the PostgreSQL
    server that is dropped afterwards. Yields (database URL, directory)."""
    with tempfile.TemporaryDirectory(prefix="mailloop-bench-") as tmp:
        if db != "postgresql":
            yield f"sqlite:///{tmp}/bench.db", Path(tmp)
            return
        url, drop = _pg_database(admin_url)
        try:
            yield url, Path(tmp)
        finally:
            drop()


def add_run_options(ap: argparse.ArgumentParser, *, both: bool) -> None:
    """--corpus, --db, --redis and --pg-admin, as the benches that run the pipeline on the corpus
    take them. `both`: --db may be "both" (SQLite, then PostgreSQL) and is by default; without it,
    PostgreSQL is the default."""
    ap.add_argument("--corpus", type=Path, default=CORPUS_DIR, help="where generated corpora are kept")
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"] if both else ["sqlite", "postgresql"],
                    default="both" if both else "postgresql")
    ap.add_argument("--redis", default=REDIS_URL, help="the loop guard's Redis (default: $REDIS_URL or the local one)")
    ap.add_argument("--pg-admin", default=PG_ADMIN_URL, help="a PostgreSQL to create scratch databases in")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="mails in the corpus (default 2000)")
    add_run_options(ap, both=True)
    ap.add_argument("--profile", action="store_true", help="profile the pipeline run with pyinstrument")
    ap.add_argument("--stages", action="store_true",
                    help="also print the time per mail in each stage (from the mailloop_stage_seconds histogram) "
                         "and outside them (journal, commits, savepoints)")
    ap.add_argument("--statements", action="store_true",
                    help="also print the SQL statements that took the most time, per mail: wall from sending "
                         "each to its result, of it this process's CPU, the rest waiting on the server")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 50],
                    help="mails per transaction: 1 is `pipeline ingest`'s way, 50 a fetch + process task's "
                         "(journal_many, then process_many); p50/p99 are per mail (default: 1 50)")
    ap.add_argument("--senders", choices=["new", "known"], default="new",
                    help="new: the corpus's senders are strangers, each mail makes a contact (the default); "
                         "known: every sender is a contact already")
    args = ap.parse_args()

    mails = corpus(args.n, args.corpus / str(args.n))
    print(f"corpus: {len(mails)} mails, {sum(map(len, mails)) / 2**20:.1f} MiB (bench/make_corpus.py)")
    bare = bare_mailparser(mails)
    print(f"{'bare mail-parser (parse only)':<48} {bare:8.1f} mails/s")
    for db, batch in [(db, b) for db in (["sqlite", "postgresql"] if args.db == "both" else [args.db])
                      for b in args.batch]:
        with scratch_database(db, args.pg_admin) as (url, workdir):
            r = pipeline_run(mails, url, args.redis, workdir, args.profile, batch, args.senders == "known")
        label = f"pipeline journal→written, {db}, " + ("1 per tx" if batch == 1 else f"{batch} per tx")
        if args.senders == "known":
            label += ", known senders"
        print(f"{label:<48} {r['rate']:8.1f} mails/s   "
              f"ratio {r['rate'] / bare:.2f} of mail-parser   p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms")
        print(f"{'':<48} CPU {r['cpu_ms']:.2f} ms per mail (this process), "
              f"{r['statements']:.1f} SQL statements per mail")
        # What no overlap of waits could beat: this process's CPU alone, as a rate.
        print(f"{'':<48} with every wait hidden, its CPU would allow {1000 / r['cpu_ms']:.1f} mails/s, "
              f"ratio {1000 / r['cpu_ms'] / bare:.2f}")
        print(f"{'':<48} outcomes: " + ", ".join(f"{n} {k}" for k, n in sorted(r["outcomes"].items())))
        if args.stages:
            per_mail = 1000 / r["rate"]
            shown = {k: v for k, v in r["stages_ms"].items() if v >= 0.05}
            print(f"{'':<48} ms per mail: " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items())
                  + f", outside the stages {per_mail - sum(r['stages_ms'].values()):.2f} (of {per_mail:.2f})")
        if args.statements:
            top = sorted(r["by_statement"].items(), key=lambda kv: -kv[1][1])[:12]
            print(f"{'':<48} SQL, ms per mail: wall / CPU here / waiting, calls, statement")
            for text, (calls, wall, cpu) in top:
                print(f"{'':<50} {wall:.3f} / {cpu:.3f} / {wall - cpu:.3f}  {calls:5d}  {text}")


if __name__ == "__main__":
    main()
