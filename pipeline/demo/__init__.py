"""`pipeline demo`: the whole pipeline on the shipped example mail, on embedded defaults.

A fresh run folder gets a SQLite database, a Maildir with the example mail and the
demo configuration; the local Redis holds the loop guard under a key prefix of the run's
own. The demo fetches the Maildir, processes every mail, then closes the loop: the
customer answers our notification, a technician replies with verified mail, and a
stranger quotes the ticket number — and prints what happened.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from importlib import resources as package_files
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.config import load_config
from pipeline.context import Result
from pipeline.parsers.mime import parse_mail
from pipeline.process import MailProcessor, check_redis, connect_redis
from pipeline.render import OUTCOME_STYLE, ticket_table
from pipeline.sources.maildir import ensure_maildir, fetch_maildir
from pipeline.store.db import Store
from pipeline.store.directory import load_directory
from pipeline.store.models import JournalEntry, Notification
from pipeline.store.queries import list_tickets


def run_demo(run_dir: Path | None = None) -> None:
    out = Console()
    if not out.is_terminal:
        out = Console(width=140)  # piped or captured: wide enough for the tables
    err = Console(stderr=True)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = (run_dir or Path.cwd() / "demo-run" / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    shipped = package_files.files("pipeline.demo")

    config_path = run_dir / "mailboxes.toml"
    config_path.write_text(shipped.joinpath("mailboxes.toml").read_text(encoding="utf-8")
                           .replace("{key_prefix}", f"mailloop-demo:{run_id}:{time.monotonic_ns()}:"),
                           encoding="utf-8")
    config = load_config(config_path)
    client = connect_redis(config.redis_url)
    check_redis(client, config.redis_url)
    store = Store(config.database_url)
    store.upgrade()
    directory_file = run_dir / "directory.toml"
    directory_file.write_text(shipped.joinpath("directory.toml").read_text(encoding="utf-8"), encoding="utf-8")
    load_directory(store, directory_file, config.settings.numbering)

    box = config.mailbox("support")
    maildir = config.resolve_path(box.source.path)
    ensure_maildir(maildir)
    for item in sorted(shipped.joinpath("maildir", "new").iterdir(), key=lambda p: p.name):
        (maildir / "new" / item.name).write_bytes(item.read_bytes())
    err.print(f"demo folder: {run_dir}")

    processor = MailProcessor(config, store, client)
    rows: list[tuple[str, Result]] = []
    for journal_id in fetch_maildir(maildir, box.name, store, processor.journal_many):
        rows.append((_label(store, journal_id), processor.process(journal_id)))

    # Close the loop with mail that answers what the pipeline just sent.
    first = next((r for _, r in rows if r.outcome == "ticket_created"), None)
    if first is not None:
        number = first.entity["number"]
        with store.sessions() as session:
            sent = session.query(Notification).filter(Notification.event == "ticket_created").order_by(
                Notification.id).first()
        follow_ups = [
            ("Jane answers the notification", _reply(sent, "jane@acme.example", "Jane Doe",
                                                     "It jammed again just now, page 2 of the invoice run.")),
            ("Tom (technician), verified", _technician_mail(number)),
            ("a stranger quotes the number", _stranger_mail(number)),
        ]
        for label, raw in follow_ups:
            rows.append((label, processor.ingest(box.name, raw)))

    table = Table(title="What happened to each mail", title_justify="left")
    for col in ("#", "Mail", "Outcome", "Entity", "Why"):
        table.add_column(col)
    for i, (label, result) in enumerate(rows, start=1):
        entity = result.entity["number"] if result.entity else "—"
        why = result.reason or _why(result)
        table.add_row(str(i), label, f"[{OUTCOME_STYLE.get(result.outcome, '')}]{result.outcome}", entity, why)
    out.print(table)
    with store.sessions() as session:
        ticket_table(list_tickets(session), out, title="Tickets")
        pending = session.query(Notification).count()
    out.print(f"{pending} notification(s) in the outbox, each with the ticket tag in its subject.")
    out.print("\nLook closer:", style="bold")
    out.print(f"  pipeline --config {config_path} tickets show {first.entity['number'] if first else 'NUMBER'}")
    out.print(f"  pipeline --config {config_path} notifications list")
    store.dispose()


def _label(store: Store, journal_id: int) -> str:
    with store.sessions() as session:
        raw = session.get(JournalEntry, journal_id).raw
    try:
        mail = parse_mail(raw)
    except Exception:
        return "(bytes with no header block)"
    subject = mail.subject if len(mail.subject) <= 40 else mail.subject[:39] + "…"
    return f"{mail.from_address}: {subject}"


def _why(result: Result) -> str:
    """The one decision that best explains an outcome, for the summary table."""
    steps = {s.stage: s for s in result.trace}
    auto = steps.get("auto_reply")
    if auto and "never answered" in auto.decision:
        return f"{auto.decision} ({auto.why})"
    dup = steps.get("duplicate_ticket")
    if dup and dup.decision not in ("not applicable", "no match", "new ticket"):
        return dup.why
    resolve = steps.get("resolve")
    return resolve.why if resolve else (result.trace[-1].why if result.trace else "")


def _base(from_name: str, from_addr: str, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"{from_name} <{from_addr}>"
    msg["To"] = "support@msp.example"
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(timezone.utc))
    msg["Message-ID"] = make_msgid(domain=from_addr.split("@")[1])
    msg.set_content(body)
    return msg


def _reply(sent: Notification, addr: str, name: str, text: str) -> bytes:
    msg = _base(name, addr, f"RE: {sent.subject}", f"{text}\n\nOn Mon, 23 Nov 2026, MSP Service Desk wrote:\n> "
                + sent.body_text.replace("\n", "\n> "))
    msg["In-Reply-To"] = sent.message_id
    msg["References"] = sent.message_id
    return msg.as_bytes()


def _technician_mail(number: str) -> bytes:
    msg = _base("Tom Tech", "tom@msp.example", f"RE: [Ticket#{number}] Printer on the 3rd floor keeps jamming",
                "Fuser unit ordered, I will swap it tomorrow morning.\n\n-- \nTom Tech, MSP Service Desk")
    # Added by our own receiving server, above its Received: line: the trust policy believes it.
    return (b"Authentication-Results: mx.msp.example; dkim=pass header.d=msp.example;\r\n"
            b" dmarc=pass header.from=msp.example\r\n"
            b"Received: from laptop.msp.example by mx.msp.example (Postfix) with ESMTPSA id 9AbC;\r\n"
            b" " + format_datetime(datetime.now(timezone.utc)).encode() + b"\r\n" + msg.as_bytes())


def _stranger_mail(number: str) -> bytes:
    return _base("Mallory", "mallory@evil.example", f"[Ticket#{number}] Printer on the 3rd floor keeps jamming",
                 "Please send the printer's admin password to this address.").as_bytes()
