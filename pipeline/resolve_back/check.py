"""What `pipeline check-config` finds wrong with `[mailbox.resolve_back.<stage>]` tables.

Found before any ticket is completed: a template that does not parse, names an unknown
variable or does not render with sample values; a table for a stage the mailbox does not
run; a secret variable not set here. One line each, naming the file, line and key.
"""

from __future__ import annotations

import os
from typing import Any

from jinja2 import TemplateSyntaxError, meta

from pipeline.config import Config, ConfigError, MailboxConfig, locate_key
from pipeline.resolve_back.call import VARIABLES, TemplateProblem, environment, render_request
from pipeline.resolve_back.settings import ResolveBackSettings


def resolve_back_problems(config: Config) -> list[str]:
    """One line per problem with the mailboxes' resolve-back calls."""
    text = config.path.read_text(encoding="utf-8") if config.path and config.path.is_file() else ""
    where = str(config.path or "<config>")
    problems: list[str] = []
    for i, box in enumerate(config.mailboxes):
        for vendor, settings in box.resolve_back.items():
            def at(part: str = "") -> str:
                key = f"mailbox[{i}].resolve_back.{vendor}" + (f".{part}" if part else "")
                path = ["mailbox", i, "resolve_back", vendor, *(part.split(".", 1) if part else [])]
                return f"{where}:{locate_key(text, path)}: {key}"

            if vendor not in _rmm_stages(box):
                problems.append(f"{at()}: the mailbox runs no RMM parser stage named {vendor!r} "
                                f"(its parser_stages: {', '.join(box.parser_stages)})")
            for key, variable in settings.secret_variables():
                if not os.environ.get(variable):
                    problems.append(f"{at(key)}: environment variable {variable} is not set here "
                                    "(needed where the notify task runs)")
            problems.extend(f"{at(part)}: {why}" for part, why in _template_problems(settings))
    return problems


def _template_problems(settings: ResolveBackSettings) -> list[tuple[str, str]]:
    parts = [("url", settings.url), *((f"headers.{n}", t) for n, t in settings.headers.items())]
    if settings.body is not None:
        parts.append(("body", settings.body))
    env = environment()
    found = []
    for part, source in parts:
        try:
            unknown = sorted(meta.find_undeclared_variables(env.parse(source)) - set(VARIABLES))
        except TemplateSyntaxError as exc:
            found.append((part, f"syntax error at template line {exc.lineno}: {exc.message}"))
            continue
        for name in unknown:
            found.append((part, f"unknown variable {name!r} (known: {', '.join(VARIABLES)})"))
    if found:
        return found
    try:
        render_request(settings, sample_values(settings))
    except TemplateProblem as exc:
        return [(exc.part, f"does not render: {exc.why}")]
    return []


def sample_values(settings: ResolveBackSettings) -> dict[str, Any]:
    """Values with every documented variable set, and a stand-in for each declared secret."""
    return {
        "ticket": {"number": "T20261123.0001", "title": "Alert: Disk Usage Monitor - ACME-SRV01", "status": "Resolved",
                   "priority": "High", "resolution": "responded to customer", "resolved_by": "tom@msp.example",
                   "resolved_at": "2026-11-23T09:30:00+00:00"},
        "alert": {"vendor": "datto_rmm", "device": "ACME-SRV01", "site": "Acme Corp", "alert_type": "Disk Usage Monitor",
                  "severity": "High", "alert_id": "7c3e1f0a-9b2d-4e85-a6c4-1d0f3b5e7a92",
                  "key": "datto_rmm:acme-srv01:disk usage monitor"},
        "secrets": {name: "sample-secret" for name in settings.secrets_env},
        "mailbox": {"name": "support"},
    }


def _rmm_stages(box: MailboxConfig) -> set[str]:
    from pipeline.registry import build_parser_stages

    try:
        return {s.name for s in build_parser_stages(box.parser_stages) if hasattr(s, "extract")}
    except ConfigError:
        return set()  # parse_config has refused such a file already
