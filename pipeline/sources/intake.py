"""SMTP and LMTP intake (aiosmtpd): an MTA relays mail to mailloop, which answers `250` only
once the mail is in the journal (D1.1).

One listener serves every mailbox configured with the same kind, host and port; a mailbox
receives mail for its own address and the addresses in `source.recipients`; any other
recipient is refused at RCPT (`550`). Too large a mail is refused with `552` (aiosmtpd
counts while it reads). When the database or Redis is down the answer is `451`, so the
sending MTA keeps the mail and retries. LMTP answers once per recipient (RFC 2033).

The intake is a receiving host (D8): it writes its own `Received:` line on top of each mail,
by the mailbox's first authserv-id. An `Authentication-Results` that came with the mail is
believed only from a peer in the mailbox's `intake_relays` (its own MX); from any other peer
the intake adds its own verdict above the mail, that it authenticated nothing, so a header
forged further down is never reached. At most `max_sessions` sessions at once, half of them
from one peer (our MX is never refused), and a session silent for `idle_timeout_seconds` is closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

import redis
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from pipeline.config import ConfigError, MailboxConfig
from pipeline.errors import CannotRun
from pipeline.sources.base import Sink, unique
from pipeline.trust import is_intake_relay, peer_ip

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

    @property
    def max_sessions(self) -> int:
        return max(box.source.max_sessions for box in self.routes.values())

    @property
    def idle_timeout(self) -> float:
        return max(box.source.idle_timeout_seconds for box in self.routes.values())

    def is_relay(self, address: str | None) -> bool:
        """Is the peer an intake relay of a mailbox this listener serves (our own MX)?"""
        return any(is_intake_relay(address, box.trust) for box in self.routes.values())


@dataclass(frozen=True)
class Peer:
    """Who handed the mail over: what the intake's own trace header records of the session."""

    address: str | None  # the connecting IP address
    helo: str | None  # what it called itself; anyone's word, recorded and never believed
    protocol: str  # SMTP, ESMTP or LMTP (RFC 5321 4.4 "with")


def trace_headers(box: MailboxConfig, peer: Peer, raw: bytes, now: datetime | None = None) -> bytes:
    """The header lines the intake puts on top of a mail for `box` (D8), in the mail's line ending.

    Always our `Received:` line. For a peer outside the mailbox's `intake_relays`, above it our
    own `Authentication-Results` saying that nothing was authenticated: the trust check takes
    the topmost one from a trusted authserv-id, so one written by the sender is never reached.
    """
    eol = b"\r\n" if raw[:raw.find(b"\n") + 1].endswith(b"\r\n") else b"\n"
    by = box.trust.authserv_ids[0] if box.trust.authserv_ids else socket.getfqdn()
    helo = _token(peer.helo) or "unknown"
    ip = _token(peer.address) or "unknown"
    date = format_datetime(now or datetime.now(timezone.utc))
    lines = [f"Received: from {helo} ([{ip}])", f"\tby {by} (mailloop) with {peer.protocol}",
             f"\tfor <{box.address}>; {date}"]
    if box.trust.authserv_ids and not is_intake_relay(peer.address, box.trust):
        lines = [f"Authentication-Results: {by}; none (mailloop intake: peer {ip} is not one of intake_relays)",
                 *lines]
    return eol.join(line.encode("ascii") for line in lines) + eol


def _token(value: str | None) -> str:
    # A HELO name is the client's word: keep what a host name or address literal is made of, so
    # it can neither fold nor close the header nor pose as another clause of it.
    return re.sub(r"[^A-Za-z0-9.:_-]", "", value or "")[:255]


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
        # Open sessions, in all and by peer address; changed only on the listener's event loop.
        self.sessions = 0
        self.by_peer: Counter[str | None] = Counter()
        self.refused = 0  # sessions refused since the last time the log said so
        self.refused_logged_at = -math.inf

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() not in self.listener.routes:
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        boxes = [self.listener.routes[r.lower()] for r in envelope.rcpt_tos]
        peer = Peer(_peer_address(session.peer), session.host_name,
                    "LMTP" if self.listener.kind == "lmtp" else "ESMTP" if session.extended_smtp else "SMTP")
        loop = asyncio.get_running_loop()
        # The journal write is blocking (SQLAlchemy): in a thread, so other sessions go on meanwhile.
        statuses = await loop.run_in_executor(None, self.deliver, boxes, raw, peer)
        if self.listener.kind == "lmtp":
            return "\r\n".join(statuses[box.name] for box in boxes)  # one reply per recipient
        # One reply for all recipients: a temporary failure first (the MTA retries the whole
        # mail; a second copy in a mailbox that took it is `already_processed`), then a permanent one.
        replies = [statuses[box.name] for box in boxes]
        return next((r for r in replies if r.startswith("4")), None) or \
            next((r for r in replies if r.startswith("5")), replies[0])

    def deliver(self, boxes: list[MailboxConfig], raw: bytes, peer: Peer) -> dict[str, str]:
        """Journal the mail once per mailbox, under its trace headers; the SMTP status for each mailbox."""
        statuses: dict[str, str] = {}
        ids: list[int] = []
        try:
            self.redis.ping()  # the pipeline needs Redis right after this; refuse while it is down
            redis_down = None
        except redis.RedisError as exc:
            # The reason is for our log; the peer may be anyone and learns only to try again.
            log.warning("%s intake: answering 451, Redis is unavailable: %s", self.listener.kind.upper(), _one_line(exc))
            redis_down = "451 4.3.0 Redis unavailable, try again later"
        for box in {box.name: box for box in boxes}.values():  # a mailbox named twice takes the mail once
            if redis_down:
                statuses[box.name] = redis_down
            elif len(raw) > box.source.max_message_bytes:
                statuses[box.name] = "552 5.3.4 Message too big for this mailbox"
            else:
                try:
                    ids.append(self.sink.journal(box.name, trace_headers(box, peer, raw) + raw))
                    statuses[box.name] = f"250 2.0.0 OK journaled as #{ids[-1]}"
                except CannotRun as exc:
                    log.warning("%s intake for %s: answering 451: %s", self.listener.kind.upper(), box.name, exc)
                    statuses[box.name] = "451 4.3.0 Cannot take the mail now, try again later"
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

    def note_refusal(self, peer: str | None) -> None:
        """Log refused sessions at most once a minute: a flood must not flood the log too."""
        self.refused += 1
        now = time.monotonic()
        if now - self.refused_logged_at >= 60:
            log.warning("%s listener on %s:%s: refused %d session(s) over the cap (%d open, %d from %s)",
                        self.listener.kind.upper(), self.listener.host, self.listener.port, self.refused,
                        self.sessions - 1, self.by_peer[peer] - 1, peer)
            self.refused, self.refused_logged_at = 0, now


class _Bounded:
    """Counts a listener's sessions; one over a cap is answered 421 and closed at once (RFC 5321 3.8).

    Mixed in before aiosmtpd's SMTP/LMTP protocol class. Our own MX (a peer in `intake_relays`)
    is never refused, so strangers holding sessions open cannot keep the mail out; any other
    peer may hold at most half of `max_sessions`. A session ends after `idle_timeout` seconds
    in which nothing arrived: silence, not a slow sender of a big mail (as Postfix's
    smtpd_timeout counts per read).
    """

    event_handler: IntakeHandler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        handler = self.event_handler
        peer = _peer_address(transport.get_extra_info("peername"))
        self._peer = _host_of(peer)
        handler.sessions += 1
        handler.by_peer[self._peer] += 1
        limit = handler.listener.max_sessions
        if not handler.listener.is_relay(peer) and (
                handler.sessions > limit or handler.by_peer[self._peer] > max(1, limit // 2)):
            self._handler_coroutine.cancel()  # type: ignore[attr-defined]  # no greeting: 421 instead
            transport.write(b"421 4.7.0 Too many sessions, try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            handler.note_refusal(self._peer)

    def connection_lost(self, error: Exception | None) -> None:
        handler = self.event_handler
        handler.sessions -= 1
        handler.by_peer[self._peer] -= 1
        if handler.by_peer[self._peer] <= 0:
            del handler.by_peer[self._peer]
        super().connection_lost(error)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        self._reset_timeout()  # type: ignore[attr-defined]
        super().data_received(data)  # type: ignore[misc]

    def _timeout_cb(self) -> None:
        # aiosmtpd closes, which waits for our replies to drain: a peer that stops reading would
        # hold its session for ever. Silent this long, it gets nothing more.
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.abort()


def _peer_address(peername: object) -> str | None:
    return str(peername[0]) if isinstance(peername, tuple) and peername else None


def _host_of(address: str | None) -> str | None:
    """What counts as one peer for the per-peer cap: an IPv4 address, or an IPv6 /64 (one host's share)."""
    ip = peer_ip(address)
    if ip is None:
        return address
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


class _BoundedSMTP(_Bounded, SMTP):
    pass


class _BoundedLMTP(_Bounded, LMTP):
    pass


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _BoundedSMTP(self.handler, **self.SMTP_kwargs)


class _LmtpController(Controller):
    def factory(self) -> LMTP:
        return _BoundedLMTP(self.handler, **self.SMTP_kwargs)


def start_listener(listener: Listener, sink: Sink, redis_client: redis.Redis) -> Controller:
    """Start the listener in a thread of its own; `stop()` the returned controller to end it."""
    cls: Callable[..., Controller] = _LmtpController if listener.kind == "lmtp" else _Controller
    kwargs: dict[str, Any] = {"data_size_limit": listener.max_bytes, "server_hostname": socket.gethostname(),
                              "enable_SMTPUTF8": True, "timeout": listener.idle_timeout}
    controller = cls(IntakeHandler(listener, sink, redis_client), hostname=listener.host, port=listener.port,
                     **kwargs)
    controller.start()
    log.info("%s listener on %s:%s for %s", listener.kind.upper(), listener.host, listener.port,
             ", ".join(sorted(listener.routes)))
    for box in {box.name: box for box in listener.routes.values()}.values():
        if box.trust.authserv_ids and not box.trust.intake_relays:
            log.warning("mailbox %s: no [mailbox.trust] intake_relays: no Authentication-Results in mail to this "
                        "listener is believed, and the session cap does not spare your MX", box.name)
    return controller


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
