"""The loop guard on real Redis: a sliding window, exact under concurrency (D1.5.2)."""

from __future__ import annotations

import multiprocessing

import redis

from pipeline.dedup.loop_guard import LoopGuard
from tests.conftest import REDIS_URL

WINDOW = dict(limit=2, window_seconds=300)


def check(guard: LoopGuard, member: str, at: float, sender: str = "alerts@acme.example", peek: bool = False):
    return guard.check(mailbox="support", sender=sender, normalised_subject="disk full", at=at, member=member,
                       peek=peek, **WINDOW)


def test_the_third_mail_in_the_window_is_refused(redis_client, key_prefix) -> None:
    guard = LoopGuard(redis_client, key_prefix)
    assert [check(guard, str(i), 1000.0 + i * 60).admitted for i in range(1, 4)] == [True, True, False]


def test_a_replayed_journal_id_counts_once(redis_client, key_prefix) -> None:
    guard = LoopGuard(redis_client, key_prefix)
    assert check(guard, "7", 1000.0).admitted
    replay = check(guard, "7", 1000.0)
    assert replay.admitted and replay.seen == -1
    assert check(guard, "8", 1001.0).admitted  # the replay did not take the second slot


def test_the_window_slides(redis_client, key_prefix) -> None:
    guard = LoopGuard(redis_client, key_prefix)
    assert check(guard, "1", 0.0).admitted
    assert check(guard, "2", 100.0).admitted
    assert not check(guard, "3", 299.0).admitted
    assert check(guard, "4", 301.0).admitted  # mail 1 left the window
    assert not check(guard, "5", 350.0).admitted


def test_a_peek_counts_nothing(redis_client, key_prefix) -> None:
    guard = LoopGuard(redis_client, key_prefix)
    for i in range(5):
        assert check(guard, "", 1000.0 + i, peek=True).admitted
    assert redis_client.exists(guard.key("support", "alerts@acme.example", "disk full")) == 0


def _race(prefix: str, member: str, barrier, results) -> None:
    guard = LoopGuard(redis.Redis.from_url(REDIS_URL), prefix)
    barrier.wait()
    results.put(check(guard, member, 5000.0).admitted)


def test_processes_racing_on_one_key_let_exactly_two_through(key_prefix) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        n = 8
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(f"{key_prefix}{round_}:", f"j{i}", barrier, results))
                 for i in range(n)]
        for p in procs:
            p.start()
        admitted = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert sum(admitted) == 2, admitted


def _question(member: str, at: float, sender: str = "alerts@acme.example") -> dict:
    return dict(mailbox="support", sender=sender, normalised_subject="disk full", at=at, member=member, **WINDOW)


def test_checks_asked_together_decide_as_the_same_checks_one_at_a_time(redis_client, key_prefix) -> None:
    together, alone = LoopGuard(redis_client, key_prefix + "a:"), LoopGuard(redis_client, key_prefix + "b:")
    questions = [_question("1", 1000.0), _question("2", 1060.0), _question("3", 1090.0, "nas01@acme.example"),
                 _question("4", 1120.0), _question("2", 1060.0)]
    asked = together.check_many(questions)
    one_by_one = [alone.check(**q) for q in questions]
    assert [(d.admitted, d.seen) for d in asked] == [(d.admitted, d.seen) for d in one_by_one] == [
        (True, 0), (True, 1), (True, 0), (False, 2), (True, -1)]


def test_a_count_taken_back_frees_its_place_in_the_window(redis_client, key_prefix) -> None:
    guard = LoopGuard(redis_client, key_prefix)
    first, second = guard.check_many([_question("1", 1000.0), _question("2", 1060.0)])
    assert not guard.check(**_question("3", 1090.0)).admitted
    guard.uncount([second])  # mail 2 never reached the gate
    assert guard.check(**_question("3", 1090.0)).admitted
    assert redis_client.zrange(first.key, 0, -1) == [b"1", b"3"]
