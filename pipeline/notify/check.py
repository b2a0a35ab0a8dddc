"""What `pipeline check-config` finds wrong with notifications: templates and the [smtp] table.

Template errors are found here, before any mail is sent: a syntax error, an unknown
variable, a template that does not render, a subject without the tag the loop depends on.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pipeline.config import Config, locate_key
from pipeline.notify.outbox import ticket_tag
from pipeline.notify.send import smtp_problem
from pipeline.notify.templates import EVENTS, check_event, folder_problem
from pipeline.resolve_back.check import resolve_back_problems

def config_problems(config: Config) -> list[str]:
    """One line per problem, naming the configuration key or the template file and line."""
    problems: list[str] = []
    text = config.path.read_text(encoding="utf-8") if config.path and config.path.is_file() else ""
    numbering = config.settings.numbering
    number = numbering.ticket.format(date=_sample_day(), seq=1)
    tag = ticket_tag(numbering, number)
    checked: set[str | None] = set()
    for i, box in enumerate(config.mailboxes):
        folder = box.notifications.templates
        resolved = str(config.resolve_path(folder)) if folder else None
        if folder:
            problem = folder_problem(config.resolve_path(folder))
            if problem:
                line = locate_key(text, ["mailbox", i, "notifications", "templates"])
                problems.append(f"{config.path}:{line}: mailbox[{i}].notifications.templates: {problem}")
                continue
        if resolved in checked:
            continue
        checked.add(resolved)
        for event in EVENTS:
            problems.extend(check_event(event, resolved, tag, number))
    # The other outbound templates: the HTTP calls that tell an RMM a ticket is done.
    return problems + resolve_back_problems(config)


def config_warnings(config: Config) -> list[str]:
    problem = smtp_problem(config)
    return [problem] if problem else []


def _sample_day() -> datetime:
    return datetime(2026, 11, 23, tzinfo=timezone.utc)
