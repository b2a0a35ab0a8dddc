"""Sending the outbox (D1.7) after commit: claim rows, send them over one SMTP connection, record the result.

A row is claimed atomically (`pending` → `sending`, with a lease) before anything is
sent, so two senders never both send it; it is marked `sent` the moment the server
accepts it, and a `sent` row is never claimed again. A sender killed mid-send leaves
its rows `sending` until the lease runs out; then the sweep claims them again and the
resend carries the Message-ID recorded when the row was written. Delivery is therefore
at least once — only a kill between the server's 250 and our commit sends twice.
"""

from __future__ import annotations

import logging
import os
import secrets
import smtplib
import ssl
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import Compat32
from email.utils import format_datetime, formataddr
from typing import Iterator

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, selectinload
from tenacity import (
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from pipeline.config import Config
from pipeline.notify.settings import SmtpSettings
from pipeline.store import leases
from pipeline.store.db import Store
from pipeline.store.models import Notification, NotificationRecipient

log = logging.getLogger("pipeline.notify")

# A row out of attempts is failed for good; with the task's quick retries and the sweep's
# backoff (below) that is about a day of trying.
MAX_ATTEMPTS = 15
BACKOFF_BASE_SECONDS = 30
BACKOFF_MAX_SECONDS = 3600
HISTORY_DAYS = 30

# The server is not there, or the connection broke: nothing in this batch can be sent now.
CONNECTION_ERRORS = (OSError, smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected, smtplib.SMTPHeloError)


class SmtpUnavailable(Exception):
    """Some rows could not be sent for a reason that passes (server down, 4xx); retry them later."""


@dataclass
class Report:
    sent: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # already sent, or claimed by another sender
    # Set when the server did not answer in time: other senders should not wait on it too.
    timed_out: bool = False

    def as_json(self) -> dict[str, int]:
        return {k: len(v) for k, v in vars(self).items() if isinstance(v, list)}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# -- claiming and recording (each its own short transaction) ------------------------------------

def claim(store: Store, ids: list[int], now: datetime, lease_seconds: float) -> list[int]:
    """Take the rows among `ids` that nobody is sending; returns the ids now ours."""
    return leases.claim(store, Notification, "sending", ids, now, lease_seconds)


class SentMarks:
    """Records each sent row at once, so that a crash resends as little as possible.

    One connection per send batch, with a statement built once, since it runs for every
    notification; on PostgreSQL it autocommits, so a mark is one round trip, not three (BEGIN,
    UPDATE, COMMIT), and as durable. A connection lost between two sends (an idle timeout, a
    restart, a failover) is replaced once: the mark only moves a row from sending to sent.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn: Connection | None = None

    def __call__(self, nid: int) -> None:
        for attempt in (1, 2):
            try:
                conn = self.conn or self._connect()
                with conn.begin():
                    conn.execute(_MARK_SENT, {"nid": nid, "at": utcnow()})
                return
            except (OperationalError, InterfaceError):
                self.close()
                if attempt == 2:
                    raise

    def _connect(self) -> Connection:
        conn = self.store.engine.connect()
        if self.store.dialect == "postgresql":
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        self.conn = conn
        return conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


_MARK_SENT = (update(Notification)
              .where(Notification.id == bindparam("nid"), Notification.status == "sending")
              .values(status="sent", sent_at=bindparam("at"), lease_until=None, last_error=None,
                      next_attempt_at=None))


def mark_failed(store: Store, nid: int, error: str) -> None:
    with store.transaction() as session:
        session.execute(update(Notification).where(Notification.id == nid, Notification.status == "sending")
                        .values(status="failed", last_error=error[:2000], lease_until=None, next_attempt_at=None))


def mark_retry(store: Store, nid: int, error: str, now: datetime | None = None) -> str:
    """Back to pending with a backoff for the sweep; failed once out of attempts. Returns the new status."""
    now = now or utcnow()
    with store.transaction() as session:
        attempts = session.scalar(select(Notification.attempts).where(Notification.id == nid)) or 0
        if attempts >= MAX_ATTEMPTS:
            values = {"status": "failed", "last_error": f"gave up after {attempts} attempts: {error}"[:2000],
                      "next_attempt_at": None}
        else:
            delay = min(BACKOFF_BASE_SECONDS * 2 ** max(attempts - 1, 0), BACKOFF_MAX_SECONDS)
            values = {"status": "pending", "last_error": error[:2000],
                      "next_attempt_at": now + timedelta(seconds=delay)}
        session.execute(update(Notification).where(Notification.id == nid, Notification.status == "sending")
                        .values(lease_until=None, **values))
    return values["status"]


def due(session: Session, now: datetime, grace_seconds: float = 30, limit: int = 1000) -> list[int]:
    """Rows the sweep should hand to a sender: pending and due, or left `sending` past their lease."""
    return leases.due(session, Notification, "sending", now, grace_seconds, limit)


def pending_for_journal(session: Session, journal_ids: list[int]) -> list[int]:
    """The outbox rows that processing these journal ids wrote and that wait to be sent."""
    if not journal_ids:
        return []
    return list(session.scalars(select(Notification.id).where(
        Notification.journal_id.in_(journal_ids), Notification.status == "pending").order_by(Notification.id)))


def purge(session: Session, now: datetime, days: int = HISTORY_DAYS) -> int:
    """Delete notifications older than `days` (and their recipients); returns how many."""
    cutoff = now - timedelta(days=days)
    old = select(Notification.id).where(Notification.created_at < cutoff)
    session.execute(delete(NotificationRecipient).where(NotificationRecipient.notification_id.in_(old)))
    return session.execute(delete(Notification).where(Notification.created_at < cutoff)).rowcount or 0


# -- the message --------------------------------------------------------------------------------

@dataclass
class Outgoing:
    id: int
    message: Message
    envelope_from: str
    to: list[str]


def build_message(n: Notification, config: Config, now: datetime | None = None) -> Outgoing:
    """The mail for one outbox row, with the headers D1.7 requires.

    Built with the compat32 classes and headers encoded here: `EmailMessage` parses every
    header it is given through the header registry, which took a tenth of a worker's time
    in the fleet benchmark (bench/README.md). The receiving side sees the same MIME.
    """
    box = next((b for b in config.mailboxes if b.name == n.mailbox), None)
    from_name = box.notifications.from_name if box else None
    to = [r.email for r in n.recipients]
    text = MIMEText(n.body_text, "plain", _UTF8, policy=_WIRE)
    if n.body_html:
        # A boundary QP-encoded text cannot contain ("=_" is always "=3D_" there): the generator
        # would otherwise compile a regex per message to make sure of it.
        msg: Message = MIMEMultipart("alternative", boundary="=_" + secrets.token_hex(12), policy=_WIRE)
        for part in (text, MIMEText(n.body_html, "html", _UTF8, policy=_WIRE)):
            del part["MIME-Version"]  # once, at the top
            msg.attach(part)
    else:
        msg = text
    msg["From"] = formataddr((_one_line(from_name or ""), n.from_address), charset="utf-8")
    msg["To"] = ", ".join(to)
    msg["Reply-To"] = box.address if box else n.from_address
    msg["Subject"] = _header_text(n.subject)
    msg["Date"] = format_datetime(now or utcnow())
    msg["Message-ID"] = n.message_id  # recorded when the row was written; the same on a resend
    if n.in_reply_to:
        msg["In-Reply-To"] = _one_line(n.in_reply_to)
    if n.references:
        msg["References"] = _one_line(n.references)
    # RFC 3834: automatic; and Exchange/Outlook: send no out-of-office or read receipt back.
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-Auto-Response-Suppress"] = "All"
    return Outgoing(n.id, msg, n.from_address, to)


# UTF-8 bodies in quoted-printable: readable in a raw view, unlike base64.
_UTF8 = Charset("utf-8")
_UTF8.body_encoding = QP


class _Wire(Compat32):
    """compat32, but a header that fits on one line in plain ASCII is written as it is.

    compat32 runs every header through `Header`'s folding algorithm, which for these headers
    gives back the value unchanged: a fifth of the CPU of sending a notification went there
    (bench/README.md, issue 10). Anything longer, non-ASCII or a `Header` is folded as before.
    """

    def _fold(self, name: str, value: object, sanitize: bool) -> str:
        if (isinstance(value, str) and len(name) + len(value) + 2 <= (self.max_line_length or 78)
                and value.isascii() and value == value.strip() and "  " not in value
                and "\n" not in value and "\r" not in value):
            return f"{name}: {value}{self.linesep}"
        return super()._fold(name, value, sanitize)


_WIRE = _Wire()


def _one_line(value: str) -> str:
    """compat32 writes header values as given: a line break in one must never start a new header."""
    return " ".join(value.split()) if ("\n" in value or "\r" in value) else value


def _header_text(value: str) -> str | Header:
    """The subject with its leading ASCII words (the ticket tag) as they are, the rest RFC 2047-encoded."""
    value = _one_line(value)
    if value.isascii():
        return value
    words = value.split(" ")
    plain = next(i for i, word in enumerate(words) if not word.isascii())
    header = Header(" ".join(words[:plain]) + " " if plain else "", "us-ascii")
    header.append(" ".join(words[plain:]), "utf-8")
    return header


# -- SMTP -----------------------------------------------------------------------------------------

def _credentials(s: SmtpSettings) -> tuple[str, str] | None:
    user = os.environ.get(s.username_env, "") if s.username_env else (s.username or "")
    if not user:
        return None
    password = os.environ.get(s.password_env or "", "") if s.password_env else ""
    if not password:
        raise smtplib.SMTPException(f"smtp: the password variable {s.password_env or '(password_env unset)'} "
                                    "is not set in the environment")
    return user, password


def _tls_context(s: SmtpSettings, config: Config) -> ssl.SSLContext:
    cafile = str(config.resolve_path(s.ca_file)) if s.ca_file else None
    return ssl.create_default_context(cafile=cafile)


def _connect(s: SmtpSettings, config: Config) -> smtplib.SMTP:
    if s.security == "tls":
        client: smtplib.SMTP = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout_seconds,
                                                context=_tls_context(s, config))
    else:
        client = smtplib.SMTP(s.host, s.port, timeout=s.timeout_seconds)
    try:
        client.ehlo()
        if s.security == "starttls":
            client.starttls(context=_tls_context(s, config))
            client.ehlo()
        creds = _credentials(s)
        if creds:
            client.login(*creds)
    except BaseException:
        client.close()
        raise
    return client


@contextmanager
def smtp_connection(config: Config) -> Iterator[smtplib.SMTP]:
    """One connection for a batch; a blip in connecting is retried a few times (tenacity), no more:
    a longer outage is the task's retry policy's business."""
    s = config.settings.smtp
    client = None
    # Not a refusal (the server is down: asking again at once only costs worker time, and an SMTP
    # outage must never starve the process queue) nor a timeout (it has cost its seconds already).
    blip = retry_if_exception_type(CONNECTION_ERRORS) & retry_if_not_exception_type(
        (ConnectionRefusedError, TimeoutError))
    for attempt in Retrying(stop=stop_after_attempt(3), wait=wait_exponential(multiplier=0.25, max=1),
                            retry=blip, reraise=True):
        with attempt:
            client = _connect(s, config)
    assert client is not None
    try:
        yield client
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


def _row_error(exc: smtplib.SMTPException) -> tuple[bool, str]:
    """(transient?, text) for an error that concerns this one mail, not the connection."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        text = "; ".join(f"{rcpt}: {code} {msg.decode(errors='replace') if isinstance(msg, bytes) else msg}"
                         for rcpt, (code, msg) in exc.recipients.items())
        return any(400 <= c < 500 for c in codes), f"recipient refused: {text}"
    if isinstance(exc, smtplib.SMTPResponseException):
        msg = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        return 400 <= exc.smtp_code < 500, f"{exc.smtp_code} {msg}"
    return True, str(exc)


# -- one batch ------------------------------------------------------------------------------------

def deliver(store: Store, config: Config, ids: list[int], *, lease_seconds: float = 120,
            now: datetime | None = None) -> Report:
    """Send the rows among `ids` that are still to be sent, over one connection; record each outcome."""
    report = Report()
    now = now or utcnow()
    mine = claim(store, ids, now, lease_seconds)
    report.skipped = sorted(set(ids) - set(mine))
    if not mine:
        return report
    mark_sent = SentMarks(store)
    try:
        return _send(store, config, mine, report, mark_sent)
    finally:
        mark_sent.close()


def _send(store: Store, config: Config, mine: list[int], report: Report, mark_sent: SentMarks) -> Report:
    with store.sessions() as session:
        rows = session.scalars(select(Notification).options(selectinload(Notification.recipients))
                               .where(Notification.id.in_(mine)).order_by(Notification.id)).all()
        waiting = [build_message(n, config) for n in rows]
    try:
        with smtp_connection(config) as smtp:
            while waiting:
                out = waiting[0]
                try:
                    smtp.send_message(out.message, from_addr=out.envelope_from, to_addrs=out.to)
                except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
                    transient, error = _row_error(exc)
                    _record_failure(store, out.id, error, transient, report)
                    waiting.pop(0)
                else:
                    # Off the list first: if the mark cannot be written, a delivered row must not be
                    # handed back as unsent below (its lease lets the sweep take it much later).
                    waiting.pop(0)
                    mark_sent(out.id)
                    report.sent.append(out.id)
    except (*CONNECTION_ERRORS, smtplib.SMTPException) as exc:
        # Server down, connection lost, TLS or login refused: the rest waits for a retry. The
        # one in flight may have arrived without our seeing the 250; its resend keeps its Message-ID.
        error = f"{type(exc).__name__}: {exc}".strip()
        report.timed_out = isinstance(exc, TimeoutError)
        log.warning("smtp %s:%s: %s; %d notification(s) wait for a retry", config.settings.smtp.host,
                    config.settings.smtp.port, error, len(waiting))
        for out in waiting:
            _record_failure(store, out.id, error, True, report)
    except BaseException:
        # A time limit or a shutdown: give the unsent rows back now rather than at the lease's end.
        for out in waiting:
            mark_retry(store, out.id, "interrupted before sending")
        raise
    return report


def _record_failure(store: Store, nid: int, error: str, transient: bool, report: Report) -> None:
    if transient and mark_retry(store, nid, error) == "pending":
        report.retry.append(nid)
    else:
        if not transient:
            mark_failed(store, nid, error)
        report.failed.append(nid)
        log.error("notification %s failed for good: %s", nid, error)


def smtp_problem(config: Config) -> str | None:
    """What check-config can tell about [smtp] without connecting: a credential variable not set here."""
    s = config.settings.smtp
    missing = [v for v in (s.username_env, s.password_env) if v and not os.environ.get(v)]
    if missing:
        return f"smtp: environment variable(s) {', '.join(missing)} not set here (needed where the notify task runs)"
    if s.ca_file and not config.resolve_path(s.ca_file).is_file():
        return f"smtp: ca_file {config.resolve_path(s.ca_file)} does not exist"
    return None

