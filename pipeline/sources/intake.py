"""SMTP and LMTP intake (aiosmtpd): an MTA relays mail to mailloop, which answers `250` only
once the mail is in the journal (D1.1).

One listener serves every mailbox configured with the same kind, host and port; a mailbox
receives mail for its own address and the addresses in `source.recipients`; any other
recipient is refused at RCPT (`550`). Too large a mail is refused with `552` (aiosmtpd
counts while it reads). When the database or Redis is down the answer is `451`, so the
sending MTA keeps the mail and retries. LMTP answers once per recipient (RFC 2033).
The raw mail is journaled as received: no `Received:` line is added, so the trust
check (D8) sees the headers the relaying MTA wrote.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from pipeline.config import ConfigError, MailboxConfig
from pipeline.errors import CannotRun
from pipeline.sources.base import Sink, unique

log = logging.getLogger("pipeline.sources.intake")


@dataclass(frozen=True)
class Listener:
    kind: str  # "smtp" or "lmtp"
    host: str
    port: int
    routes: dict[str, MailboxConfig]  # recipient address (lower case) -> mailbox

    @property
    def max_bytes(self) -> int:
        return max(box.source.max_message_bytes for box in self.routes.values())

    @property
    def mailboxes(self) -> list[str]:
        return unique(box.name for box in self.routes.values())


def plan_listeners(boxes: list[MailboxConfig]) -> list[Listener]:
    """One listener per (kind, host, port) among the SMTP/LMTP mailboxes, with its recipients."""
    groups: dict[tuple[str, str, int], dict[str, MailboxConfig]] = {}
    for box in boxes:
        source = box.source
        if source.kind not in ("smtp", "lmtp"):
            continue
        routes = groups.setdefault((source.kind, source.listen_host, source.server_port), {})
        for address in [box.address, *source.recipients]:
            other = routes.setdefault(address.lower(), box)
            if other.name != box.name:
                raise ConfigError(f"mailboxes {other.name!r} and {box.name!r} both take mail for {address} "
                                  f"on {source.kind} {source.listen_host}:{source.server_port}")
    return [Listener(kind, host, port, routes) for (kind, host, port), routes in groups.items()]


class IntakeHandler:
    """aiosmtpd hooks: route recipients to mailboxes, journal at DATA, answer by the outcome."""

    def __init__(self, listener: Listener, sink: Sink, redis_client: redis.Redis) -> None:
        self.listener = listener
        self.sink = sink
        self.redis = redis_client

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() not in self.listener.routes:
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        boxes = [self.listener.routes[r.lower()] for r in envelope.rcpt_tos]
        loop = asyncio.get_running_loop()
        # The journal write is blocking (SQLAlchemy): in a thread, so other sessions go on meanwhile.
        statuses = await loop.run_in_executor(None, self.deliver, boxes, raw)
        if self.listener.kind == "lmtp":
            return "\r\n".join(statuses[box.name] for box in boxes)  # one reply per recipient
        # One reply for all recipients: a temporary failure first (the MTA retries the whole
        # mail; a second copy in a mailbox that took it is `already_processed`), then a permanent one.
        replies = [statuses[box.name] for box in boxes]
        return next((r for r in replies if r.startswith("4")), None) or \
            next((r for r in replies if r.startswith("5")), replies[0])

    def deliver(self, boxes: list[MailboxConfig], raw: bytes) -> dict[str, str]:
        """Journal the mail once per mailbox; the SMTP status for each mailbox."""
        statuses: dict[str, str] = {}
        ids: list[int] = []
        try:
            self.redis.ping()  # the pipeline needs Redis right after this; refuse while it is down
            redis_down = None
        except redis.RedisError as exc:
            redis_down = f"451 4.3.0 Redis unavailable, try again later ({_one_line(exc)})"
        for box in {box.name: box for box in boxes}.values():  # a mailbox named twice takes the mail once
            if redis_down:
                statuses[box.name] = redis_down
            elif len(raw) > box.source.max_message_bytes:
                statuses[box.name] = "552 5.3.4 Message too big for this mailbox"
            else:
                try:
                    ids.append(self.sink.journal(box.name, raw))
                    statuses[box.name] = f"250 2.0.0 OK journaled as #{ids[-1]}"
                except CannotRun as exc:
                    log.warning("%s intake for %s: answering 451: %s", self.listener.kind.upper(), box.name, exc)
                    statuses[box.name] = f"451 4.3.0 Cannot take the mail now, try again later ({_one_line(exc)})"
                except Exception:  # a bug here must not bounce the mail: answer 451, the MTA keeps it
                    log.exception("%s intake for %s: journal write failed; answering 451",
                                  self.listener.kind.upper(), box.name)
                    statuses[box.name] = "451 4.3.0 Cannot take the mail now, try again later"
        if ids:
            try:
                self.sink.enqueue(ids)
            except Exception as exc:  # journaled is safe: reconciliation enqueues it once the broker is back
                log.warning("journaled #%s but could not enqueue it (%s); reconciliation will", ids, exc)
        return statuses


class _LmtpController(Controller):
    def factory(self) -> LMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


def start_listener(listener: Listener, sink: Sink, redis_client: redis.Redis) -> Controller:
    """Start the listener in a thread of its own; `stop()` the returned controller to end it."""
    cls: Callable[..., Controller] = _LmtpController if listener.kind == "lmtp" else Controller
    kwargs: dict[str, Any] = {"data_size_limit": listener.max_bytes, "server_hostname": socket.gethostname(),
                              "enable_SMTPUTF8": True}
    controller = cls(IntakeHandler(listener, sink, redis_client), hostname=listener.host, port=listener.port,
                     **kwargs)
    controller.start()
    log.info("%s listener on %s:%s for %s", listener.kind.upper(), listener.host, listener.port,
             ", ".join(sorted(listener.routes)))
    return controller


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
