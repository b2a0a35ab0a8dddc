"""POP3 source (poplib): TLS or STLS, each mail journaled before it is marked deleted.

POP3 deletes only at QUIT, and only what was marked: a connection lost before QUIT
deletes nothing. The next session finds every mail it journaled by its UIDL
(`pop3:<mailbox>:<uidl>`) and only marks it again, so nothing is lost or journaled twice.
A mail over `max_message_bytes` is left on the server and reported; POP3 has no folder
to put it aside in.
"""

from __future__ import annotations

import logging
import poplib
import ssl
from collections.abc import Iterator

from pipeline.config import Config, MailboxConfig
from pipeline.process import Unavailable, by_bytes
from pipeline.sources.base import (
    PermanentSourceError,
    Sink,
    TransientSourceError,
    chunks,
    known_refs,
)
from pipeline.sources.imap import ssl_context
from pipeline.sources.oauth import password
from pipeline.store.db import Store

log = logging.getLogger("pipeline.sources.pop3")

# poplib refuses lines over 2,048 bytes; real mail (one-line HTML, long base64) has longer ones.
poplib._MAXLINE = max(poplib._MAXLINE, 1 << 20)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError)


def connect(box: MailboxConfig, config: Config) -> poplib.POP3:
    source = box.source
    where = f"POP3 {source.host}:{source.server_port}"
    try:
        if source.security == "tls":
            conn: poplib.POP3 = poplib.POP3_SSL(source.host, source.server_port,
                                                context=ssl_context(source, config), timeout=source.timeout_seconds)
        else:
            conn = poplib.POP3(source.host, source.server_port, timeout=source.timeout_seconds)
            if source.security == "starttls":
                conn.stls(ssl_context(source, config))
    except ssl.SSLCertVerificationError as exc:
        raise PermanentSourceError(f"{where}: the server's certificate does not verify ({exc.verify_message}); "
                                   "set source.ca_file for a private CA") from None
    except TRANSIENT_ERRORS as exc:
        raise TransientSourceError(f"{where}: cannot connect: {exc}") from None
    except poplib.error_proto as exc:
        raise PermanentSourceError(f"{where}: {_text(exc)}") from None
    try:
        conn.user(source.username)
        conn.pass_(password(source))
    except poplib.error_proto as exc:
        conn.close()
        why = _text(exc)
        # RFC 3206: [SYS/TEMP] and [IN-USE] pass; [AUTH] and the rest need someone to act.
        if "[SYS/TEMP]" in why or "[IN-USE]" in why:
            raise TransientSourceError(f"{where}: login as {source.username} failed for now: {why}") from None
        raise PermanentSourceError(f"{where}: login as {source.username} refused: {why}") from None
    except PermanentSourceError:
        conn.close()
        raise
    except TRANSIENT_ERRORS as exc:
        raise TransientSourceError(f"{where}: connection lost while logging in: {exc}") from None
    return conn


def fetch_once(box: MailboxConfig, config: Config, store: Store, sink: Sink) -> int:
    """One POP3 session: journal every new mail, mark all journaled ones deleted, QUIT; returns
    how many were journaled now."""
    conn = connect(box, config)
    try:
        journaled = _fetch(conn, box, store, sink)
        conn.quit()  # the deletions happen here, after every mail they concern is journaled
        return journaled
    except Unavailable as exc:
        raise TransientSourceError(f"the journal is unavailable: {exc}") from None
    except (*TRANSIENT_ERRORS, poplib.error_proto) as exc:
        raise TransientSourceError(f"POP3 {box.source.host}: connection lost: {_text(exc)}") from None
    finally:
        conn.close()  # without QUIT the server deletes nothing


def _fetch(conn: poplib.POP3, box: MailboxConfig, store: Store, sink: Sink) -> int:
    source = box.source
    listing = [line.decode().split() for line in conn.uidl()[1]]
    sizes = {int(num): int(size) for num, size in (line.decode().split() for line in conn.list()[1])}
    journaled = 0
    for batch in chunks(listing, source.fetch_batch):
        refs = {int(num): f"pop3:{box.name}:{uidl}" for num, uidl in batch}
        known = known_refs(store, box.name, list(refs.values()))
        # Journaled as they arrive, 16 MiB at most at a time: a batch of big mails is never held whole.
        for run in by_bytes(_retrieve(conn, box, refs, known, sizes, sink), lambda got: len(got[1])):
            for (num, _), outcome in zip(run, sink.journal_each(box.name, [(raw, refs[num]) for num, raw in run])):
                if isinstance(outcome, Exception):  # one mail the store refuses must not block the others
                    log.error("mailbox %s: POP3 mail %s could not be journaled and stays on the server: %s: %s",
                              box.name, refs[num], type(outcome).__name__, outcome, exc_info=outcome)
                    continue
                known[refs[num]] = outcome
                journaled += 1
        ids = []
        for num, ref in refs.items():
            if ref in known:
                ids.append(known[ref])
                conn.dele(num)
        if ids:
            sink.enqueue(ids)
    return journaled


def _retrieve(conn: poplib.POP3, box: MailboxConfig, refs: dict[int, str], known: dict[str, int],
              sizes: dict[int, int], sink: Sink) -> Iterator[tuple[int, bytes]]:
    """(message number, raw mail) of the batch's mails not journaled yet and within the size limit."""
    for num, ref in refs.items():
        if ref in known:
            continue
        if sizes.get(num, 0) > box.source.max_message_bytes:
            log.error("mailbox %s: POP3 mail %s (%s bytes) is over the limit of %s and stays on the server",
                      box.name, ref, sizes[num], box.source.max_message_bytes)
            continue
        yield num, b"\r\n".join(conn.retr(num)[1]) + b"\r\n"
        sink.keepalive()  # a batch of big mails over a slow link can outlast the fetch lock


def _text(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)
