"""Several journaled mails in one transaction (`MailProcessor.process_many`), as a process task runs them.

Each mail must come out as if it had been processed alone: later mails see what earlier
ones wrote, one mail's failure rolls back only that mail, and a mail that needs a lock
another worker holds is processed alone after the batch instead of deadlocking it.
"""

from __future__ import annotations

import re
import textwrap
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from pipeline.context import EntityRef
from pipeline.parsers.subject import normalise_subject
from pipeline.process import MailProcessor
from pipeline.store.locks import lock_conversation
from pipeline.store.lookups import Lookups
from pipeline.store.models import JournalEntry, Note, Notification, NotificationRecipient, Ticket
from tests.conftest import make_mail


def _journal(processor: MailProcessor, *mails: bytes) -> list[int]:
    return [processor.journal("support", raw) for raw in mails]


def test_a_later_mail_in_the_batch_sees_the_ticket_an_earlier_one_opened(processor, store) -> None:
    ids = _journal(processor,
                   make_mail(subject="VPN drops every hour", body="It dropped at 9.\n"),
                   make_mail(from_="Bob <bob@fabrikam.example>", subject="Invoice question"),
                   make_mail(subject="VPN drops every hour", body="And again at 10.\n"))
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created", "ticket_created", "note_added"]
    assert results[2].entity == results[0].entity  # the duplicate-ticket rule found the first mail's ticket
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 2
        assert [n.body.strip() for n in s.scalars(select(Note))] == ["And again at 10."]


def test_the_same_batch_again_changes_nothing(processor, store) -> None:
    ids = _journal(processor, make_mail(subject="Disk full"), make_mail(subject="Mouse broken"))
    first = processor.process_many(ids)
    again = processor.process_many(list(reversed(ids)))
    assert [r.outcome for r in again] == [r.outcome for r in reversed(first)]
    assert [r.entity for r in again] == [r.entity for r in reversed(first)]
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 2


POISON = '''
class Poison:
    name = "poison"

    def __call__(self, ctx):
        if "POISON" in ctx.parsed.subject:
            raise ValueError("cannot handle this mail")
'''


def _poisoned(make_config, store, redis_client, tmp_path: Path, monkeypatch, module: str,
              extra_mailbox: str = "") -> MailProcessor:
    """A processor whose parser stage fails on a mail with POISON in its subject (`module`: one per test)."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(POISON))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = make_config(extra_mailbox, parser_stages=f'["ticket_number", "reply_reference", "{module}:Poison"]')
    return MailProcessor(config, store, redis_client)


def test_one_failing_mail_is_quarantined_and_rolls_back_only_itself(make_config, store, redis_client,
                                                                    tmp_path: Path, monkeypatch) -> None:
    processor = _poisoned(make_config, store, redis_client, tmp_path, monkeypatch, "batch_poison")
    ids = _journal(processor, make_mail(subject="Printer jams"),
                   make_mail(from_="New Person <new.person@contoso.example>", subject="POISON in the mail"),
                   make_mail(subject="Scanner jams"))
    savepoints = _count_savepoints(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created", "quarantined", "ticket_created"]
    assert "cannot handle this mail" in results[1].reason
    assert savepoints == []  # it failed before writing anything: quarantined in place, no second run
    with store.sessions() as s:
        poisoned = s.get(JournalEntry, ids[1])
        assert poisoned.failed_stage == "extract" and poisoned.outcome == "quarantined"
        assert s.scalar(select(func.count()).select_from(Ticket)) == 2
        # What the failing mail's savepoint had done (its new contact) is gone with it.
        from pipeline.store.models import Contact
        assert s.scalar(select(Contact).where(Contact.email == "new.person@contoso.example")) is None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_mail_whose_lock_another_worker_holds_waits_until_the_batch_has_committed(processor, store) -> None:
    ids = _journal(processor, make_mail(subject="Printer jams"), make_mail(subject="Fire alarm test"),
                   make_mail(subject="Scanner jams"))
    holder = store.sessions()
    holder.begin()
    lock_conversation(holder, normalise_subject("Fire alarm test"))  # another worker's first mail of it
    out: list = []
    runner = threading.Thread(target=lambda: out.extend(processor.process_many(ids)))
    runner.start()
    try:
        def committed() -> list[str | None]:
            with store.sessions() as s:
                return [s.get(JournalEntry, i).outcome for i in ids]

        deadline = time.monotonic() + 30
        while committed() != ["ticket_created", None, "ticket_created"] and time.monotonic() < deadline:
            time.sleep(0.05)
        # The batch committed its other mails without waiting; the held one waits alone.
        assert committed() == ["ticket_created", None, "ticket_created"]
        assert runner.is_alive()
    finally:
        holder.rollback()
        holder.close()
    runner.join(30)
    assert [r.outcome for r in out] == ["ticket_created"] * 3


def test_a_batch_is_split_so_that_its_mails_fit_the_memory_budget(processor, store) -> None:
    from sqlalchemy import event

    body = "x" * 2000 + "\n"
    ids = _journal(processor, *[make_mail(subject=f"Log {i}", body=body) for i in range(5)])
    processor.batch_bytes = 5000  # two of these mails per transaction
    commits: list[int] = []

    def count(conn) -> None:
        commits.append(1)

    event.listen(store.engine, "commit", count)
    try:
        results = processor.process_many(ids)
    finally:
        event.remove(store.engine, "commit", count)
    assert [r.outcome for r in results] == ["ticket_created"] * 5
    assert len(commits) == 3  # [2, 2, 1]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_ticket_the_batch_holds_is_read_fresh_after_another_worker_changed_it(processor, store) -> None:
    """A batch keeps the tickets it found for its later mails; it must not keep their old state."""
    [created] = processor.process_many(_journal(processor, make_mail(subject="Printer jams on tray 2")))
    ref = EntityRef("ticket", created.entity["number"], "subject")
    with store.sessions() as batch, batch.begin():
        lookups = Lookups(batch)
        assert lookups.entity(ref).status == "New"
        with store.transaction() as other:  # another worker's technician moves the ticket, and commits
            other.execute(update(Ticket).where(Ticket.number == ref.number).values(status="In Progress"))
        assert lookups.entity(ref).status == "In Progress"
        assert batch.get(Ticket, lookups.entity(ref).id).status == "In Progress"


def _count_savepoints(store) -> list[str]:
    from sqlalchemy import event

    sent: list[str] = []

    def one(_conn, _cursor, statement, *_args) -> None:
        if statement.upper().startswith("SAVEPOINT"):
            sent.append(statement)

    event.listen(store.engine, "before_cursor_execute", one)
    return sent


def test_a_batch_in_which_every_mail_succeeds_sends_no_savepoint(processor, store) -> None:
    ids = _journal(processor, make_mail(subject="Printer jams"),
                   make_mail(from_="New Person <new.person@contoso.example>", subject="Monitor flickers"),
                   make_mail(subject="Printer jams", body="Still jamming.\n"))
    savepoints = _count_savepoints(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created", "ticket_created", "note_added"]
    assert savepoints == []


_POISON_TRIGGER = {
    # A row the database refuses in the middle of a mail's write, after its contact and ticket are in.
    "sqlite": ["CREATE TRIGGER poison BEFORE INSERT ON timeline WHEN NEW.who LIKE 'poison%'"
               " BEGIN SELECT RAISE(ABORT, 'poisoned timeline row'); END"],
    "postgresql": ["CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                   " IF NEW.who LIKE 'poison%' THEN RAISE EXCEPTION 'poisoned timeline row'; END IF;"
                   " RETURN NEW; END $$",
                   "CREATE TRIGGER poison BEFORE INSERT ON timeline FOR EACH ROW EXECUTE FUNCTION poison()"],
}
_DROP_POISON = {"sqlite": ["DROP TRIGGER poison"],
                "postgresql": ["DROP TRIGGER poison ON timeline", "DROP FUNCTION poison()"]}


def test_a_mail_failing_after_it_wrote_is_quarantined_and_the_others_are_written_once(processor, store) -> None:
    from sqlalchemy import text

    from pipeline.store.models import Contact, Notification, TimelineEntry

    ids = _journal(processor, make_mail(subject="Printer jams"),
                   make_mail(from_="Poison Ivy <poison.ivy@contoso.example>", subject="Garden hose leaks"),
                   make_mail(from_="Bob <bob@fabrikam.example>", subject="Scanner jams"))
    with store.engine.begin() as conn:
        for statement in _POISON_TRIGGER[store.dialect]:
            conn.execute(text(statement))
    savepoints = _count_savepoints(store)
    try:
        results = processor.process_many(ids)
    finally:
        with store.engine.begin() as conn:
            for statement in _DROP_POISON[store.dialect]:
                conn.execute(text(statement))
    assert [r.outcome for r in results] == ["ticket_created", "quarantined", "ticket_created"]
    assert "poisoned timeline row" in results[1].reason
    assert savepoints  # the batch ran again, a savepoint per mail
    with store.sessions() as s:
        assert s.get(JournalEntry, ids[1]).outcome == "quarantined"
        assert s.scalar(select(func.count()).select_from(Ticket)) == 2
        assert s.scalar(select(func.count()).select_from(TimelineEntry)) == 2
        assert s.scalar(select(func.count()).select_from(Notification)) == 2
        # Its contact and ticket were written before the refused row; they are gone with it.
        assert s.scalar(select(Contact).where(Contact.email == "poison.ivy@contoso.example")) is None
        assert s.scalar(select(Ticket).where(Ticket.title == "Garden hose leaks")) is None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_mail_that_finds_no_free_database_connection_stays_journaled_for_a_retry(config, store,
                                                                                   redis_client) -> None:
    from sqlalchemy import create_engine

    from pipeline.process import Unavailable

    # A pool of one, held by someone else: as when more batches run at once than the pool has connections.
    store.engine.dispose()
    store.engine = create_engine(store.engine.url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    store.sessions.configure(bind=store.engine)
    processor = MailProcessor(config, store, redis_client)
    [journal_id] = _journal(processor, make_mail(subject="Printer jams"))
    holder = store.engine.connect()
    try:
        with pytest.raises(Unavailable, match="stay.*journaled for a retry"):
            processor.process_many([journal_id])
    finally:
        holder.close()
    with store.sessions() as s:
        assert s.get(JournalEntry, journal_id).outcome is None
    assert processor.process_many([journal_id])[0].outcome == "ticket_created"


def _sent(store) -> list[str]:
    """Every statement the store's engine sends from now on, one line each."""
    from sqlalchemy import event

    sent: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda _conn, _cursor, statement, *_args: sent.append(" ".join(statement.split())))
    return sent


def test_a_batch_asks_who_its_senders_are_and_whether_it_saw_them_once_not_per_mail(processor, store) -> None:
    senders = ["Jane Doe <jane@acme.example>", "Kim Lee <kim.lee@fabrikam.example>", "Tom Tech <tom@msp.example>",
               "Ann New <ann.new@acme.example>", "Ben New <ben@mail.fabrikam.example>",
               "Cy Stranger <cy.stranger@gmail.com>"]
    ids = _journal(processor, *[make_mail(from_=s, subject=f"Problem {n}") for n, s in enumerate(senders)])
    sent = _sent(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results[:2]] == ["ticket_created"] * 2
    reads = [s for s in sent if s.startswith("SELECT")]
    for key in ("resources.email", "contacts.email", "account_domains.domain", "processed_mail.identity",
                "notifications.message_id"):
        asked = [s for s in reads if f"WHERE {key} " in s]
        assert len(asked) == 1, (key, asked)  # once for the batch, not once per mail
    with store.sessions() as s:
        from pipeline.store.models import Contact
        ann = s.scalar(select(Contact).where(Contact.email == "ann.new@acme.example"))
        ben = s.scalar(select(Contact).where(Contact.email == "ben@mail.fabrikam.example"))
        # The nearest parent domain's account, as a mail alone would have found it.
        assert (ann.account.name, ben.account.name) == ("Acme Corp", "Fabrikam")


def test_a_batch_answers_its_reads_as_if_each_mail_had_run_alone(processor, store, make_config,
                                                                  redis_client) -> None:
    from pipeline.store.models import Contact

    twice = make_mail(from_="Dee New <dee.new@acme.example>", subject="Monitor flickers")
    mails = [twice, make_mail(from_="Dee New <dee.new@acme.example>", subject="Keyboard sticks"), twice,
             b"this is not a mail at all", make_mail(from_="Dee New <dee.new@acme.example>", subject="Mouse")]
    batch = processor.process_many(_journal(processor, *mails))
    # The copy is seen by the identity its twin wrote earlier in the batch; the new sender is one
    # contact, found by the second mail; the broken mail is quarantined in its turn.
    assert [r.outcome for r in batch] == ["ticket_created", "ticket_created", "already_processed",
                                          "quarantined", "ticket_created"]
    assert batch[3].reason.startswith("unparseable")
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Contact).where(Contact.email == "dee.new@acme.example")) == 1
        assert s.get(JournalEntry, batch[3].journal_id).failed_stage == "parse"


ANOTHER_WORKER = '''
from sqlalchemy import create_engine, text


class AnotherWorker:
    """Another worker commits a row while this batch runs (at its "Printer" mail; once, on conflict nothing)."""

    name = "another_worker"

    def __call__(self, ctx):
        if "Printer" not in ctx.parsed.subject:
            return
        engine = create_engine(ctx.config.database_url)
        with engine.begin() as conn:
            conn.execute(text({statement!r}), {params!r})
        engine.dispose()
'''


def _meeting_another_worker(make_config, store, redis_client, tmp_path: Path, monkeypatch, module: str,
                            statement: str, params: dict | None = None) -> MailProcessor:
    """A processor whose batch meets a row another worker commits (`statement`) while it runs.

    `module` names the parser stage's module: one per test, or the first test's stays imported."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(ANOTHER_WORKER).format(statement=statement,
                                                                                 params=params or {}))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = make_config(parser_stages=f'["ticket_number", "reply_reference", "{module}:AnotherWorker"]')
    return MailProcessor(config, store, redis_client)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_contact_another_worker_creates_after_the_batch_asked_is_taken_without_running_the_batch_again(
        make_config, store, redis_client, tmp_path: Path, monkeypatch) -> None:
    from pipeline.store.models import Contact

    processor = _meeting_another_worker(
        make_config, store, redis_client, tmp_path, monkeypatch, "batch_late_contact",
        "INSERT INTO contacts (email, name, account_id, notifications) "
        "SELECT 'late@acme.example', 'Late Comer', id, true FROM accounts "
        "WHERE name = 'Acme Corp' ON CONFLICT (email) DO NOTHING")
    ids = _journal(processor, make_mail(subject="Printer jams"),
                   make_mail(from_="Late <late@acme.example>", subject="Monitor flickers"))
    # The batch asked who late@ is before the other worker committed: its insert of the contact
    # finds the address taken and the ticket goes to the contact the other worker made.
    savepoints = _count_savepoints(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created", "ticket_created"]
    assert savepoints == []  # no collision: the batch ran once
    assert ("write", "contact found") in [(t.stage, t.decision) for t in results[1].trace]
    with store.sessions() as s:
        [late] = s.scalars(select(Contact).where(Contact.email == "late@acme.example"))
        assert late.name == "Late Comer"
        ticket = s.scalar(select(Ticket).where(Ticket.title == "Monitor flickers"))
        assert ticket.contact_id == late.id


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_first_unknown_sender_another_worker_is_writing_waits_and_shares_its_account_and_contact(
        processor: MailProcessor, store, config) -> None:
    from sqlalchemy import create_engine, event, text

    from pipeline.store.models import Account, Contact

    # Another worker's batch has written the default account and this sender's contact, not yet committed.
    other = create_engine(config.database_url)
    conn = other.connect()
    tx = conn.begin()
    account_id = conn.execute(text("INSERT INTO accounts (name) VALUES ('Unassigned') RETURNING id")).scalar_one()
    conn.execute(text("INSERT INTO contacts (email, name, account_id, notifications) "
                      "VALUES ('kim.late@gmail.com', 'Kim (other worker)', :a, true)"), {"a": account_id})
    inserts: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_a: inserts.append(statement.split("(")[0].strip()))
    committer = threading.Timer(1.0, tx.commit)
    committer.start()
    ids = _journal(processor, make_mail(from_="Kim <kim.late@gmail.com>", subject="VPN drops every hour"))
    savepoints = _count_savepoints(store)
    [result] = processor.process_many(ids)
    committer.join()
    conn.close()
    other.dispose()
    assert result.outcome == "ticket_created"
    assert savepoints == []  # waited for the other worker, then took its rows: no second run
    assert "INSERT INTO accounts" in inserts  # it did try to create the account, and found it taken
    assert ("write", "contact found") in [(t.stage, t.decision) for t in result.trace]
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Account).where(Account.name == "Unassigned")) == 1
        [kim] = s.scalars(select(Contact).where(Contact.email == "kim.late@gmail.com"))
        ticket = s.scalar(select(Ticket).where(Ticket.title == "VPN drops every hour"))
        assert (ticket.contact_id, ticket.account_id, kim.name) == (kim.id, account_id, "Kim (other worker)")


def test_a_batch_writes_its_new_senders_contacts_in_one_statement(processor, store) -> None:
    from pipeline.store.models import Account, Contact

    with store.transaction() as s:  # the default account of strangers exists (its first stranger's mail made it)
        s.add(Account(name="Unassigned"))
    ids = _journal(processor, make_mail(from_="Ann New <ann.new@acme.example>", subject="Printer jams"),
                   make_mail(subject="Scanner jams"),  # jane@acme.example is a contact already
                   make_mail(from_="Cy Stranger <cy.stranger@gmail.com>", subject="Laptop will not boot"),
                   make_mail(from_="Ann New <ann.new@acme.example>", subject="Monitor flickers"),
                   make_mail(from_="Ben New <ben@fabrikam.example>", subject="Invoice question"))
    sent = _sent(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created"] * 5
    # Three new senders, one statement: on PostgreSQL written at the first that needed one (another
    # worker may be writing the same sender), on SQLite held back with the batch's other rows.
    contacts = [q for q in sent if q.startswith("INSERT INTO contacts")]
    assert len(contacts) == 1 and ("ON CONFLICT" in contacts[0]) == (store.dialect == "postgresql")
    assert not [q for q in sent if q.startswith("DELETE FROM contacts")]  # every one was taken
    created = [("write", "contact created") in [(t.stage, t.decision) for t in r.trace] for r in results]
    assert created == [True, False, True, False, True]  # Ann's second mail finds the contact her first made
    with store.sessions() as s:
        rows = s.execute(select(Ticket.title, Contact.email, Contact.name).join(Contact, Ticket.contact_id == Contact.id)
                         .order_by(Ticket.id)).all()
    assert [tuple(r) for r in rows] == [
        ("Printer jams", "ann.new@acme.example", "Ann New"), ("Scanner jams", "jane@acme.example", "Jane Doe"),
        ("Laptop will not boot", "cy.stranger@gmail.com", "Cy Stranger"),
        ("Monitor flickers", "ann.new@acme.example", "Ann New"), ("Invoice question", "ben@fabrikam.example", "Ben New")]


def test_a_new_senders_contact_the_batch_wrote_ahead_is_gone_when_their_mail_is_quarantined(
        make_config, store, redis_client, tmp_path: Path, monkeypatch) -> None:
    from pipeline.store.models import Account, Contact

    processor = _poisoned(make_config, store, redis_client, tmp_path, monkeypatch, "batch_poison_ahead")
    with store.transaction() as s:  # new.person@contoso.example's account: contoso.example is nobody's domain
        s.add(Account(name="Unassigned"))
    ids = _journal(processor, make_mail(from_="Ann New <ann.new@acme.example>", subject="Printer jams"),
                   make_mail(from_="New Person <new.person@contoso.example>", subject="POISON in the mail"))
    sent, savepoints = _sent(store), _count_savepoints(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created", "quarantined"]
    assert savepoints == []  # the poisoned mail took nothing: quarantined in place
    if store.dialect == "postgresql":
        # Ann's mail wrote both new senders' contacts; the one no mail took is deleted before the commit.
        assert len([q for q in sent if q.startswith("INSERT INTO contacts")]) == 1
        assert len([q for q in sent if q.startswith("DELETE FROM contacts")]) == 1
    with store.sessions() as s:
        assert s.scalar(select(Contact).where(Contact.email == "new.person@contoso.example")) is None
        assert s.scalar(select(Contact.name).where(Contact.email == "ann.new@acme.example")) == "Ann New"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_contact_written_ahead_is_not_taken_for_known_by_a_mail_after_one_quarantined_in_place(
        make_config, store, redis_client, tmp_path: Path, monkeypatch) -> None:
    from pipeline.store.models import Contact

    processor = _poisoned(make_config, store, redis_client, tmp_path, monkeypatch, "batch_poison_between")
    [old] = processor.process_many(_journal(processor, make_mail(subject="Old issue")))
    ids = _journal(processor, make_mail(from_="Ann New <ann.new@acme.example>", subject="Printer jams"),
                   make_mail(subject="POISON here"),  # quarantined in place: the batch's cache is emptied
                   make_mail(from_="Ben New <ben@fabrikam.example>", subject="Invoice question"),
                   make_mail(subject=f"Re: [Ticket#{old.entity['number']}] Old issue", body="Any news?\n"))
    savepoints = _count_savepoints(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created", "quarantined", "ticket_created", "note_added"]
    assert savepoints == []
    # Ben's row, written ahead with Ann's, is not there for his mail's reads until his mail takes it.
    assert ("attribute", "new_contact") in [(t.stage, t.decision) for t in results[2].trace]
    assert ("write", "contact created") in [(t.stage, t.decision) for t in results[2].trace]
    with store.sessions() as s:
        ticket = s.scalar(select(Ticket).where(Ticket.title == "Invoice question"))
        assert ticket.contact_id == s.scalar(select(Contact.id).where(Contact.email == "ben@fabrikam.example"))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_contact_written_ahead_has_the_name_and_account_of_the_mail_that_creates_it(
        make_config, store, redis_client, tmp_path: Path, monkeypatch) -> None:
    from pipeline.store.models import Account, Contact

    processor = _poisoned(make_config, store, redis_client, tmp_path, monkeypatch, "batch_poison_other_box",
                          '\n[mailbox.unknown_sender]\nmatch_domain = false\ndefault_account = "Billing Strays"\n')
    with store.transaction() as s:
        s.add(Account(name="Billing Strays"))
    ids = [processor.journal("support", make_mail(from_="Ann Alpha <ann.new@acme.example>", subject="POISON here")),
           processor.journal("billing", make_mail(from_="Ann Beta <ann.new@acme.example>", to="billing@msp.example",
                                                  subject="Invoice question")),
           processor.journal("support", make_mail(from_="Ben New <ben@fabrikam.example>", subject="Printer jams"))]
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["quarantined", "ticket_created", "ticket_created"]
    with store.sessions() as s:
        ann = s.scalar(select(Contact).where(Contact.email == "ann.new@acme.example"))
        # The batch foresaw Ann from her first mail (support: Acme Corp by domain); the mail that created her
        # contact came to billing, which matches no domain.
        assert (ann.name, ann.account.name) == ("Ann Beta", "Billing Strays")
        ticket = s.scalar(select(Ticket).where(Ticket.title == "Invoice question"))
        assert (ticket.contact_id, ticket.account_id) == (ann.id, ann.account_id)


def test_a_default_account_is_created_only_by_a_mail_that_needs_it(
        make_config, store, redis_client, tmp_path: Path, monkeypatch) -> None:
    from pipeline.store.models import Account, Contact

    processor = _poisoned(make_config, store, redis_client, tmp_path, monkeypatch, "batch_poison_default")
    ids = _journal(processor, make_mail(from_="Ann New <ann.new@acme.example>", subject="Printer jams"),
                   make_mail(from_="Cy Stranger <cy.stranger@gmail.com>", subject="POISON here"))
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created", "quarantined"]
    with store.sessions() as s:
        assert s.scalar(select(Account).where(Account.name == "Unassigned")) is None
        assert s.scalar(select(Contact).where(Contact.email == "cy.stranger@gmail.com")) is None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_rmm_senders_address_is_not_written_ahead_as_a_contact(make_config, store, redis_client) -> None:
    from pipeline.store.models import Account
    from tests.rmm.test_rmm import STAGES, ninja_alert

    processor = MailProcessor(make_config(parser_stages=STAGES), store, redis_client)
    with store.transaction() as s:  # where an unknown sender such as the RMM's would go
        s.add(Account(name="Unassigned"))
    ids = [processor.journal("support", make_mail(from_="Ann New <ann.new@acme.example>", subject="Printer jams"))]
    ids += [processor.journal("support", ninja_alert(f"ACME-PC{n}", n)) for n in range(3)]
    sent = _sent(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created"] * 4
    # Only Ann's contact: an alert's sender is nobody's contact, so it is neither written nor deleted.
    assert len([q for q in sent if q.startswith("INSERT INTO contacts")]) == 1
    assert not [q for q in sent if q.startswith("DELETE FROM contacts")]


TRUSTED_TOM = "Authentication-Results: mx.msp.example; dkim=pass header.d=msp.example; dmarc=pass header.from=msp.example"


def test_a_batch_writes_its_timeline_and_identity_marks_in_one_statement_each(processor, store) -> None:
    from pipeline.store.models import ProcessedMail, TimelineEntry

    ids = _journal(processor, *[make_mail(from_=f"User {n} <user{n}@acme.example>", subject=f"Outage {n}")
                                for n in range(4)])
    sent = _sent(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created"] * 4
    assert len([s for s in sent if s.startswith("INSERT INTO timeline")]) == 1
    assert len([s for s in sent if s.startswith("INSERT INTO processed_mail")]) == 1
    with store.sessions() as s:
        rows = s.scalars(select(TimelineEntry).order_by(TimelineEntry.id)).all()
        assert [(r.journal_id, r.what) for r in rows] == [(i, "created") for i in ids]
        assert sorted(s.scalars(select(ProcessedMail.journal_id))) == ids


def test_a_batch_writes_its_new_tickets_and_outbox_rows_in_one_statement_each(processor, store) -> None:
    from pipeline.store.models import Notification, NotificationRecipient

    known = processor.ingest("support", make_mail(subject="Printer jams"))  # jane@acme is a contact from now on
    ids = _journal(processor, *[make_mail(subject=f"Outage {n}") for n in range(4)],
                   make_mail(from_="Kim <kim@acme.example>", subject="VPN drops"))  # a new sender
    sent = _sent(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created"] * 5
    assert len([q for q in sent if q.startswith("INSERT INTO tickets")]) == 1
    assert len([q for q in sent if q.startswith("INSERT INTO notifications")]) == 1
    assert len([q for q in sent if q.startswith("INSERT INTO notification_recipients")]) == 1
    # The ids came from one reservation per table, for the five mails: PostgreSQL's from the sequences,
    # SQLite's past the highest id (its write lock keeps other writers out).
    assert len([q for q in sent if "nextval" in q or re.search(r"max\((tickets|notifications)\.id\)", q)]) == 2
    # The new sender's contact: on PostgreSQL asked at once (another worker may be writing it), on
    # SQLite held back with the rest; one insert either way.
    contacts = [q for q in sent if q.startswith("INSERT INTO contacts")]
    assert len(contacts) == 1 and ("ON CONFLICT" in contacts[0]) == (store.dialect == "postgresql")
    # The ticket numbers: PostgreSQL increments the counter once for the batch on a connection of its
    # own (not the store engine's, which `sent` hears); a SQLite batch reads it once and writes it back once.
    counters = [q for q in sent if "number_sequences" in q]
    assert len(counters) == (0 if store.dialect == "postgresql" else 2)
    with store.sessions() as s:
        rows = s.execute(select(Ticket.number, Ticket.title, Notification.subject, NotificationRecipient.email)
                         .join(Notification, (Notification.entity_id == Ticket.id) & (Notification.entity_type == "ticket"))
                         .join(NotificationRecipient).where(Ticket.id != s.scalar(
                             select(Ticket.id).where(Ticket.number == known.entity["number"])))
                         .order_by(Ticket.id)).all()
    assert [(title, email) for _n, title, _s, email in rows] == [
        ("Outage 0", "jane@acme.example"), ("Outage 1", "jane@acme.example"), ("Outage 2", "jane@acme.example"),
        ("Outage 3", "jane@acme.example"), ("VPN drops", "kim@acme.example")]
    # Each answer carries its own ticket's number, as the results say.
    assert [f"[Ticket#{n}]" in subject for n, _t, subject, _e in rows] == [True] * 5
    assert [n for n, *_ in rows] == [r.entity["number"] for r in results]


def _processed_counting_increments(processor: MailProcessor, ids: list[int]) -> tuple[list, list]:
    """`process_many(ids)`'s results, and the parameters of each counter increment it sent (the
    counter has an engine of its own on PostgreSQL; SQLite's is its count written back)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    increments: list = []

    def heard(_conn, _cursor, statement, params, *_args) -> None:
        if statement.lstrip().startswith("INSERT INTO number_sequences"):
            increments.append(params)

    event.listen(Engine, "before_cursor_execute", heard)
    try:
        return processor.process_many(ids), increments
    finally:
        event.remove(Engine, "before_cursor_execute", heard)


def test_a_batch_takes_its_new_tickets_numbers_at_once_and_foresees_none_for_a_reply(processor, store) -> None:
    from pipeline.store.models import NumberSequence

    first = processor.ingest("support", make_mail(subject="Printer jams"))
    ids = _journal(processor, make_mail(subject="Outage 1"),
                   make_mail(subject=f"Re: [Ticket#{first.entity['number']}] Printer jams", body="Still jams.\n"),
                   make_mail(from_="Kim <kim@acme.example>", subject="VPN drops"), make_mail(subject="Outage 2"),
                   make_mail(subject="Re: Outage 2"))  # the same conversation: a note on the ticket the last opened
    results, increments = _processed_counting_increments(processor, ids)
    assert [r.outcome for r in results] == ["ticket_created", "note_added", "ticket_created", "ticket_created",
                                            "note_added"]
    prefix, seq = first.entity["number"].rsplit(".", 1)
    assert [r.entity["number"] for r in results] == [
        f"{prefix}.{int(seq) + 1:04d}", first.entity["number"], f"{prefix}.{int(seq) + 2:04d}",
        f"{prefix}.{int(seq) + 3:04d}", f"{prefix}.{int(seq) + 3:04d}"]
    if store.dialect == "postgresql":  # three new tickets foreseen (not the replies), taken in one increment
        assert [p["size"] for p in increments] == [3]
    else:  # counted on in memory under the write lock, written back once
        assert len(increments) == 1
    with store.sessions() as s:  # nothing taken past the last number used
        assert s.scalar(select(NumberSequence.last_value).where(NumberSequence.kind == "ticket")) == int(seq) + 3


def test_a_mail_the_loop_guard_will_discard_is_not_foreseen_to_need_a_number(processor, store) -> None:
    looping = dict(from_="Auto Mailer <noreply@acme.example>", subject="Your request was received")
    for _ in range(2):  # the window's two mails
        processor.ingest("support", make_mail(**looping))
    ids = _journal(processor, make_mail(**looping), make_mail(from_="Kim <kim@acme.example>", subject="VPN drops"))
    results, increments = _processed_counting_increments(processor, ids)
    assert [r.outcome for r in results] == ["discarded", "ticket_created"]
    if store.dialect == "postgresql":
        assert [p["size"] for p in increments] == [1]  # Kim's ticket only: the third looping mail was answered "discard" ahead


def test_a_batch_from_known_contacts_reads_them_and_their_accounts_once(processor, store) -> None:
    ids = _journal(processor, *[make_mail(subject=f"Outage {n}") for n in range(3)],
                   make_mail(from_="Kim Lee <kim.lee@fabrikam.example>", subject="Invoice question"))
    sent = _sent(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created"] * 4
    # The notification plan reads each new ticket's contact and account: from the batch's one read of
    # its senders, not by a SELECT per mail.
    by_id = [q for q in sent if re.search(r"FROM (contacts|accounts) WHERE (contacts|accounts)\.id = ", q)]
    assert by_id == []
    with store.sessions() as s:
        notices = s.execute(select(Notification.subject, NotificationRecipient.email).join(NotificationRecipient)
                            .order_by(Notification.id)).all()
    assert [email for _subject, email in notices] == ["jane@acme.example"] * 3 + ["kim.lee@fabrikam.example"]


def test_a_status_command_in_a_batch_reads_the_timeline_it_has_not_yet_written(processor, store) -> None:
    from pipeline.store.models import Notification, TimelineEntry

    number = processor.ingest("support", make_mail(subject="Printer jams")).entity["number"]
    ids = _journal(processor,
                   make_mail(from_="Tom Tech <tom@msp.example>", subject=f"RE: [Ticket#{number}] Printer jams",
                             body="#status Waiting Customer\nWhich tray?\n", top_headers=[TRUSTED_TOM]),
                   make_mail(from_="Bob <bob@fabrikam.example>", subject="Invoice question"))
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["note_added", "ticket_created"]
    with store.sessions() as s:
        [notice] = s.scalars(select(Notification).where(Notification.event == "status_changed"))
        assert "is now Waiting Customer (was In Progress)" in notice.body_text
        ticket = s.scalar(select(Ticket).where(Ticket.number == number))
        timeline = s.scalars(select(TimelineEntry).where(TimelineEntry.entity_id == ticket.id,
                                                         TimelineEntry.entity_type == "ticket")
                             .order_by(TimelineEntry.id)).all()
        # The note's entry comes before the ones the status command wrote, as the mail wrote them.
        assert [(t.what, t.journal_id) for t in timeline] == [
            ("created", ids[0] - 1), ("note added", ids[0]), ("assigned", ids[0]),
            ("first update by a resource", ids[0]), ("status changed", ids[0])]


def test_a_batch_of_first_updates_keeps_each_timeline_in_the_order_it_was_written(processor, store) -> None:
    from pipeline.store.models import TimelineEntry

    numbers = [processor.ingest("support", make_mail(subject=f"Outage {n}")).entity["number"] for n in range(4)]
    ids = _journal(processor, *[make_mail(from_="Tom Tech <tom@msp.example>", subject=f"RE: [Ticket#{number}] Outage",
                                          body="Looking into it.\n", top_headers=[TRUSTED_TOM]) for number in numbers])
    sent = _sent(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["note_added"] * 4
    with store.sessions() as s:
        for number in numbers:
            ticket = s.scalar(select(Ticket).where(Ticket.number == number))
            timeline = s.scalars(select(TimelineEntry.what).where(TimelineEntry.entity_id == ticket.id,
                                                                  TimelineEntry.entity_type == "ticket")
                                 .order_by(TimelineEntry.id)).all()
            assert timeline == ["created", "note added", "assigned", "first update by a resource"]
    # The batch's timeline entries, the lifecycle's too, are one statement.
    assert len([q for q in sent if q.startswith("INSERT INTO timeline")]) == 1


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_mail_another_worker_finished_during_the_batch_is_refused_where_the_batch_writes_it(
        make_config, store, redis_client, tmp_path: Path, monkeypatch) -> None:
    from pipeline.parsers.mime import mail_identity, parse_mail
    from pipeline.store.models import ProcessedMail

    copy = make_mail(from_="Bob <bob@fabrikam.example>", subject="Invoice question")
    plain = MailProcessor(make_config(), store, redis_client)
    [elsewhere] = _journal(plain, copy)  # the other worker's journal row of the same mail
    processor = _meeting_another_worker(
        make_config, store, redis_client, tmp_path, monkeypatch, "batch_other_worker",
        "INSERT INTO processed_mail (identity, journal_id, created_at) VALUES (:i, :j, now()) ON CONFLICT DO NOTHING",
        {"i": mail_identity(parse_mail(copy)), "j": elsewhere})
    ids = _journal(processor, make_mail(subject="Printer jams"), copy, make_mail(subject="Scanner jams"))
    # The batch saw the copy as new and held its identity mark back; the store refuses the mark
    # when the batch writes it, and the batch runs again, where the copy is seen as processed.
    savepoints = _count_savepoints(store)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created", "already_processed", "ticket_created"]
    assert results[1].reason == f"same mail as journal #{elsewhere}"
    assert savepoints
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 2
        assert sorted(s.scalars(select(ProcessedMail.journal_id))) == [elsewhere, ids[0], ids[2]]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_batch_tries_its_conversation_locks_in_one_statement_and_still_defers_a_held_one(
        processor, store) -> None:
    from sqlalchemy import event

    from pipeline.store.locks import _conversation, _key

    ids = _journal(processor, make_mail(subject="Printer jams"), make_mail(subject="Fire alarm test"),
                   make_mail(subject="Scanner jams"), make_mail(subject="Printer jams", body="Still jams.\n"))
    holder = store.sessions()
    holder.begin()
    lock_conversation(holder, normalise_subject("Fire alarm test"))  # another worker's first mail of it
    locks: list[tuple[str, object]] = []
    event.listen(store.engine, "before_cursor_execute", lambda _c, _cur, statement, params, *_a: locks.append(
        (statement.split("(")[0], params.get("keys") or params.get("key"))) if "advisory" in statement else None)
    savepoints = _count_savepoints(store)
    out: list = []
    runner = threading.Thread(target=lambda: out.extend(processor.process_many(ids)))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while not any(s == "SELECT pg_advisory_xact_lock" for s, _ in locks) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        holder.rollback()
        holder.close()
    runner.join(30)
    assert [r.outcome for r in out] == ["ticket_created", "ticket_created", "ticket_created", "note_added"]
    fire, printer, scanner = (_key(_conversation(normalise_subject(s)))
                              for s in ("Fire alarm test", "Printer jams", "Scanner jams"))
    batch, *singles = locks
    assert batch == ("SELECT k, pg_try_advisory_xact_lock", sorted({fire, printer, scanner}))
    # The two it got are not asked again; the held one is, in its turn and after the others,
    # then waited for alone once the batch has committed.
    conversation = [(s, k) for s, k in singles if k in (fire, printer, scanner)]
    assert conversation == [("SELECT pg_try_advisory_xact_lock", fire)] * 2 + [("SELECT pg_advisory_xact_lock", fire)]
    assert savepoints == []  # a busy lock before any change is no reason to run the batch again


def _redis_round_trips(monkeypatch) -> list[str]:
    """Every loop-guard round trip to (real) Redis from now on: 'EVALSHA' alone, or 'pipeline'."""
    import redis
    from redis.client import Pipeline

    trips: list[str] = []
    single, many = redis.Redis.execute_command, Pipeline.execute

    def execute_command(self, *args, **options):
        if args and args[0] == "EVALSHA":
            trips.append("EVALSHA")
        return single(self, *args, **options)

    def execute(self, *args, **kwargs):
        trips.append("pipeline " + " ".join(sorted({str(c[0][0]) for c in self.command_stack})))
        return many(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "execute_command", execute_command)
    monkeypatch.setattr(Pipeline, "execute", execute)
    return trips


def test_a_batch_asks_the_loop_guard_in_one_round_trip_and_decides_as_mail_by_mail(
        make_config, store, redis_client, key_prefix, tmp_path: Path, monkeypatch) -> None:
    processor = _poisoned(make_config, store, redis_client, tmp_path, monkeypatch, "batch_poison")
    nas = "NAS01 <nas01@fabrikam.example>"
    mails = [make_mail(subject="Printer jams"), make_mail(from_=nas, subject="Backup failed", body="run 1\n"),
             make_mail(subject="POISON in the mail"), make_mail(from_=nas, subject="Backup failed", body="run 2\n"),
             make_mail(from_="Kim Lee <kim.lee@fabrikam.example>", subject="Scanner jams"),
             make_mail(from_=nas, subject="Backup failed", body="run 3\n")]
    ids = _journal(processor, *mails)
    trips = _redis_round_trips(monkeypatch)
    results = processor.process_many(ids)
    assert [r.outcome for r in results] == ["ticket_created", "ticket_created", "quarantined", "note_added",
                                            "ticket_created", "discarded"]
    # The three mails with a key of their own in one round trip; the looping sender's three, whose
    # answers depend on each other, one by one; the poisoned mail's count taken back in one more.
    assert trips == ["pipeline EVALSHA", "EVALSHA", "EVALSHA", "EVALSHA", "pipeline ZREM"]
    guard = processor.loop_guard

    def counted(from_address: str, subject: str) -> list[int]:
        return sorted(int(m) for m in redis_client.zrange(guard.key("support", from_address, subject), 0, -1))

    # What Redis counts is what the gate, one mail at a time, would have counted.
    assert counted("jane@acme.example", "printer jams") == [ids[0]]
    assert counted("jane@acme.example", "poison in the mail") == []  # quarantined before the gate
    assert counted("nas01@fabrikam.example", "backup failed") == [ids[1], ids[3]]
    assert counted("kim.lee@fabrikam.example", "scanner jams") == [ids[4]]
    # The trace says what it says mail by mail.
    gate = [step for step in results[0].trace if step.stage == "loop_guard"]
    assert gate[0].decision == "pass" and gate[0].why.startswith("1 of 2")
    assert [step.why for step in results[5].trace if step.stage == "loop_guard"][0].startswith("2 mails from nas01")
