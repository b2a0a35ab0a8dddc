"""Exactly-once effects under concurrent workers (D1.5, issue 8), on SQLite and PostgreSQL.

Real processes race on real databases: no Celery needed to show that the store, not
luck, keeps a mail from being written twice.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from sqlalchemy import func, select

from pipeline.config import load_config
from pipeline.process import MailProcessor, connect_redis
from pipeline.store.db import Store
from pipeline.store.models import JournalEntry, Note, Ticket
from tests.conftest import make_mail

CTX = mp.get_context("spawn")


def _process(config_path: str, journal_ids: list[int], ready: mp.Barrier, out: mp.Queue,
             batch: bool = False) -> None:
    config = load_config(config_path)
    store = Store(config.database_url)
    processor = MailProcessor(config, store, connect_redis(config.redis_url))
    with store.sessions() as s:  # connected and warmed up, so that the race starts at the barrier
        s.scalar(select(func.count()).select_from(Ticket))
    ready.wait(60)
    if batch:  # as a process task does: the ids in one transaction
        out.put([(r.journal_id, r.outcome) for r in processor.process_many(journal_ids)])
    else:
        out.put([(jid, processor.process(jid).outcome) for jid in journal_ids])
    store.dispose()


def _race(config_path: Path, batches: list[list[int]], batch: bool = False) -> list[tuple[int, str]]:
    ready, out = CTX.Barrier(len(batches)), CTX.Queue()
    procs = [CTX.Process(target=_process, args=(str(config_path), ids, ready, out, batch)) for ids in batches]
    for p in procs:
        p.start()
    results = [r for _ in procs for r in out.get(timeout=120)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results


def test_two_workers_handed_the_same_journaled_mail_write_one_outcome(config, processor, store) -> None:
    journal_id = processor.journal("support", make_mail(subject="Server room too warm"))
    results = _race(config.path, [[journal_id], [journal_id], [journal_id]])
    assert {outcome for _, outcome in results} == {"ticket_created"}  # the others read the recorded one
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 1
        assert s.get(JournalEntry, journal_id).outcome == "ticket_created"


def test_the_same_mail_journaled_twice_and_raced_opens_one_ticket(config, processor, store) -> None:
    raw = make_mail(subject="UPS beeping", message_id="<ups-1@acme.example>")
    first = processor.journal("support", raw)
    second = processor.journal("billing", raw)  # To one mailbox, Cc another
    outcomes = sorted(o for _, o in _race(config.path, [[first], [second]]))
    assert outcomes == ["already_processed", "ticket_created"]
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 1


def test_two_new_mails_of_one_conversation_raced_follow_the_duplicate_ticket_rule(config, processor, store) -> None:
    # The sender writes twice within seconds, before any answer: with the default rule
    # ("note") the second is a note on the first's ticket, whichever worker is faster.
    ids = [processor.journal("support", make_mail(subject="Email not syncing on phone", body=f"Attempt {i}.\n"))
           for i in range(2)]
    outcomes = sorted(o for _, o in _race(config.path, [[ids[0]], [ids[1]]]))
    assert outcomes == ["note_added", "ticket_created"]
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 1
        assert s.scalar(select(func.count()).select_from(Note)) == 1


def test_two_batches_holding_the_same_conversations_in_opposite_order_neither_deadlock_nor_split(
        config, processor, store) -> None:
    firsts, seconds = [], []
    for n in range(10):
        sender = f"User {n} <user{n}@acme.example>"
        firsts.append(processor.journal("support", make_mail(from_=sender, subject=f"Outage {n}", body="down\n")))
        seconds.append(processor.journal("support", make_mail(from_=sender, subject=f"Outage {n}", body="still\n")))
    # Each worker gets one mail of every conversation, in the other worker's reverse order.
    results = _race(config.path, [firsts[:5] + seconds[5:], list(reversed(firsts[5:] + seconds[:5]))], batch=True)
    assert sorted(o for _, o in results) == ["note_added"] * 10 + ["ticket_created"] * 10
    with store.sessions() as s:
        numbers = list(s.scalars(select(Ticket.number)))
        assert len(numbers) == len(set(numbers)) == 10
        assert s.scalar(select(func.count()).select_from(Note)) == 10
