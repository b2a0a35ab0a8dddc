"""The long-running sources of some mailboxes in one process: `pipeline listen`.

IMAP mailboxes with `idle = true` get an `IdleFetcher` thread each; SMTP/LMTP mailboxes
get one listener per address they share. What they journal is handed to the Celery
process queue, as the scheduled fetch task does. The process keeps running through
database, Redis and server outages (each part retries or answers 451 on its own) and
stops cleanly when `stop` is set (SIGTERM, SIGINT).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from pipeline.config import Config, MailboxConfig
from pipeline.process import MailProcessor, connect_redis
from pipeline.sources.base import Sink
from pipeline.sources.idle import IdleFetcher
from pipeline.sources.intake import plan_listeners, start_listener
from pipeline.sources.settings import runs_long
from pipeline.store.db import Store
from pipeline.tasks.policy import PROCESS_BATCH

log = logging.getLogger("pipeline.sources.serve")

JOIN_SECONDS = 30

if TYPE_CHECKING:
    from pipeline.tasks.process import Coalescer


def long_running(config: Config, names: list[str] | None = None) -> list[MailboxConfig]:
    return [box for box in config.mailboxes if runs_long(box.source) and (not names or box.name in names)]


def units(config: Config, names: list[str] | None = None) -> list[list[str]]:
    """Mailbox names grouped as one process each serves them: an IMAP mailbox alone, and the
    SMTP/LMTP mailboxes of one listener address together (for `pipeline run`'s children)."""
    boxes = long_running(config, names)
    groups = [[box.name] for box in boxes if box.source.kind == "imap"]
    groups += [listener.mailboxes for listener in plan_listeners(boxes)]
    return groups


def celery_enqueue(config: Config) -> Coalescer:
    """Enqueue journal ids on the process queue of this configuration's broker."""
    from pipeline.tasks.app import create_app

    app = create_app(config)
    app.set_default()  # the shared tasks below are sent through this app's broker
    from pipeline.tasks.process import Coalescer, process_batch

    return Coalescer(process_batch.delay, PROCESS_BATCH)


def serve(config: Config, names: list[str] | None, stop: threading.Event) -> None:
    """Run the long-running sources of `names` (default: all) until `stop` is set."""
    boxes = long_running(config, names)
    # Neither the store nor Redis is asked here: a listener must come up (and answer 451)
    # while the database is down, and a fetcher waits for it with backoff.
    store = Store(config.database_url)
    client = connect_redis(config.redis_url)
    processor = MailProcessor(config, store, client)
    enqueue = celery_enqueue(config)
    sink = Sink(processor.journal, enqueue, journal_many=processor.journal_many)
    threads = []
    for box in boxes:
        if box.source.kind == "imap":
            fetcher = IdleFetcher(box, config, store, client, sink, stop)
            thread = threading.Thread(target=fetcher.run, name=f"imap:{box.name}", daemon=True)
            thread.start()
            threads.append(thread)
    controllers = [start_listener(listener, sink, client) for listener in plan_listeners(boxes)]
    try:
        stop.wait()
    finally:
        for controller in controllers:
            controller.stop()
        for thread in threads:
            thread.join(JOIN_SECONDS)
        enqueue.flush()  # what the last mails journaled, before the process exits
        store.dispose()
        client.close()
