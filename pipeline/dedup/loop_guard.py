"""The loop guard (D1.5.2): at most N mails per mailbox + sender + normalised subject
in any sliding window, counted atomically in Redis across every worker.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import redis

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
        ttl = max(window_seconds * 2, 60)
        admitted, seen = self._script(keys=[key], args=[repr(float(at)), window_seconds, limit, member, ttl,
                                                        "1" if peek else "0"])
        return LoopDecision(bool(admitted), int(seen), key)
