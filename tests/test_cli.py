"""The command line (D6) as scripts and MTAs use it: JSON shapes, exit codes, stderr."""

from __future__ import annotations

import json
import mailbox
import re
from datetime import datetime

import pytest

from tests.conftest import fixture_bytes, journal_refusing, make_mail, run_cli
from tests.services import free_port

RESULT_KEYS = {"outcome", "entity", "reason", "trace"}


def cli(config, *args, **kw):
    return run_cli("--config", str(config.path), *args, **kw)


def test_ingest_json_from_stdin_prints_exactly_one_line(config, store) -> None:
    proc = cli(config, "ingest", "--mailbox", "support", "--json", "-", input=make_mail(subject="Mouse broken"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert set(data) == RESULT_KEYS
    assert data["outcome"] == "ticket_created"
    assert data["entity"]["type"] == "ticket" and data["entity"]["number"].startswith("T")
    assert data["reason"] is None
    assert all(set(step) == {"stage", "decision", "why"} for step in data["trace"])


def test_ingest_of_bytes_without_headers_is_quarantined_and_exits_0(config, store) -> None:
    proc = cli(config, "ingest", "--mailbox", "support", "--json", "-", input=fixture_bytes("no_header_block.eml"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["outcome"] == "quarantined" and data["entity"] is None
    assert data["reason"] == "unparseable: no header block"


def test_ingest_dry_run_writes_nothing(config, store) -> None:
    raw = make_mail(subject="Dry")
    proc = cli(config, "ingest", "--dry-run", "--mailbox", "support", "-", input=raw)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert out.startswith("would be ticket_created")
    for stage in ("parse", "authenticate", "attribute", "loop_guard", "write"):
        assert f"  {stage}" in out
    listed = cli(config, "tickets", "list", "--json")
    assert listed.stdout == b""


def test_ingest_exits_75_with_one_line_when_redis_is_down(config, store) -> None:
    proc = cli(config, "ingest", "--mailbox", "support", "--json", "-", input=make_mail(),
               env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert proc.returncode == 75
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "Redis" in err[0] and "redis-server" in err[0]
    assert proc.stdout == b""


def test_ingest_exits_75_when_the_database_is_down(config, store) -> None:
    proc = cli(config, "ingest", "--mailbox", "support", "-", input=make_mail(),
               env={"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/test"})
    assert proc.returncode == 75
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "unreachable" in err[0]


def test_ingest_names_an_unknown_mailbox(config, store) -> None:
    proc = cli(config, "ingest", "--mailbox", "nope", "-", input=make_mail())
    assert proc.returncode == 75
    assert "no mailbox named 'nope'" in proc.stderr.decode()


def test_parse_json_has_the_documented_fields() -> None:
    proc = run_cli("parse", "--json", "-", input=fixture_bytes("attachment_rfc2231.eml"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("message_id", "from_address", "from_name", "subject", "date", "in_reply_to", "references",
                "body_text", "body_new", "attachments", "is_auto_reply", "is_bounce"):
        assert key in data
    assert data["from_address"] == "jane@acme.example"
    pdf = next(a for a in data["attachments"] if a["content_type"] == "application/pdf")
    assert pdf["filename"] == "Fehlerbericht März.pdf" and pdf["size"] > 0


def test_parse_of_unreadable_bytes_still_exits_0() -> None:
    proc = run_cli("parse", "--json", "-", input=b"\x00\x01 not a mail")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["error"] == "unparseable"


def test_tickets_show_json_has_the_documented_shape(config, store) -> None:
    created = json.loads(cli(config, "ingest", "--mailbox", "support", "--json", "-",
                             input=fixture_bytes("new_ticket_plain.eml")).stdout)
    number = created["entity"]["number"]
    proc = cli(config, "tickets", "show", number, "--json")
    assert proc.returncode == 0, proc.stderr
    t = json.loads(proc.stdout)
    assert set(t) >= {"number", "title", "description", "status", "priority", "account", "contact",
                      "assigned_resource", "notes", "time_entries", "timeline"}
    assert t["number"] == number and t["status"] == "New" and t["account"] == "Acme Corp"
    assert t["contact"] == {"name": "Jane Doe", "email": "jane@acme.example"}
    assert t["assigned_resource"] is None and t["time_entries"] == []
    assert set(t["timeline"][0]) == {"at", "who", "what", "from", "to"}
    human = cli(config, "tickets", "list")
    assert number in human.stdout.decode()


def test_tickets_show_of_an_unknown_number_fails_cleanly(config, store) -> None:
    proc = cli(config, "tickets", "show", "T19990101.0001")
    assert proc.returncode == 1 and b"no ticket T19990101.0001" in proc.stderr


def test_import_takes_folders_and_mbox_with_a_summary(config, store, tmp_path) -> None:
    folder = tmp_path / "backlog"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.eml").write_bytes(make_mail(subject=f"Old issue {i}", message_id=f"<old-{i}@acme.example>"))
    box = mailbox.mbox(tmp_path / "archive.mbox")
    box.add(make_mail(from_="kim.lee@fabrikam.example", subject="From the archive"))
    box.flush()

    proc = cli(config, "import", "--mailbox", "support", "--json", str(folder), str(tmp_path / "archive.mbox"))

    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["outcome"] for r in results] == ["ticket_created"] * 4
    assert "imported 4 mail(s): 4 ticket_created" in proc.stderr.decode()
    again = cli(config, "import", "--mailbox", "support", str(folder))
    assert "3 already_processed" in again.stderr.decode()


def _dated(raw: bytes, at: str) -> bytes:
    """`raw` with its Date: header replaced (make_mail dates every mail alike)."""
    return re.sub(rb"^Date: .*$", b"Date: " + at.encode(), raw, count=1, flags=re.MULTILINE)


def test_import_gives_each_mail_its_own_date_for_the_loop_guard(config, store, tmp_path) -> None:
    # A monitoring mail repeated every ten minutes last week: no loop, though the backlog comes at once.
    backlog = tmp_path / "backlog"
    backlog.mkdir()
    for i in range(4):
        raw = make_mail(from_="alerts@acme.example", subject="Nightly backup failed", body=f"Run {i} failed.\n")
        (backlog / f"{i}.eml").write_bytes(_dated(raw, f"Mon, 30 Nov 2026 02:{i * 10:02d}:00 +0000"))
    # Three within a minute: the third is a loop, as it was when they arrived.
    for i in range(3):
        raw = make_mail(from_="Bob <bob@fabrikam.example>", subject="Out of office", body=f"Away {i}.\n")
        (backlog / f"ooo{i}.eml").write_bytes(_dated(raw, f"Mon, 30 Nov 2026 03:00:{i * 20:02d} +0000"))

    proc = cli(config, "import", "--mailbox", "support", "--json", str(backlog))

    assert proc.returncode == 0, proc.stderr
    outcomes = [json.loads(line)["outcome"] for line in proc.stdout.decode().splitlines()]
    # The folder's order: 0–3.eml, then ooo0–2.eml.
    assert outcomes == ["ticket_created", "note_added", "note_added", "note_added",
                        "ticket_created", "note_added", "discarded"]
    from sqlalchemy import select

    from pipeline.store.models import JournalEntry

    with store.sessions() as s:
        received = [at.replace(tzinfo=None) for at in s.scalars(select(JournalEntry.received_at)
                                                                .order_by(JournalEntry.id))]
    assert received[:4] == [datetime(2026, 11, 30, 2, minute) for minute in (0, 10, 20, 30)]


def test_import_of_a_backlog_larger_than_a_batch_keeps_its_order(config, store, tmp_path) -> None:
    backlog = tmp_path / "backlog"
    backlog.mkdir()
    for i in range(120):  # three batches: 50, 50 and 20
        (backlog / f"{i:03d}.eml").write_bytes(make_mail(from_=f"user{i}@acme.example", subject=f"Issue {i:03d}"))

    proc = cli(config, "import", "--mailbox", "support", "--json", str(backlog))

    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert "imported 120 mail(s): 120 ticket_created" in proc.stderr.decode()
    from sqlalchemy import select

    from pipeline.store.models import Ticket

    with store.sessions() as s:
        title_of = dict(s.execute(select(Ticket.number, Ticket.title)).all())
    # Each JSON line is its own mail's result, in the folder's order, numbered in that order.
    assert [title_of[r["entity"]["number"]] for r in results] == [f"Issue {i:03d}" for i in range(120)]
    assert [r["entity"]["number"] for r in results] == sorted(title_of)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_import_the_database_fails_midway_says_how_far_it_got_and_a_rerun_finishes(config, store, tmp_path) -> None:
    from sqlalchemy import func, select

    from pipeline.store.models import Ticket

    backlog = tmp_path / "backlog"
    backlog.mkdir()
    for i in range(60):  # the second batch holds the mail the database fails on
        body = "FAIL-HERE\n" if i == 55 else f"Mail {i}.\n"
        (backlog / f"{i:03d}.eml").write_bytes(make_mail(from_=f"user{i}@acme.example", subject=f"Issue {i:03d}",
                                                         body=body))
    # A transient failure (serialization_failure, as under load), raised by the server for real.
    with journal_refusing(store, "FAIL-HERE", errcode="serialization_failure"):
        failed = cli(config, "import", "--mailbox", "support", str(backlog))

    assert failed.returncode == 75
    error = [line for line in failed.stderr.decode().splitlines() if line.startswith("pipeline: error:")]
    assert len(error) == 1
    assert "50 of 60 mail(s) imported before it (50 ticket_created)" in error[0]
    assert "run the same import again" in error[0]
    again = cli(config, "import", "--mailbox", "support", str(backlog))
    assert again.returncode == 0, again.stderr
    assert "imported 60 mail(s): 50 already_processed, 10 ticket_created" in again.stderr.decode()
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 60


def test_directory_load_is_idempotent_for_toml_and_csv(config, store, tmp_path) -> None:
    csv_file = tmp_path / "contacts.csv"
    csv_file.write_text("email,name,account,notifications\nlee@acme.example,Lee Park,Acme Corp,no\n")
    for _ in range(2):
        proc = cli(config, "directory", "load", str(csv_file))
        assert proc.returncode == 0, proc.stderr
    toml_file = tmp_path / "dir.toml"
    toml_file.write_text('[[account]]\nname = "Globex"\ndomains = ["globex.example"]\n\n'
                         '[[project]]\nname = "Globex rollout"\naccount = "Globex"\ntasks = ["Image laptops"]\n')
    for _ in range(2):
        proc = cli(config, "directory", "load", str(toml_file))
        assert proc.returncode == 0, proc.stderr
    from sqlalchemy import func, select

    from pipeline.store.models import Account, Contact, Project, Task

    with store.sessions() as s:
        lee = s.scalar(select(Contact).where(Contact.email == "lee@acme.example"))
        assert lee.name == "Lee Park" and lee.notifications is False and lee.account.name == "Acme Corp"
        assert s.scalar(select(func.count()).select_from(Account).where(Account.name == "Globex")) == 1
        project = s.scalar(select(Project))
        assert project.number.startswith("P") and [t.title for t in project.tasks] == ["Image laptops"]
        assert s.scalar(select(func.count()).select_from(Task)) == 1


def test_directory_load_names_the_bad_row(config, store, tmp_path) -> None:
    bad = tmp_path / "dir.toml"
    bad.write_text('[[contact]]\nemail = "x@acme.example"\naccount = "No Such Account"\n')
    proc = cli(config, "directory", "load", str(bad))
    assert proc.returncode == 75
    assert proc.stderr.decode().strip() == (f"pipeline: error: {bad}: contact 'x@acme.example': no account "
                                            "'No Such Account' (list it under [[account]])")


def test_help_lists_the_commands() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("demo", "ingest", "import", "parse", "directory", "tickets", "notifications",
                    "check-config", "db"):
        assert command in proc.stdout.decode()
