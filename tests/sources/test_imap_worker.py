"""A Celery worker fetching IMAP is killed with SIGKILL after journaling and before the move:
after a restart every mail is processed exactly once and ends in the processed folder."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from celery import Celery, current_app
from sqlalchemy import func, select

from pipeline.store.db import Store
from pipeline.store.models import JournalEntry, Ticket
from pipeline.tasks.app import create_app
from tests.conftest import make_mail
from tests.services import WorkerProcess, private_redis, wait_until
from tests.sources.conftest import (
    PASSWORD_ENV,
    PASSWORDS,
    imap_source,
    journal_count,
    outcomes,
    write_config,
)
from tests.sources.dovecot import Dovecot
from tests.sources.held_move import HeldMove

pytestmark = pytest.mark.timeout(300)


def _inbox_uids_journaled(store: Store, dovecot: Dovecot) -> int:
    """How many mails are in the journal and still in the INBOX: journaled, not yet moved."""
    with dovecot.client("support") as client:
        uidvalidity = client.select_folder("INBOX", readonly=True)[b"UIDVALIDITY"]
        refs = {f"imap:support:{uidvalidity}:{uid}" for uid in client.search("ALL")}
    with store.sessions() as session:
        journaled = set(session.scalars(select(JournalEntry.source_ref)))
    return len(refs & journaled)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_worker_killed_between_journal_and_imap_move_leaves_each_mail_processed_exactly_once(
        dovecot: Dovecot, tmp_path: Path, db_url: str, key_prefix: str, store: Store) -> None:
    total = 300
    # The batch is journaled in one commit and moved right after: the relay holds the MOVE back,
    # so that the kill falls between the two every time.
    with HeldMove(dovecot.imap_port) as relay:
        config = write_config(tmp_path / "mailboxes.toml", db_url, key_prefix,
                              imap_source(dovecot, idle=False, fetch_batch=300, poll_seconds=1, security="none",
                                          port=relay.port))
        dovecot.append("support", [make_mail(subject=f"Server {i:03d} is down",
                                             message_id=f"<down-{i:03d}@acme.example>",
                                             body=f"Server {i} does not answer.\n" + "z" * 20000)
                                   for i in range(total)])
        env = {**{v: PASSWORDS[u] for u, v in PASSWORD_ENV.items()}}
        with private_redis(tmp_path / "broker") as broker:
            env["CELERY_BROKER_URL"] = broker
            previous = current_app._get_current_object()
            app: Celery = create_app(config)  # a new app makes itself current …
            previous.set_current()  # … which in-process enqueues of later tests must not inherit
            app.conf.broker_url = broker
            worker = WorkerProcess(config.path, tmp_path / "worker.log", env=env).start()
            try:
                app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
                wait_until(relay.holding.is_set, 90, "the fetch did not reach the move")
                worker.kill()
                relay.drop_held()  # the dead worker's MOVE never reaches the server
                assert journal_count(store) == total and _inbox_uids_journaled(store, dovecot) == total, \
                    "the kill did not fall between journal and move"

                worker = WorkerProcess(config.path, tmp_path / "worker2.log", env=env).start()

                def done() -> bool:
                    # As beat would: fetch again (skipped while the dead worker's lock lasts) and reconcile.
                    app.send_task("pipeline.tasks.fetch.fetch_mailbox", args=["support"])
                    app.send_task("pipeline.tasks.maintenance.reconcile", kwargs={"older_than_seconds": 5})
                    counts = outcomes(store)
                    return (counts[None] == 0 and sum(counts.values()) == total
                            and dovecot.count("support", "INBOX") == 0)

                wait_until(done, 150, "not every mail was processed and moved after the restart", every=2)
            finally:
                worker.stop()
                app.close()

    assert outcomes(store) == Counter({"ticket_created": total})
    assert journal_count(store) == total  # the second fetch only moved what the first had journaled
    with store.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Ticket)) == total
        assert session.scalar(select(func.count(func.distinct(JournalEntry.source_ref)))) == total
    assert dovecot.count("support", "INBOX") == 0
    assert dovecot.count("support", "Processed") == total
