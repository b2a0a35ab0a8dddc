"""Notification templates (D1.7): sandboxed Jinja2, a plain-text and an HTML part per event.

`<event>.txt` starts with a `Subject:` line, then an empty line, then the plain-text
body; `<event>.html` is the HTML body, autoescaped. A mailbox's `templates` folder
overrides any of the shipped files by name. Errors in templates are found by
`check_templates` (run by `pipeline check-config`), not when a notification is sent.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import (
    ChoiceLoader,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
    TemplateError,
    TemplateSyntaxError,
    meta,
    pass_eval_context,
    select_autoescape,
)
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import Markup, escape

log = logging.getLogger("pipeline.notify")

EVENTS = ("ticket_created", "note_added", "status_changed", "ticket_resolved", "sender_rejected", "command_failed")

# The variables every template may use; any of them may be none where the event has no such thing.
VARIABLES: dict[str, str] = {
    "ticket": "number, title, status, priority, queue (none for mail about a task or project)",
    "entity": "type ('ticket', 'task' or 'project'), number, title, label ('ticket', 'task', 'project')",
    "tag": "the tag for the subject, e.g. [Ticket#T20261123.0001]; replies thread by it",
    "account": "name",
    "contact": "name, email: the ticket's contact",
    "resource": "name, email: the ticket's primary (assigned) resource",
    "mailbox": "name, address, from_name",
    "note": "body, author_name, author_email, internal: the note or mail text this is about",
    "recipient": "name, email, role: who this copy goes to",
}
# What only some events have.
EVENT_VARIABLES: dict[str, dict[str, str]] = {
    "ticket_created": {},
    "note_added": {},
    "status_changed": {"old_status": "the status before", "new_status": "the status now",
                       "wait_until": "for Waiting Until: the date, as text"},
    "ticket_resolved": {"resolver": "who resolved it", "feedback_days": "days in which a reply reopens it"},
    "sender_rejected": {"original_subject": "the subject of the rejected mail"},
    "command_failed": {"original_subject": "the subject of the mail with the commands",
                       "failures": "line, text, why of each failed command",
                       "applied": "the command lines that did apply"},
}

_PACKAGE_LOADER = PackageLoader("pipeline.notify", "templates")


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str | None


class TemplateProblem(Exception):
    """A template that cannot be used; the message names the file and line."""


@pass_eval_context
def _nl2br(eval_ctx: Any, value: object) -> Markup | str:
    # Notes are plain text: keep their lines in HTML, escaping everything else.
    text = escape(value if value is not None else "")
    html = Markup("<br>\n").join(text.split("\n"))
    return html if eval_ctx.autoescape else str(html)


@lru_cache(maxsize=32)
def environment(folder: str | None) -> SandboxedEnvironment:
    """The templates of one override folder (None: only the shipped ones)."""
    loaders = [FileSystemLoader(folder)] if folder else []
    # Sandboxed: per-mailbox overrides must not reach Python internals (D8). Strict: a
    # misspelt variable is an error (check-config finds it), never an empty string.
    env = SandboxedEnvironment(loader=ChoiceLoader([*loaders, _PACKAGE_LOADER]), undefined=StrictUndefined,
                               autoescape=select_autoescape(["html"], default_for_string=False),
                               trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["nl2br"] = _nl2br
    return env


def render(event: str, values: dict[str, Any], folder: str | None = None) -> Rendered:
    """Subject, text and HTML of `event`; raises TemplateError when the template fails."""
    env = environment(folder)
    subject, text = _split_subject(env.get_template(f"{event}.txt").render(values), f"{event}.txt")
    html = None
    if _exists(env, f"{event}.html"):
        html = env.get_template(f"{event}.html").render(values).strip() + "\n"
    return Rendered(subject, text, html)


def render_safely(event: str, values: dict[str, Any], folder: str | None) -> tuple[Rendered, str | None]:
    """Render with the mailbox's overrides; if they fail, with the shipped templates (and say why).

    A broken override must never cost a mail its outcome: check-config reports it, and
    until it is fixed the shipped template speaks.
    """
    if folder:
        try:
            return render(event, values, folder), None
        except (TemplateError, TemplateProblem) as exc:
            log.error("template %s in %s failed (%s); the shipped template is used", event, folder, exc)
            return render(event, values, None), f"override failed: {exc}; shipped template used"
    return render(event, values, None), None


def _split_subject(rendered: str, name: str) -> tuple[str, str]:
    first, _, rest = rendered.lstrip("\n").partition("\n")
    if not first.lower().startswith("subject:"):
        raise TemplateProblem(f"{name}: the first line must be 'Subject: …'")
    subject = re.sub(r"\s+", " ", first[len("subject:"):]).strip()[:900]
    return subject, rest.strip("\n") + "\n"


def _exists(env: SandboxedEnvironment, name: str) -> bool:
    try:
        env.get_template(name)
        return True
    except TemplateError:
        return False


# -- checking (pipeline check-config) ---------------------------------------------------------

def sample_values(event: str, tag: str, number: str) -> dict[str, Any]:
    """Values with every documented variable set, for a trial render."""
    values: dict[str, Any] = {
        "ticket": {"number": number, "title": "Printer jams", "status": "New", "priority": "Medium",
                   "queue": "Service Desk"},
        "entity": {"type": "ticket", "number": number, "title": "Printer jams", "label": "ticket"},
        "tag": tag,
        "account": {"name": "Acme Corp"},
        "contact": {"name": "Jane Doe", "email": "jane@acme.example"},
        "resource": {"name": "Tom Tech", "email": "tom@msp.example"},
        "mailbox": {"name": "support", "address": "support@msp.example", "from_name": "Service Desk"},
        "note": {"body": "It jams <again>.\nPage 2.", "author_name": "Jane Doe", "author_email": "jane@acme.example",
                 "internal": False},
        "recipient": {"name": "Jane Doe", "email": "jane@acme.example", "role": "sender"},
        "old_status": "New", "new_status": "Waiting Customer", "wait_until": "2026-12-01 09:00 UTC",
        "resolver": "Tom Tech", "feedback_days": 3, "original_subject": "Printer jams",
        "failures": [{"line": 1, "text": "#time 1h3Om", "why": "'1h3Om' is not a duration"}],
        "applied": ["#priority High"],
    }
    return {k: v for k, v in values.items() if k in VARIABLES or k in EVENT_VARIABLES[event]}


def check_event(event: str, folder: str | None, tag: str, number: str) -> list[str]:
    """What is wrong with one event's templates, as lines naming file and line."""
    env = environment(folder)
    problems = []
    allowed = set(VARIABLES) | set(EVENT_VARIABLES[event]) | set(env.globals)
    for name in (f"{event}.txt", f"{event}.html"):
        if not _exists_or_broken(env, name):
            continue
        source, filename, _ = env.loader.get_source(env, name)
        where = filename or name
        try:
            unknown = sorted(meta.find_undeclared_variables(env.parse(source, name, filename)) - allowed)
        except TemplateSyntaxError as exc:
            problems.append(f"{where}:{exc.lineno}: syntax error: {exc.message}")
            continue
        for var in unknown:
            problems.append(f"{where}:{_line_of(source, var)}: unknown variable {var!r} "
                            f"(known: {', '.join(sorted(allowed - set(env.globals)))})")
    if problems:
        return problems
    try:
        rendered = render(event, sample_values(event, tag, number), folder)
    except TemplateProblem as exc:
        return [f"{_where(env, event + '.txt')}: {exc}"]
    except TemplateError as exc:
        return [f"{_failing_line(exc) or _where(env, event + '.txt')}: does not render: {exc}"]
    if event not in ("sender_rejected",) and tag not in rendered.subject:
        # The loop depends on it: a reply whose client keeps the subject threads by the tag.
        problems.append(f"{_where(env, event + '.txt')}:1: the subject must carry the tag "
                        f"({{{{ tag }}}}, e.g. {tag}); it renders as {rendered.subject!r}")
    return problems


def _exists_or_broken(env: SandboxedEnvironment, name: str) -> bool:
    try:
        env.loader.get_source(env, name)
        return True
    except TemplateError:
        return False


def _where(env: SandboxedEnvironment, name: str) -> str:
    try:
        return env.loader.get_source(env, name)[1] or name
    except TemplateError:
        return name


def _failing_line(exc: BaseException) -> str | None:
    """'file:line' of the template frame that raised: Jinja puts template lines into the traceback."""
    tb = exc.__traceback__
    found = None
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name.endswith((".txt", ".html")):
            found = f"{name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def _line_of(source: str, var: str) -> int:
    for i, line in enumerate(source.splitlines(), start=1):
        if re.search(r"\b" + re.escape(var) + r"\b", line):
            return i
    return 1


def folder_problem(folder: Path) -> str | None:
    if not folder.is_dir():
        return f"templates folder {folder} does not exist"
    unknown = sorted(p.name for p in folder.iterdir()
                     if p.suffix in (".txt", ".html") and p.stem not in EVENTS)
    if unknown:
        return (f"templates folder {folder}: {', '.join(unknown)} replace(s) no shipped template "
                f"(names: {', '.join(e + '.txt/.html' for e in EVENTS)})")
    return None
