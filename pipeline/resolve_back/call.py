"""Making the resolve-back calls: render each claimed row's request, send it with httpx, record the answer.

Templates are rendered when the call is made, not when the row is written, so secrets are
read from the environment then and never stored. They use notify's sandboxed, strict Jinja2
environment (a misspelt variable is an error, never an empty string), and a value that is
not known (`None`, e.g. an alert mail without an alert id) is an error too, rather than the
word "None" in a URL.

What an answer means: 2xx done; 408, 429 and 5xx, a timeout or a refused connection are
transient (retried with backoff); any other answer, a redirect included (it is not followed,
so credentials never go elsewhere), fails the row at once with the answer as the reason.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import httpx
from jinja2 import Template, TemplateError
from jinja2.exceptions import UndefinedError
from jinja2.sandbox import SandboxedEnvironment
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.config import Config, ConfigError, MailboxConfig
from pipeline.notify.templates import environment as notify_environment
from pipeline.resolve_back.outbox import claim, mark_done, mark_failed, mark_retry, utcnow
from pipeline.resolve_back.settings import ResolveBackSettings
from pipeline.store.db import Store
from pipeline.store.models import JournalEntry, ResolveBackCall, Ticket

log = logging.getLogger("pipeline.resolve_back")

# The variables every template may use.
VARIABLES: dict[str, str] = {
    "ticket": "number, title, status, priority, resolution, resolved_by, resolved_at (ISO 8601): as completed",
    "alert": "vendor, device, site, alert_type, severity, alert_id, key: of the ticket's latest alert mail",
    "secrets": "the names in secrets_env, each the value of its environment variable",
    "mailbox": "name",
}
DEFAULT_MAX_ATTEMPTS = ResolveBackSettings.model_fields["max_attempts"].default
USER_AGENT = "mailloop-resolve-back"


class TemplateProblem(Exception):
    """A request that cannot be rendered; the message says which part (`url`, `headers.X`, `body`) and why."""

    def __init__(self, part: str, why: str) -> None:
        super().__init__(f"{part}: {why}")
        self.part, self.why = part, why


class MissingSecret(Exception):
    """A secret's environment variable is not set where the call is made."""


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: str | None


@dataclass
class Report:
    done: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # done already, or claimed by another caller

    def as_json(self) -> dict[str, int]:
        return {k: len(v) for k, v in vars(self).items()}


# -- rendering ------------------------------------------------------------------------------------

def _refuse_none(value: Any) -> Any:
    if value is None:
        raise UndefinedError("a value the template prints is not known for this ticket or alert (none)")
    return value


@lru_cache(maxsize=1)
def environment() -> SandboxedEnvironment:
    """Notify's sandboxed, strict environment (D8), refusing to print None."""
    return notify_environment(None).overlay(finalize=_refuse_none)


@lru_cache(maxsize=256)
def compiled(source: str) -> Template:
    return environment().from_string(source)


def render_request(settings: ResolveBackSettings, values: dict[str, Any]) -> Request:
    """The request `settings` describe for these values; TemplateProblem naming the part that fails."""
    def render(part: str, source: str) -> str:
        try:
            return compiled(source).render(values)
        except TemplateError as exc:
            raise TemplateProblem(part, f"{type(exc).__name__}: {exc}") from None

    url = render("url", settings.url).strip()
    if not re.match(r"https?://[^\s/]+", url, re.IGNORECASE) or re.search(r"\s", url):
        # Not echoed: a rendered URL may carry a secret, and this text is stored and shown.
        raise TemplateProblem("url", "does not render to an http(s) URL (http:// or https://, no white space)")
    headers = {}
    for name, source in settings.headers.items():
        value = render(f"headers.{name}", source).strip()
        if "\r" in value or "\n" in value:
            raise TemplateProblem(f"headers.{name}", "renders with a line break")
        headers[name] = value
    body = render("body", settings.body) if settings.body is not None else None
    return Request(settings.method, url, headers, body)


def read_secrets(settings: ResolveBackSettings) -> dict[str, str]:
    """The secrets by the names the templates use, from the environment of this process."""
    values = {}
    for key, variable in settings.secret_variables():
        value = os.environ.get(variable)
        if not value:
            raise MissingSecret(f"{key}: environment variable {variable} is not set here")
        values[key.removeprefix("secrets_env.")] = value
    return values


# -- what a row says ------------------------------------------------------------------------------

def alert_values(session: Session, box: MailboxConfig, row: ResolveBackCall, alert_key: str) -> dict[str, Any]:
    """The alert's fields, read again from its latest alert mail by the stage that claimed it.

    With the mailbox's own pattern overrides, so the values are those the stage saw. When the
    mail or the stage is gone, device and alert type come from the key (lower-cased there).
    """
    _, device, alert_type = (alert_key.split(":", 2) + ["", ""])[:3]
    values: dict[str, Any] = {"vendor": row.vendor, "device": device or None, "alert_type": alert_type or None,
                              "site": None, "severity": None, "alert_id": None, "key": alert_key}
    stage = _stage(box, row.vendor)
    raw = session.scalar(select(JournalEntry.raw).where(JournalEntry.id == row.alert_journal_id)) \
        if row.alert_journal_id else None
    if stage is None or raw is None:
        return values
    from pipeline.parsers.mime import parse_mail

    mail = parse_mail(raw)
    record = stage.extract(mail.subject or "", mail.body_text or "", dict(box.stage_settings.get(row.vendor, {})))
    if record is not None:
        values.update(device=record.device, alert_type=record.alert_type, site=record.site,
                      severity=record.severity, alert_id=record.alert_id)
    return values


def _stage(box: MailboxConfig, vendor: str) -> Any | None:
    from pipeline.registry import build_parser_stages

    try:
        stages = build_parser_stages(box.parser_stages)
    except ConfigError:
        return None
    return next((s for s in stages if getattr(s, "name", None) == vendor and hasattr(s, "extract")), None)


@dataclass
class _Prepared:
    id: int
    vendor: str
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float = 10
    request: Request | None = None
    error: str | None = None
    transient: bool = False


def prepare(session: Session, config: Config, row: ResolveBackCall) -> _Prepared:
    """The request for one row, or why there is none (a broken template fails; a missing secret waits)."""
    out = _Prepared(row.id, row.vendor)
    box = next((b for b in config.mailboxes if b.name == row.mailbox), None)
    settings = box.resolve_back.get(row.vendor) if box else None
    if box is None or settings is None:
        out.error = f"mailbox {row.mailbox!r} no longer has a [mailbox.resolve_back.{row.vendor}] table"
        return out
    out.max_attempts, out.timeout = settings.max_attempts, settings.timeout_seconds
    try:
        secrets = read_secrets(settings)
    except MissingSecret as exc:
        # Set on another worker, or soon on this one: retried, and failed once out of attempts.
        out.error, out.transient = str(exc), True
        return out
    ticket = session.get(Ticket, row.ticket_id)
    values = {"ticket": dict(row.ticket_values), "mailbox": {"name": box.name}, "secrets": secrets,
              "alert": alert_values(session, box, row, ticket.alert_key or f"{row.vendor}::")}
    try:
        out.request = render_request(settings, values)
    except TemplateProblem as exc:
        out.error = f"template {exc}"
    return out


# -- one batch ------------------------------------------------------------------------------------

def deliver(store: Store, config: Config, ids: list[int], *, lease_seconds: float = 120,
            now: datetime | None = None) -> Report:
    """Make the calls among `ids` that are still to be made; record each outcome."""
    report = Report()
    now = now or utcnow()
    mine = claim(store, ids, now, lease_seconds)
    report.skipped = sorted(set(ids) - set(mine))
    if not mine:
        return report
    with store.sessions() as session:
        rows = session.scalars(select(ResolveBackCall).where(ResolveBackCall.id.in_(mine))
                               .order_by(ResolveBackCall.id)).all()
        waiting = [prepare(session, config, row) for row in rows]
    # A vendor that did not answer (refused, timed out) is not asked again in this batch: its
    # other rows wait for the retry, and the batch stays inside the task's time limit.
    silent: dict[str, str] = {}
    try:
        with httpx.Client(follow_redirects=False, headers={"User-Agent": USER_AGENT}) as client:
            while waiting:
                p = waiting[0]
                if p.request is None:
                    _record(store, p, p.error or "no request", p.transient, None, report, now)
                elif p.vendor in silent:
                    _record(store, p, f"not tried: {silent[p.vendor]}", True, None, report, now)
                else:
                    _call(store, client, p, silent, report, now)
                waiting.pop(0)
    except BaseException:
        # A time limit or a shutdown: give the rows not called back now rather than at the lease's end.
        for p in waiting:
            mark_retry(store, p.id, "interrupted before the call", max_attempts=p.max_attempts, now=now)
        raise
    return report


def _call(store: Store, client: httpx.Client, p: _Prepared, silent: dict[str, str], report: Report,
          now: datetime) -> None:
    r = p.request
    assert r is not None
    try:
        response = client.request(r.method, r.url, headers=r.headers,
                                  content=r.body.encode("utf-8") if r.body is not None else None, timeout=p.timeout)
    except (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.LocalProtocolError) as exc:
        _record(store, p, f"the request cannot be made: {type(exc).__name__}: {exc}", False, None, report, now)
        return
    except (httpx.TimeoutException, httpx.TransportError) as exc:
        error = f"{type(exc).__name__}: {exc or 'no answer'}"
        if isinstance(exc, (httpx.TimeoutException, httpx.ConnectError)):
            silent[p.vendor] = f"{p.vendor} did not answer a moment ago ({error})"
        log.warning("resolve-back call %s to %s: %s; retried later", p.id, p.vendor, error)
        _record(store, p, error, True, None, report, now)
        return
    code = response.status_code
    if 200 <= code < 300:
        mark_done(store, p.id, code)
        report.done.append(p.id)
        log.info("resolve-back call %s to %s: HTTP %s", p.id, p.vendor, code)
        return
    text = " ".join(response.text.split())[:300]
    error = f"HTTP {code} {response.reason_phrase}" + (f": {text}" if text else "")
    _record(store, p, error, code in (408, 429) or code >= 500, code, report, now)


def _record(store: Store, p: _Prepared, error: str, transient: bool, status_code: int | None, report: Report,
            now: datetime) -> None:
    if transient and mark_retry(store, p.id, error, max_attempts=p.max_attempts, status_code=status_code,
                                now=now) == "pending":
        report.retry.append(p.id)
        return
    if not transient:
        mark_failed(store, p.id, error, status_code)
    report.failed.append(p.id)
