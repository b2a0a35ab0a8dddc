"""The `pipeline` command line (D6): a contract — keep names, options and JSON shapes stable.

Machine-readable output goes to stdout, everything else (logs, progress, errors) to
stderr. A command that cannot run (bad configuration, database or Redis unreachable)
prints one line on stderr and exits 75 (EX_TEMPFAIL), so an MTA piping into `ingest`
retries later; `ingest` itself exits 0 for every outcome.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import click

from pipeline.config import ConfigError, load_config
from pipeline.errors import CannotRun
from pipeline.runtime import Runtime

EX_TEMPFAIL = 75


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def _fail(message: str, code: int = EX_TEMPFAIL) -> None:
    click.echo(f"pipeline: error: {message}", err=True)
    sys.exit(code)


def config_option(f: Callable) -> Callable:
    """`--config PATH` on every command (also accepted before the command name)."""

    def remember(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value:
            ctx.find_root().ensure_object(dict)["config"] = value
        return value

    return click.option("--config", "config_path", metavar="PATH", expose_value=False, callback=remember,
                        is_eager=True, help="mailboxes.toml to use (default: $PIPELINE_CONFIG, else ./mailboxes.toml).")(f)


def _runtime() -> Runtime:
    obj = click.get_current_context().find_root().ensure_object(dict)
    if "runtime" not in obj:
        obj["runtime"] = Runtime(obj.get("config"))
    return obj["runtime"]


class _Group(click.Group):
    """Turns the errors every command can hit into one line and exit 75."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, CannotRun) as exc:
            _fail(str(exc))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@config_option
@click.option("-v", "--verbose", is_flag=True, help="Log each stage's decisions to stderr.")
def main(verbose: bool) -> None:
    """mailloop: turn support mail into tickets, notes and answers that thread back.

    Configuration comes from --config PATH, $PIPELINE_CONFIG or ./mailboxes.toml;
    DATABASE_URL, REDIS_URL and CELERY_BROKER_URL override the file.
    Start with `pipeline demo`.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- demo -------------------------------------------------------------------------------------

@main.command()
@config_option
@click.option("--dir", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to keep the demo's database and Maildir (default: a new folder under ./demo-run).")
def demo(run_dir: Path | None) -> None:
    """Run the whole pipeline on the shipped example mail (SQLite, a Maildir, the local Redis)."""
    from pipeline.demo import run_demo

    run_demo(run_dir)


# -- run (one machine) -----------------------------------------------------------------------

def _metrics_bind(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--metrics-bind must be an IP address: a typo is a usage error, not a server listening elsewhere."""
    from pipeline.metrics import bind_address

    try:
        return bind_address(value)
    except ValueError as exc:
        # Click names the option; say so when the value came from the environment instead.
        from_env = ctx.get_parameter_source(param.name) == click.core.ParameterSource.ENVIRONMENT
        raise click.BadParameter(f"$PIPELINE_METRICS_BIND: {exc}" if from_env else str(exc),
                                 param=param) from None


@main.command()
@config_option
@click.option("--mailbox", "mailboxes", multiple=True, metavar="NAME",
              help="Fetch only this mailbox (repeatable); default: every mailbox in the configuration.")
@click.option("--concurrency", type=click.IntRange(1), default=None,
              help="Worker processes (default: one per CPU).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, envvar="PIPELINE_METRICS_PORT",
              help="Serve Prometheus metrics on this port, on 127.0.0.1 unless --metrics-bind says otherwise "
                   "(also $PIPELINE_METRICS_PORT).")
@click.option("--metrics-bind", metavar="ADDRESS", default="127.0.0.1", envvar="PIPELINE_METRICS_BIND",
              callback=_metrics_bind,
              help="IP address the metrics endpoint listens on (also $PIPELINE_METRICS_BIND). Default 127.0.0.1: "
                   "loopback only, as the endpoint has no authentication. To let another machine scrape it, "
                   "give 0.0.0.0 (every IPv4 interface), :: (every interface) or one address of this machine.")
def run(mailboxes: tuple[str, ...], concurrency: int | None, metrics_port: int | None, metrics_bind: str) -> None:
    """Worker, scheduler and fetchers in one process tree, for one machine.

    Runs a Celery worker on every queue; runs the scheduler (Celery beat) only while
    it holds the fleet's scheduler lock in Redis, so two machines never both schedule.
    SIGTERM or SIGINT stops everything cleanly.
    """
    from kombu.utils.url import maybe_sanitize_url

    from pipeline.supervisor import Supervisor

    rt = _runtime()
    names = [rt.config.mailbox(name).name for name in mailboxes] or [b.name for b in rt.config.mailboxes]
    rt.store()  # refuse to start, in one line, when the database is down or has no schema
    client = rt.redis()
    logging.getLogger("pipeline").setLevel(logging.INFO)
    click.echo(f"pipeline run: mailboxes {', '.join(names)}; broker {maybe_sanitize_url(rt.config.broker_url)}",
               err=True)
    from pipeline.tasks import read_status

    supervisor = Supervisor(rt.config, client, names, concurrency, metrics_port=metrics_port,
                            metrics_bind=metrics_bind, read_status=lambda: read_status(rt))
    sys.exit(supervisor.run())


@main.command()
@config_option
@click.option("--mailbox", "mailboxes", multiple=True, metavar="NAME",
              help="Serve only this mailbox (repeatable); default: every IMAP IDLE and SMTP/LMTP mailbox.")
def listen(mailboxes: tuple[str, ...]) -> None:
    """IMAP IDLE fetchers and SMTP/LMTP listeners, in the foreground.

    `pipeline run` starts these itself; run `listen` on its own to fetch and receive on
    machines other than the workers'. SIGTERM or SIGINT stops it cleanly.
    """
    import signal
    import threading

    from pipeline.sources.serve import long_running, serve

    rt = _runtime()
    names = [rt.config.mailbox(name).name for name in mailboxes] or None
    if not long_running(rt.config, names):
        _fail("no mailbox to serve: `listen` serves IMAP mailboxes with idle = true and SMTP/LMTP "
              "listeners (the others are fetched by the scheduled fetch task)", 1)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("pipeline").setLevel(logging.INFO)
    serve(rt.config, names, stop)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status(as_json: bool) -> None:
    """Mailboxes (last fetch, failing, outcomes), queues, lag and quarantine, for the whole fleet."""
    from pipeline.tasks import read_status

    st = read_status(_runtime())
    if as_json:
        _emit(st.as_json())
        return
    from pipeline.render import status_tables

    status_tables(st)


# -- ingest / import / parse -------------------------------------------------------------------

def _read_input(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise CannotRun(f"{source}: cannot read: {exc.strerror or exc}") from None


@main.command()
@config_option
@click.option("--mailbox", required=True, metavar="NAME", help="The mailbox (from mailboxes.toml) the mail arrived in.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line: outcome, entity, reason, trace.")
@click.option("--dry-run", is_flag=True, help="Show every stage's decision and why; write nothing.")
@click.argument("source", metavar="FILE|-")
def ingest(mailbox: str, as_json: bool, dry_run: bool, source: str) -> None:
    """One raw mail through every stage, synchronously (also the MTA pipe: FILE is -).

    Exits 0 for every outcome, 75 when it cannot run (so an MTA retries).
    """
    rt = _runtime()
    rt.config.mailbox(mailbox)
    raw = _read_input(source)
    proc = rt.processor()
    result = proc.dry_run(mailbox, raw) if dry_run else proc.ingest(mailbox, raw)
    if as_json:
        _emit(result.as_json())
    else:
        _print_result(result, dry_run)


def _print_result(result: Any, dry_run: bool) -> None:
    entity = f" {result.entity['type']} {result.entity['number'] or '(new)'}" if result.entity else ""
    click.echo(f"{'would be ' if dry_run else ''}{result.outcome}{entity}"
               + (f" — {result.reason}" if result.reason else ""))
    for step in result.trace:
        click.echo(f"  {step.stage:<18} {step.decision:<28} {step.why}")


@main.command(name="import")
@config_option
@click.option("--mailbox", required=True, metavar="NAME", help="The mailbox the backlog belongs to.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per mail.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path), metavar="PATH…")
def import_(mailbox: str, as_json: bool, paths: tuple[Path, ...]) -> None:
    """A backlog: .eml files, folders of them, Maildirs or mbox files; progress and a summary on stderr.

    Each mail's own Date: is its time for the loop guard.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pipeline.process import Unavailable, by_bytes
    from pipeline.sources.files import iter_backlog, mail_date
    from pipeline.tasks.policy import PROCESS_BATCH

    rt = _runtime()
    rt.config.mailbox(mailbox)
    proc = rt.processor()
    items = list(iter_backlog(paths))
    counts: Counter[str] = Counter()
    console = Console(stderr=True)
    with Progress(TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=False, disable=not items) as progress:
        task = progress.add_task("import", total=len(items))
        # In batches, as a fetch and a process task take mail: one journal commit and one
        # processing transaction per batch instead of two per mail (bench/import_backlog.py).
        # Loaded as they are needed, and never more than one batch transaction's worth of bytes.
        loaded = ((raw, ref, mail_date(raw)) for ref, raw in ((ref, load()) for ref, load in items))
        try:
            for chunk in by_bytes(loaded, lambda mail: len(mail[0]), count=PROCESS_BATCH):
                for result in proc.ingest_many(mailbox, chunk):
                    counts[result.outcome] += 1
                    if as_json:
                        _emit(result.as_json())
                progress.advance(task, len(chunk))
        except Unavailable as exc:
            done = sum(counts.values())
            raise Unavailable(f"{exc} — {done} of {len(items)} mail(s) imported before it ({_summary(counts)}); "
                              "run the same import again to finish: what is done comes out already_processed, "
                              "and a worker's reconcile processes what was journaled meanwhile") from None
    console.print(f"imported {len(items)} mail(s): {_summary(counts)}")


def _summary(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing to import"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the parsed mail as one JSON object.")
@click.argument("source", metavar="FILE|-")
def parse(as_json: bool, source: str) -> None:
    """Parse only: headers, text, new text, attachments, auto-reply and bounce signals."""
    from pipeline.parsers.mime import Unparseable, parse_mail

    raw = _read_input(source)
    try:
        mail = parse_mail(raw)
    except Unparseable as exc:
        if as_json:
            _emit({"error": "unparseable", "reason": str(exc)})
        else:
            click.echo(f"unparseable: {exc}")
        return
    data = mail.as_json()
    if as_json:
        _emit(data)
        return
    for key in ("message_id", "from_address", "from_name", "subject", "date", "in_reply_to",
                "is_auto_reply", "is_bounce"):
        click.echo(f"{key:>14}: {data[key]}")
    for a in data["attachments"]:
        click.echo(f"{'attachment':>14}: {a['filename']} ({a['content_type']}, {a['size']} bytes)")
    click.echo("\n" + data["body_new"])


# -- directory, tickets, notifications -------------------------------------------------------

@main.group(cls=_Group)
def directory() -> None:
    """Accounts, contacts, resources, queues and projects."""


@directory.command(name="load")
@config_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def directory_load(file: Path) -> None:
    """Upsert a directory file (TOML, or CSV with a header row); safe to run again."""
    from pipeline.store.directory import load_directory

    rt = _runtime()
    counts = load_directory(rt.store(), file, rt.config.settings.numbering)
    click.echo(f"loaded {file}: " + ", ".join(f"{n} {k}(s)" for k, n in counts.items() if n), err=True)


@main.group(cls=_Group)
def tickets() -> None:
    """List and show tickets."""


@tickets.command(name="list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def tickets_list(as_json: bool) -> None:
    """The newest tickets first."""
    from pipeline.store.queries import list_tickets

    rt = _runtime()
    with rt.store().sessions() as session:
        rows = list_tickets(session)
    if as_json:
        for row in rows:
            _emit(row)
        return
    from pipeline.render import ticket_table

    ticket_table(rows)


@tickets.command(name="show")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object (D6).")
@click.argument("number")
def tickets_show(as_json: bool, number: str) -> None:
    """One ticket with its notes, time entries and timeline."""
    from pipeline.store.queries import show_ticket

    rt = _runtime()
    with rt.store().sessions() as session:
        data = show_ticket(session, number)
    if data is None:
        _fail(f"no ticket {number}", 1)
    if as_json:
        _emit(data)
        return
    from pipeline.render import ticket_detail

    ticket_detail(data)


@main.group(cls=_Group)
def notifications() -> None:
    """The outbox: notifications written with each ticket or note."""


@notifications.command(name="list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--status", type=click.Choice(["pending", "sending", "sent", "failed"]), default=None,
              help="Only notifications in this state.")
def notifications_list(as_json: bool, status: str | None) -> None:
    """Notifications of the last 30 days, newest first: status, event, recipients, subject."""
    from pipeline.store.queries import list_notifications

    rt = _runtime()
    with rt.store().sessions() as session:
        rows = list_notifications(session)
    for row in rows:
        if status and row["status"] != status:
            continue
        if as_json:
            _emit(row)
        else:
            click.echo(f"{row['id']:>5}  {row['status']:<8} {row['event']:<16} {', '.join(row['to']):<32} {row['subject']}")


@notifications.command(name="show")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.argument("notification_id", type=int, metavar="ID")
def notifications_show(as_json: bool, notification_id: int) -> None:
    """One notification: headers, status, attempts, the last error and the rendered text."""
    from pipeline.store.models import Notification
    from pipeline.store.queries import notification_json

    rt = _runtime()
    with rt.store().sessions() as session:
        n = session.get(Notification, notification_id)
        data = notification_json(n, with_body=True) if n else None
        if n is not None:
            data.update(roles={r.email: r.role for r in n.recipients}, attempts=n.attempts,
                        last_error=n.last_error, body_html=n.body_html)
    if data is None:
        _fail(f"no notification {notification_id}", 1)
    if as_json:
        _emit(data)
        return
    for key in ("id", "event", "status", "attempts", "last_error", "from", "to", "subject", "message_id",
                "in_reply_to", "references", "created_at", "sent_at"):
        if data.get(key) is not None:
            click.echo(f"{key:>12}: {data[key]}")
    click.echo("\n" + data["body_text"])


# -- quarantine -----------------------------------------------------------------------------

@main.group(cls=_Group)
def quarantine() -> None:
    """Mail that could not be processed, kept with the stage and the error; replay it once fixed."""


@quarantine.command(name="list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def quarantine_list(as_json: bool) -> None:
    """Quarantined mail, newest first."""
    from pipeline.store.journal import entry_json, quarantined

    with _runtime().store().sessions() as session:
        rows = [entry_json(e) for e in quarantined(session)]
    for row in rows:
        if as_json:
            _emit(row)
        else:
            click.echo(f"{row['id']:>7}  {row['mailbox']:<12} {row['stage'] or '':<14} {row['reason']}")
    if not as_json:
        click.echo(f"{len(rows)} mail(s) in quarantine", err=True)


@quarantine.command(name="show")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.argument("journal_id", type=int, metavar="ID")
def quarantine_show(as_json: bool, journal_id: int) -> None:
    """One journaled mail: where it stopped, the error, every stage's decision."""
    from pipeline.store.journal import entry_json
    from pipeline.store.models import JournalEntry

    with _runtime().store().sessions() as session:
        entry = session.get(JournalEntry, journal_id)
        data = entry_json(entry, with_error=True) if entry else None
    if data is None:
        _fail(f"no journaled mail #{journal_id}", 1)
    if as_json:
        _emit(data)
        return
    for key in ("id", "mailbox", "received_at", "message_id", "from", "subject", "outcome", "stage", "reason"):
        click.echo(f"{key:>12}: {data[key]}")
    for step in data["trace"]:
        click.echo(f"  {step['stage']:<18} {step['decision']:<28} {step['why']}")
    if data["error"]:
        click.echo("\n" + data["error"])


@quarantine.command(name="replay")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the new outcome as `ingest --json` does.")
@click.argument("journal_id", type=int, metavar="ID")
def quarantine_replay(as_json: bool, journal_id: int) -> None:
    """Run a quarantined mail through the pipeline again (safe to repeat)."""
    result = _runtime().processor().replay(journal_id)
    if result is None:
        _fail(f"mail #{journal_id} is not in quarantine (already replayed, or never quarantined)", 1)
    if as_json:
        _emit(result.as_json())
    else:
        _print_result(result, dry_run=False)


# -- configuration and schema --------------------------------------------------------------

@main.command(name="check-config")
@config_option
@click.argument("path", required=False, type=click.Path(dir_okay=False))
def check_config(path: str | None) -> None:
    """Validate mailboxes.toml and every mailbox's notification templates; exit 1 naming file, line and key."""
    from pipeline.notify.check import config_problems, config_warnings
    from pipeline.sources.settings import missing_secrets

    try:
        cfg = load_config(path or _runtime().config_path)
    except ConfigError as exc:
        click.echo(f"pipeline: error: {exc}", err=True)
        sys.exit(1)
    problems = config_problems(cfg) + missing_secrets(cfg)  # a fetcher without its password cannot log in
    for problem in problems:
        click.echo(f"pipeline: error: {problem}", err=True)
    if problems:
        sys.exit(1)
    for warning in config_warnings(cfg):
        click.echo(f"pipeline: warning: {warning}", err=True)
    names = ", ".join(f"{b.name} <{b.address}>" for b in cfg.mailboxes)
    click.echo(f"{cfg.path}: ok — {len(cfg.mailboxes)} mailbox(es): {names}")


@main.group(cls=_Group)
def db() -> None:
    """The database schema."""


@db.command(name="upgrade")
@config_option
def db_upgrade() -> None:
    """Create or migrate the schema to the newest revision (Alembic)."""
    rt = _runtime()
    from pipeline.store.db import Store

    store = Store(rt.config.database_url)
    store.upgrade()
    click.echo(f"database {store.safe_url} is at the newest schema", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
