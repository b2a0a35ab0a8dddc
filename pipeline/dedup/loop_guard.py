"""The loop guard (D1.5.2): at most N mails per mailbox + sender + normalised subject
in any sliding window, counted atomically in Redis across every worker.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import redis

log = logging.getLogger("pipeline.loop_guard")

# One round trip, atomic: concurrent workers can never let more than `limit` through.
# A sorted set per key; score = the mail's time (journal received time, or the mail's own
# Date for `import`), member = journal id, so a replayed journal id counts once.
# Counting (t - window, t + window) is exact for mail arriving in time order and errs
# towards discarding for a backlog imported out of order.
_SCRIPT = """
local key = KEYS[1]
local t = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local member = ARGV[4]
local ttl = tonumber(ARGV[5])
local peek = ARGV[6] == '1'
if member ~= '' and redis.call('ZSCORE', key, member) then
  return {1, -1}
end
local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
if newest[2] == nil or tonumber(newest[2]) <= t then
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. (t - window))
end
local count = redis.call('ZCOUNT', key, '(' .. (t - window), '(' .. (t + window))
if count >= limit then
  return {0, count}
end
if not peek then
  redis.call('ZADD', key, t, member)
  redis.call('EXPIRE', key, ttl)
end
return {1, count}
"""


@dataclass(frozen=True)
class LoopDecision:
    admitted: bool
    seen: int  # mails already counted in the window (-1: this journal id was counted before)
    key: str
    member: str = ""


class LoopGuard:
    def __init__(self, client: redis.Redis, key_prefix: str = "mailloop:") -> None:
        self.client = client
        self.key_prefix = key_prefix
        self._script = client.register_script(_SCRIPT)

    def key(self, mailbox: str, sender: str, normalised_subject: str) -> str:
        digest = hashlib.sha1(f"{sender.lower()}\x00{normalised_subject}".encode()).hexdigest()
        return f"{self.key_prefix}loop:{mailbox}:{digest}"

    def check(self, *, mailbox: str, sender: str, normalised_subject: str, at: float,
              member: str, limit: int, window_seconds: int, peek: bool = False) -> LoopDecision:
        """Count this mail in the window and say whether it may be processed.

        `peek=True` answers without counting (for `ingest --dry-run`).
        """
        key = self.key(mailbox, sender, normalised_subject)
        admitted, seen = self._script(keys=[key], args=_args(at, member, limit, window_seconds, peek))
        return LoopDecision(bool(admitted), int(seen), key, member)

    def check_many(self, questions: list[dict[str, Any]]) -> list[LoopDecision]:
        """`check` for each of `questions` (its keyword arguments), in order, in one round trip.

        Each check is still one atomic script run: what the guard decides is what the same
        checks one by one would have decided.
        """
        if not questions:
            return []
        keys = [self.key(q["mailbox"], q["sender"], q["normalised_subject"]) for q in questions]
        pipe = self.client.pipeline(transaction=False)
        for key, q in zip(keys, questions):
            self._script(keys=[key], args=_args(q["at"], q["member"], q["limit"], q["window_seconds"],
                                                q.get("peek", False)), client=pipe)
        return [LoopDecision(bool(admitted), int(seen), key, q["member"])
                for key, q, (admitted, seen) in zip(keys, questions, pipe.execute())]

    def uncount(self, decisions: Iterable[LoopDecision]) -> None:
        """Take back what these checks counted, in one round trip: the mails never reached the gate."""
        counted = [d for d in decisions if d.admitted and d.member]
        if counted:
            pipe = self.client.pipeline(transaction=False)
            for d in counted:
                pipe.zrem(d.key, d.member)
            pipe.execute()


def _args(at: float, member: str, limit: int, window_seconds: int, peek: bool) -> list[Any]:
    return [repr(float(at)), window_seconds, limit, member, max(window_seconds * 2, 60), "1" if peek else "0"]


class AskedAhead:
    """A batch's loop-guard checks, asked for all its mails in one round trip before their turns.

    Asked for the mails that will most likely reach the gate and not be exempt; a mail takes
    its answer in its turn (`take`), if the gate asks the same question. What nobody took — a
    mail that stopped before the gate, or turned out exempt — is taken back at the end
    (`forget_unused`), so Redis counts what the gate one mail at a time would have counted. Only
    mails whose key no other mail of the batch shares are asked ahead: taking back one count
    can then change no other answer of the batch.
    """

    def __init__(self, guard: LoopGuard, questions: dict[int, dict[str, Any]]) -> None:
        self.guard = guard
        self.questions = questions
        self.answers = dict(zip(questions, guard.check_many(list(questions.values()))))

    def take(self, journal_id: int | None, question: dict[str, Any]) -> LoopDecision | None:
        """The answer asked ahead for this mail, if it was asked this question; else None (ask now)."""
        answer = self.answers.pop(journal_id, None)  # type: ignore[arg-type]
        if answer is not None and self.questions[journal_id] != question:  # type: ignore[index]
            self.guard.uncount([answer])  # before the gate asks again: it would find itself counted
            return None
        return answer

    def forget_unused(self) -> None:
        unused, self.answers = list(self.answers.values()), {}
        try:
            self.guard.uncount(unused)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Errs towards discarding: the counts expire with their window.
            log.warning("could not take back %d loop-guard count(s) asked ahead: %s", len(unused), exc)
