"""IMAP source (imapclient): implicit TLS or STARTTLS, password or XOAUTH2, IDLE or polling.

One pass (`fetch_pass`) reads the folder's new UIDs, journals each mail, and only then
moves the batch to the processed folder (or sets the processed keyword). The folder's
UIDVALIDITY and the last UID handled are kept in Redis; every `reconcile_seconds`, and
whenever UIDVALIDITY changes or Redis forgot them, a pass scans the whole folder instead,
so a UID that appeared late or a move that never happened is never skipped. A UID already
in the journal (`imap:<mailbox>:<uidvalidity>:<uid>`) is only moved — a crash between the
journal write and the move loses nothing and duplicates nothing. A mail that cannot be
fetched or journaled (too large, no body from the server, refused by the store) goes to
the failed folder; the rest go on.
"""

from __future__ import annotations

import imaplib
import logging
import ssl
import time
from dataclasses import dataclass

import redis
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from pipeline.config import Config, MailboxConfig
from pipeline.process import Unavailable
from pipeline.sources.base import (
    PermanentSourceError,
    Sink,
    TransientSourceError,
    chunks,
    known_refs,
)
from pipeline.sources.oauth import access_token, password
from pipeline.sources.settings import SourceSettings
from pipeline.store.db import Store

log = logging.getLogger("pipeline.sources.imap")

# A connection that drops, times out or is refused, and a server answering BYE: try again.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (imaplib.IMAP4.abort, OSError, EOFError)


def ssl_context(source: SourceSettings, config: Config) -> ssl.SSLContext:
    cafile = str(config.resolve_path(source.ca_file)) if source.ca_file else None
    return ssl.create_default_context(cafile=cafile)


def connect(box: MailboxConfig, config: Config) -> IMAPClient:
    """A logged-in client; raises PermanentSourceError or TransientSourceError with one clear line."""
    source = box.source
    where = f"IMAP {source.host}:{source.server_port}"
    context = ssl_context(source, config) if source.security != "none" else None
    try:
        client = IMAPClient(source.host, port=source.server_port, ssl=source.security == "tls",
                            ssl_context=context, timeout=source.timeout_seconds)
        if source.security == "starttls":
            client.starttls(context)
    except ssl.SSLCertVerificationError as exc:
        raise PermanentSourceError(f"{where}: the server's certificate does not verify ({exc.verify_message}); "
                                   "set source.ca_file for a private CA") from None
    except TRANSIENT_ERRORS as exc:
        raise TransientSourceError(f"{where}: cannot connect: {exc}") from None
    except imaplib.IMAP4.error as exc:  # e.g. STARTTLS not offered
        raise PermanentSourceError(f"{where}: {exc}") from None
    try:
        if source.auth == "xoauth2":
            client.oauth2_login(source.username, access_token(source))
        else:
            client.login(source.username, password(source))
    except LoginError as exc:
        _shut(client)
        why = str(exc).strip("b'\"")
        if "[UNAVAILABLE]" in why:  # the server's authentication backend is down: it will come back
            raise TransientSourceError(f"{where}: login as {source.username} failed for now: {why}") from None
        hint = " (the access token is expired or revoked?)" if source.auth == "xoauth2" else ""
        raise PermanentSourceError(f"{where}: login as {source.username} refused{hint}: {why}") from None
    except PermanentSourceError:
        _shut(client)
        raise
    except TRANSIENT_ERRORS as exc:
        raise TransientSourceError(f"{where}: connection lost while logging in: {exc}") from None
    return client


def _shut(client: IMAPClient) -> None:
    try:
        client.shutdown()
    except Exception:  # already gone: nothing left to close
        pass


def logout(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:  # a dropped connection needs no goodbye
        _shut(client)


class ImapState:
    """UIDVALIDITY, the last UID handled and the time of the last full scan, kept in Redis.

    Losing it costs one full scan, nothing more: the journal knows what was fetched.
    """

    def __init__(self, client: redis.Redis, config: Config, mailbox: str) -> None:
        self.client = client
        self.key = f"{config.settings.redis.key_prefix}imap:{mailbox}"

    def load(self) -> tuple[int | None, int, float]:
        raw = {k.decode(): v.decode() for k, v in self.client.hgetall(self.key).items()}
        validity = int(raw["uidvalidity"]) if "uidvalidity" in raw else None
        return validity, int(raw.get("last_uid", 0)), float(raw.get("scanned_at", 0))

    def save(self, uidvalidity: int, last_uid: int, scanned_at: float | None = None) -> None:
        values: dict[str, str] = {"uidvalidity": str(uidvalidity), "last_uid": str(last_uid)}
        if scanned_at is not None:
            values["scanned_at"] = repr(scanned_at)
        self.client.hset(self.key, mapping=values)


@dataclass
class PassResult:
    journaled: int = 0  # newly written to the journal
    finished: int = 0  # moved or flagged (journaled now or by an earlier, interrupted pass)
    failed: int = 0  # moved to the failed folder
    full_scan: bool = False


def fetch_pass(client: IMAPClient, box: MailboxConfig, store: Store, state: ImapState, sink: Sink,
               *, now: float | None = None) -> PassResult:
    """Journal the folder's unhandled mail, then move (or flag) it; see the module's docstring."""
    source = box.source
    now = time.time() if now is None else now
    info = client.select_folder(source.folder)
    uidvalidity = int(info[b"UIDVALIDITY"])
    saved_validity, last_uid, scanned_at = state.load()
    full = saved_validity != uidvalidity or now - scanned_at >= source.reconcile_seconds
    if saved_validity not in (None, uidvalidity):
        log.warning("mailbox %s: UIDVALIDITY of %s changed (%s → %s); scanning the whole folder",
                    box.name, source.folder, saved_validity, uidvalidity)
        last_uid = 0
    if full:
        criteria = ["ALL"] if source.processed == "move" else ["NOT", "KEYWORD", source.processed_flag]
        uids = sorted(client.search(criteria))
    else:
        # "N:*" always matches the highest UID, even when it is below N: filter.
        uids = sorted(u for u in client.search(["UID", f"{last_uid + 1}:*"]) if u > last_uid)
    result = PassResult(full_scan=full)
    if uids:
        _ensure_folders(client, source)
    for batch in chunks(uids, source.fetch_batch):
        _fetch_batch(client, box, uidvalidity, list(batch), store, sink, result)
        last_uid = max(last_uid, max(batch))
        state.save(uidvalidity, last_uid)
    state.save(uidvalidity, last_uid, scanned_at=now if full else None)
    return result


def _fetch_batch(client: IMAPClient, box: MailboxConfig, uidvalidity: int, batch: list[int], store: Store,
                 sink: Sink, result: PassResult) -> None:
    source = box.source
    refs = {uid: f"imap:{box.name}:{uidvalidity}:{uid}" for uid in batch}
    known = known_refs(store, box.name, list(refs.values()))
    sizes = {uid: data.get(b"RFC822.SIZE", 0) for uid, data in client.fetch(batch, ["RFC822.SIZE"]).items()}
    failed: dict[int, str] = {}
    for uid in batch:
        if uid not in sizes:
            continue  # expunged by someone else since the search
        if refs[uid] in known:
            continue
        if sizes[uid] > source.max_message_bytes:
            failed[uid] = f"{sizes[uid]} bytes, over the limit of {source.max_message_bytes}"
    wanted = [uid for uid in batch if uid in sizes and refs[uid] not in known and uid not in failed]
    bodies = client.fetch(wanted, ["BODY.PEEK[]"]) if wanted else {}
    ids: list[int] = [known[refs[uid]] for uid in batch if refs[uid] in known]
    done = [uid for uid in batch if refs[uid] in known and uid in sizes]
    arrived = {uid: bodies.get(uid, {}).get(b"BODY[]") for uid in wanted}
    failed.update({uid: "the server returned no body" for uid, raw in arrived.items() if raw is None})
    fetched = [uid for uid, raw in arrived.items() if raw is not None]
    # The store down (Unavailable) stops here: nothing of this batch is moved, the next pass resumes.
    journaled = sink.journal_each(box.name, [(arrived[uid], refs[uid]) for uid in fetched])
    for uid, outcome in zip(fetched, journaled):
        if isinstance(outcome, Exception):  # one mail the store refuses must not block the others
            log.error("mailbox %s: UID %s could not be journaled: %s: %s", box.name, uid,
                      type(outcome).__name__, outcome, exc_info=outcome)
            failed[uid] = f"not journaled: {type(outcome).__name__}: {outcome}"
            continue
        ids.append(outcome)
        done.append(uid)
        result.journaled += 1
    sink.keepalive()
    # Only now, with every mail of the batch committed to the journal, may the server forget them.
    _finish(client, source, done)
    result.finished += len(done)
    if failed:
        for uid, why in failed.items():
            log.error("mailbox %s: UID %s moved to %s: %s", box.name, uid, source.failed_folder, why)
        _move(client, sorted(failed), source.failed_folder)
        result.failed += len(failed)
    if ids:
        sink.enqueue(ids)


def _ensure_folders(client: IMAPClient, source: SourceSettings) -> None:
    wanted = [source.failed_folder] + ([source.processed_folder] if source.processed == "move" else [])
    for folder in wanted:
        if not client.folder_exists(folder):
            client.create_folder(folder)


def _finish(client: IMAPClient, source: SourceSettings, uids: list[int]) -> None:
    if not uids:
        return
    if source.processed == "move":
        _move(client, uids, source.processed_folder)
    else:
        client.add_flags(uids, [source.processed_flag], silent=True)


def _move(client: IMAPClient, uids: list[int], folder: str) -> None:
    if client.has_capability("MOVE"):
        client.move(uids, folder)
        return
    # Without MOVE (RFC 6851): copy, mark deleted, expunge only these UIDs where UIDPLUS allows.
    client.copy(uids, folder)
    client.delete_messages(uids, silent=True)
    if client.has_capability("UIDPLUS"):
        client.uid_expunge(uids)
    else:
        client.expunge()


def classify(exc: BaseException, box: MailboxConfig) -> Exception:
    """The SourceError an exception from a pass amounts to (others are bugs and propagate)."""
    where = f"IMAP {box.source.host}:{box.source.server_port}"
    if isinstance(exc, Unavailable):
        return TransientSourceError(f"the journal is unavailable: {exc}")
    if isinstance(exc, TRANSIENT_ERRORS):
        return TransientSourceError(f"{where}: connection lost: {exc or type(exc).__name__}")
    if isinstance(exc, imaplib.IMAP4.error):
        why = str(exc).strip("b'\"")
        if "NONEXISTENT" in why:
            return PermanentSourceError(f"{where}: folder {box.source.folder!r} does not exist: {why}")
        return TransientSourceError(f"{where}: {why}")
    raise exc


def fetch_once(box: MailboxConfig, config: Config, store: Store, client: redis.Redis, sink: Sink) -> PassResult:
    """Connect, run one pass, log out: the scheduled fetch of a polling IMAP mailbox."""
    imap = connect(box, config)
    try:
        return fetch_pass(imap, box, store, ImapState(client, config, box.name), sink)
    except (Unavailable, *TRANSIENT_ERRORS, imaplib.IMAP4.error) as exc:
        raise classify(exc, box) from None
    finally:
        logout(imap)
