"""Templates (D1.7): shipped defaults, per-mailbox overrides, and errors found by check-config, not at send time."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pipeline.notify.templates import EVENTS, render, sample_values
from pipeline.process import MailProcessor
from tests.conftest import config_text, make_mail, run_cli
from tests.notify.conftest import FIXTURES, smtp_table
from tests.notify.helpers import outbox, send_pending
from tests.notify.smtp import SmtpServer

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)


def write_config(tmp_path: Path, overrides: dict[str, str]) -> Path:
    """A configuration whose support mailbox takes its templates from ./templates."""
    folder = tmp_path / "templates"
    folder.mkdir(exist_ok=True)
    for name, text in overrides.items():
        (folder / name).write_text(text, encoding="utf-8")
    path = tmp_path / "mailboxes.toml"
    path.write_text(config_text("sqlite:///x.db", "t:", notifications='{ templates = "templates" }'), encoding="utf-8")
    return path


def check(path: Path):
    return run_cli("check-config", str(path))


@pytest.mark.parametrize("event", EVENTS)
def test_every_shipped_template_renders_with_its_documented_variables(event: str) -> None:
    tag = "[Ticket#T20261123.0001]"
    rendered = render(event, sample_values(event, tag, "T20261123.0001"))
    assert rendered.subject and "\n" not in rendered.subject
    assert event == "sender_rejected" or tag in rendered.subject
    assert rendered.text.strip() and rendered.html and rendered.html.lstrip().startswith("<p>")


def test_the_html_part_escapes_what_mail_put_in_it() -> None:
    values = sample_values("note_added", "[Ticket#T1]", "T1")
    values["note"] = {**values["note"], "body": "<script>alert(1)</script>\nline two"}
    rendered = render("note_added", values)
    assert "<script>" not in rendered.html and "&lt;script&gt;" in rendered.html
    assert "alert(1)&lt;/script&gt;<br>\nline two" in rendered.html
    assert "<script>alert(1)</script>" in rendered.text  # plain text is plain


def test_the_sandbox_keeps_templates_away_from_python_internals(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"ticket_created.txt": "Subject: {{ tag }}\n\n{{ ''.__class__.__mro__ }}\n"})
    result = check(path)
    assert result.returncode == 1
    assert b"ticket_created.txt" in result.stderr and b"unsafe" in result.stderr.lower()


def test_check_config_passes_the_shipped_templates_and_a_good_override(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"ticket_created.txt": (FIXTURES / "ticket_created.txt").read_text()})
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert b"ok" in result.stdout


@pytest.mark.parametrize("name, text, expected", [
    ("note_added.html", "<p>{% if note %}{{ note.body }</p>\n", "note_added.html:1: syntax error"),
    ("ticket_created.txt", "Subject: {{ tag }}\n\nHello {{ recipent.name }}\n",
     "ticket_created.txt:3: unknown variable 'recipent'"),
    ("status_changed.txt", "Subject: {{ tag }}\n\n{{ ticket.nmber }}\n",
     "status_changed.txt:3: does not render: 'dict object' has no attribute 'nmber'"),
    ("ticket_created.txt", "Subject: {{ ticket.title }}\n\nThanks.\n",
     "ticket_created.txt:1: the subject must carry the tag"),
    ("ticket_resolved.txt", "Resolved {{ tag }}\n\nThanks.\n", "the first line must be 'Subject: …'"),
    ("ticket_creatd.txt", "Subject: {{ tag }}\n\nx\n", "ticket_creatd.txt replace(s) no shipped template"),
])
def test_check_config_reports_a_broken_template_with_file_and_line(
        tmp_path: Path, name: str, text: str, expected: str) -> None:
    result = check(write_config(tmp_path, {name: text}))
    assert result.returncode == 1
    assert expected in result.stderr.decode(), result.stderr.decode()
    assert b"Traceback" not in result.stderr


def test_an_override_is_used_for_its_mailbox_only(
        make_config, smtp: SmtpServer, redis_client, tmp_path: Path) -> None:
    from pipeline.store.db import Store

    shutil.copytree(FIXTURES, tmp_path / "templates")
    config = make_config(smtp_table(smtp.port), notifications='{ templates = "templates" }')
    store = Store(config.database_url)
    processor = MailProcessor(config, store, redis_client)
    number = processor.ingest("support", make_mail(subject="Printer jams"), received_at=T0).entity["number"]
    processor.ingest("billing", make_mail(subject="Invoice"), received_at=T0)
    send_pending(store, config)

    support, billing = (r.message for r in smtp.inbox.received)
    assert support["Subject"] == f"Acme helpdesk {number}: Printer jams [Ticket#{number}]"
    assert "in our Service Desk queue" in support.get_body(("plain",)).get_content()
    assert support.get_body(("html",)) is not None  # the shipped HTML part stays where no override replaces it
    assert billing["Subject"].startswith("[Ticket#") and billing["Subject"].endswith("] Invoice")
    store.dispose()


def test_a_broken_override_at_run_time_falls_back_to_the_shipped_template(
        make_config, smtp: SmtpServer, redis_client, tmp_path: Path) -> None:
    from pipeline.store.db import Store

    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "ticket_created.txt").write_text("Subject: {{ tag }}\n\n{{ contact.phone }}\n")
    config = make_config(smtp_table(smtp.port), notifications='{ templates = "templates" }')
    store = Store(config.database_url)
    result = MailProcessor(config, store, redis_client).ingest("support", make_mail(subject="Printer"), received_at=T0)

    assert result.outcome == "ticket_created"  # a template never costs a mail its outcome
    assert any("shipped template used" in s.why for s in result.trace)
    [n] = outbox(store)
    assert n.subject.endswith("] Printer") and "we have opened ticket" in n.body_text
    store.dispose()
