"""Configuration (D5): `mailboxes.toml` validated into a typed model.

Found by `--config PATH`, else `$PIPELINE_CONFIG`, else `./mailboxes.toml`.
A broken file is refused with file, line, key and what was expected — never a
traceback — by `ConfigError`, whose `str()` is that one line.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.notify.settings import NotificationSettings, SmtpSettings
from pipeline.resolve_back.settings import ResolveBackSettings
from pipeline.settings_model import SettingsModel
from pipeline.sources.settings import SourceSettings

DEFAULT_CONFIG_NAME = "mailboxes.toml"

STATUSES = ("New", "In Progress", "Waiting Customer", "Waiting Until", "Resolved", "Closed")
PRIORITIES = ("Low", "Medium", "High", "Critical")


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line for a person."""


_Model = SettingsModel


class DatabaseSettings(_Model):
    url: str = "sqlite:///mailloop.db"


class RedisSettings(_Model):
    url: str = "redis://127.0.0.1:6379/0"
    # Every key mailloop writes starts with this, so one Redis can serve several installs.
    key_prefix: str = "mailloop:"


class CelerySettings(_Model):
    broker_url: str | None = None  # default: the Redis URL


class LoopGuardSettings(_Model):
    limit: int = Field(2, ge=1)
    window_seconds: int = Field(300, ge=1)
    exempt_trusted_resources: bool = True


class NumberingSettings(_Model):
    timezone: str = "UTC"
    ticket: str = "T{date:%Y%m%d}.{seq:04d}"
    task: str = "K{date:%Y%m%d}.{seq:04d}"
    project: str = "P{date:%Y%m%d}.{seq:04d}"
    ticket_tag: str = "[Ticket#{number}]"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"a time zone name such as 'UTC' or 'Europe/Berlin', got {value!r}")
        return value

    @field_validator("ticket", "task", "project")
    @classmethod
    def _formats(cls, value: str) -> str:
        problem = number_format_problem(value)
        if problem:
            raise ValueError("a number format of text, {date:<strftime>} and {seq[:0Nd]} such as "
                             f"'T{{date:%Y%m%d}}.{{seq:04d}}', got {value!r}: {problem}")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> "NumberingSettings":
        if len({self.ticket, self.task, self.project}) < 3:
            raise ValueError("ticket, task and project numbers need formats of their own (a number names its kind)")
        return self

    @field_validator("ticket_tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        problem = tag_format_problem(value)
        if problem:
            raise ValueError(f"a tag of text and {{number}} such as '[Ticket#{{number}}]', got {value!r}: {problem}")
        return value


# The strftime directives a number's date may use, with what each writes: digits that
# pipeline/parsers/references.py can find again in a subject.
DATE_DIRECTIVES = {"%Y": r"\d{4}", "%y": r"\d{2}", "%m": r"\d{2}", "%d": r"\d{2}", "%j": r"\d{3}",
                   "%H": r"\d{2}", "%%": "%"}
_SEQ_SPEC = re.compile(r"(0\d{1,2})?d?")
# A number's own text: what a subject, our Message-ID's local part and a case-blind lookup
# (numbers are found upper-cased) all carry unchanged.
_NUMBER_TEXT = re.compile(r"[A-Z0-9._/#=-]+")


def number_format_problem(fmt: str) -> str | None:
    """Why `fmt` is no usable ticket, task or project number format, or None.

    Only `{date:<strftime>}` and `{seq[:0Nd]}` are fields: str.format would otherwise reach
    attributes and items of the values (`{date.__class__...}`), and any other spec or text
    could write a number the extractor never finds again. The sequence restarts every day
    (D3), so the date must name the day, or numbers would repeat.
    """
    fields = _fields(fmt)
    if isinstance(fields, str):
        return fields
    names = [name for name, _ in fields]
    if names.count("seq") != 1 or names.count("date") != 1 or set(names) - {"seq", "date"}:
        return "it needs one {seq}, one {date:...} and no other field"
    spec = dict(fields)
    if not _SEQ_SPEC.fullmatch(spec["seq"]):
        return f"{{seq:{spec['seq']}}} is no zero-padded width such as {{seq:04d}}"
    tokens = date_tokens(spec["date"])
    unknown = [t for t in tokens if t.startswith("%") and t not in DATE_DIRECTIVES]
    if unknown:
        return f"{unknown[0]} writes no digits (use {', '.join(list(DATE_DIRECTIVES)[:-1])})"
    if not ({"%Y", "%y"} & set(tokens) and ("%j" in tokens or {"%m", "%d"} <= set(tokens))):
        return "the date must name the day (%Y%m%d or %Y%j): the sequence restarts daily"
    # What it writes, with a sequence of a million a day: found again (upper-cased), carried in
    # our Message-IDs and subjects, and held by the number columns (40 characters).
    widest = fmt.format(date=datetime(2026, 12, 31, 23), seq=999_999)
    if not _NUMBER_TEXT.fullmatch(widest):
        return f"it writes {widest!r}: a number is capital letters, digits and . _ / # = - only"
    if len(widest) > 40:
        return f"it writes {widest!r}, longer than the 40 characters a number may have"
    return None


def date_tokens(spec: str) -> list[str]:
    """A date spec as directives (`%Y`, and a lone `%` at the end) and the text between them."""
    return re.findall(r"%.?|[^%]+", spec, re.DOTALL)


def tag_format_problem(fmt: str) -> str | None:
    """Why `fmt` is no usable subject tag, or None: `{number}` once, nothing else."""
    fields = _fields(fmt)
    if isinstance(fields, str):
        return fields
    if fields != [("number", "")]:
        return "it needs one {number} and no other field or format spec"
    if not fmt.isprintable():
        return "it may not hold control characters (a line break, NUL): it goes into the Subject: line"
    return None


def _fields(fmt: str) -> list[tuple[str, str]] | str:
    """The (name, spec) of each replacement field in `fmt`, or why it cannot be one of ours."""
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as exc:
        return f"not a valid format ({exc})"
    fields = []
    for literal, name, spec, conversion in parsed:
        if "{" in literal or "}" in literal:
            return "braces are only for fields"
        if name is None:
            continue
        if not re.fullmatch(r"[a-z]+", name):
            return f"{{{name}}} is not a field name (no attribute, index or position)"
        if conversion or "{" in (spec or ""):
            return f"{{{name}}} takes no conversion (!r, !s) and no nested field"
        fields.append((name, spec or ""))
    return fields


class DirectorySettings(_Model):
    # Added to the shipped list of public mail domains (pipeline/data/public_domains.txt).
    public_domains_extra: list[str] = []



class TicketDefaults(_Model):
    queue: str | None = None
    priority: Literal["Low", "Medium", "High", "Critical"] = "Medium"
    status: Literal["New", "In Progress"] = "New"
    source: str = "Email"
    category: str | None = None


class UnknownSenderPolicy(_Model):
    match_domain: bool = True  # never for public mail domains
    otherwise: Literal["create_contact", "reject", "quarantine"] = "create_contact"
    default_account: str = "Unassigned"


class DuplicateTicketRule(_Model):
    rule: Literal["note", "link", "new"] = "note"


class AlertSettings(_Model):
    """How alert mail claimed by an RMM stage is correlated (D9, pipeline/parsers/rmm/)."""

    # An alert that fires again within this many seconds of its recovery reopens the same ticket
    # (flapping) instead of opening a new one.
    flap_window_seconds: int = Field(1800, ge=0)
    # Repeats of an open alert: the first adds a note, later ones only count on the ticket
    # (alert_repeat_count, alert_last_seen_at); with N > 0 every Nth repeat adds a note too.
    repeat_note_every: int = Field(0, ge=0)


class TrustPolicy(_Model):
    # authserv-ids whose Authentication-Results are believed (D8).
    authserv_ids: list[str] = []
    # Hosts (besides the authserv-ids) whose Received: lines are inside the trust, e.g.
    # an internal relay between the receiving MX and mailloop.
    trusted_hosts: list[str] = []
    require: Literal["dmarc", "dkim_aligned", "dmarc_or_dkim_aligned"] = "dmarc"
    # Forwarders whose verdict is believed for mail they forwarded to us, by the
    # authserv-id in their ARC-Authentication-Results: "mx.microsoft.com" (Microsoft 365),
    # "mx.google.com" (Google). Only when one of `authserv_ids` says arc=pass (it verified
    # the ARC chain) and the newest ARC set is sealed by that forwarder's own domain;
    # `require` then applies to what the forwarder saw. Empty: ARC is not used.
    arc_authserv_ids: list[str] = []
    # The SMTP/LMTP intake believes an Authentication-Results that came with a mail only from
    # these peers (IP addresses or CIDR ranges of our own MX); from any other peer it believes
    # none, since anyone who can connect could have written one.
    intake_relays: list[str] = []

    @field_validator("intake_relays")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"IP addresses or CIDR ranges such as '192.0.2.25' or '10.0.0.0/24', "
                                 f"got {entry!r}") from None
        return value


class MailboxConfig(_Model):
    name: str = Field(min_length=1)
    address: str = Field(min_length=3)
    source: SourceSettings = SourceSettings()
    ticket_defaults: TicketDefaults = TicketDefaults()
    unknown_sender: UnknownSenderPolicy = UnknownSenderPolicy()
    duplicate_ticket: DuplicateTicketRule = DuplicateTicketRule()
    trust: TrustPolicy = TrustPolicy()
    loop_guard: LoopGuardSettings | None = None  # default: the global [loop_guard]
    # Days after a ticket is Resolved in which a customer reply reopens it; at the end it is Closed (D2).
    feedback_window_days: int = Field(3, ge=0)
    # Close a ticket left this many days in Waiting Customer without an answer; 0: never (D2).
    auto_close_days: int = Field(0, ge=0)
    # Pause the SLA clock while a ticket is Waiting Customer (recorded on the ticket) (D2).
    sla_pause_in_waiting_customer: bool = False
    notifications: NotificationSettings = NotificationSettings()
    parser_stages: list[str] = ["ticket_number", "reply_reference"]
    # Settings per parser stage, by its name: `[mailbox.stage_settings.datto_rmm]` (D9). A stage
    # reads its own table with `ctx.stage_settings(self.name)`.
    stage_settings: dict[str, dict[str, Any]] = {}
    # Plug-ins this mailbox cannot run without: start fails naming one that is not installed.
    require_stages: list[str] = []
    alerts: AlertSettings = AlertSettings()
    # Per RMM stage name, the HTTP call that tells the RMM a person completed an alert's ticket:
    # `[mailbox.resolve_back.datto_rmm]` (pipeline/resolve_back/). None configured: no call.
    resolve_back: dict[str, ResolveBackSettings] = {}
    # Attachments larger than this are recorded as skipped, with the reason; the mail is still
    # processed. None: no limit.
    max_attachment_bytes: int | None = Field(25 * 1024 * 1024, ge=0)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", value):
            raise ValueError(f"a mail address such as 'support@msp.example', got {value!r}")
        return value.lower()


class Settings(_Model):
    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    celery: CelerySettings = CelerySettings()
    smtp: SmtpSettings = SmtpSettings()
    loop_guard: LoopGuardSettings = LoopGuardSettings()
    numbering: NumberingSettings = NumberingSettings()
    directory: DirectorySettings = DirectorySettings()
    mailbox: list[MailboxConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "Settings":
        seen: set[str] = set()
        for box in self.mailbox:
            if box.name in seen:
                raise ValueError(f"mailbox names must be unique; {box.name!r} appears twice")
            seen.add(box.name)
        return self


class Config:
    """Validated settings plus where they came from."""

    def __init__(self, settings: Settings, path: Path | None) -> None:
        self.settings = settings
        self.path = path
        self.base_dir = path.parent if path else Path.cwd()

    @property
    def database_url(self) -> str:
        url = os.environ.get("DATABASE_URL") or self.settings.database.url
        return _resolve_sqlite(url, self.base_dir)

    @property
    def redis_url(self) -> str:
        return os.environ.get("REDIS_URL") or self.settings.redis.url

    @property
    def broker_url(self) -> str:
        return os.environ.get("CELERY_BROKER_URL") or self.settings.celery.broker_url or self.redis_url

    @property
    def mailboxes(self) -> list[MailboxConfig]:
        return list(self.settings.mailbox)

    def mailbox(self, name: str) -> MailboxConfig:
        for box in self.settings.mailbox:
            if box.name == name:
                return box
        known = ", ".join(b.name for b in self.settings.mailbox)
        raise ConfigError(f"{self.path or 'configuration'}: no mailbox named {name!r} (known: {known})")

    def loop_guard_for(self, box: MailboxConfig) -> LoopGuardSettings:
        return box.loop_guard or self.settings.loop_guard

    def resolve_path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def _resolve_sqlite(url: str, base: Path) -> str:
    # Relative SQLite paths are relative to the configuration file, not to the cwd.
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str((base / url[len(prefix):]).resolve())
    return url


def find_config_path(explicit: str | os.PathLike[str] | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("PIPELINE_CONFIG")
    if env:
        return Path(env)
    return Path.cwd() / DEFAULT_CONFIG_NAME


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    path = find_config_path(explicit)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found (give --config PATH, set PIPELINE_CONFIG, "
            f"or create ./{DEFAULT_CONFIG_NAME})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc}") from None
    return parse_config(text, path)


def parse_config(text: str, path: Path | None = None) -> Config:
    name = str(path) if path else "<config>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends with "(at line N, column M)".
        line = getattr(exc, "lineno", None) or _line_from_message(str(exc))
        raise ConfigError(f"{name}:{line}: not valid TOML: {exc}") from None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [p for p in err["loc"] if p not in ("function-after",)]
        line = locate_key(text, loc)
        key = _dotted(loc)
        raise ConfigError(f"{name}:{line}: {key}: {_expected(err)}") from None
    _check_parser_stages(settings, text, name)
    return Config(settings, path)


def _check_parser_stages(settings: Settings, text: str, name: str) -> None:
    # The registry decides what a usable stage is: a registered name or a `module:Class` path (D9).
    from pipeline.registry import stage_problem

    for i, box in enumerate(settings.mailbox):
        for stage in box.require_stages:
            problem = stage_problem(stage)
            if problem:
                line = locate_key(text, ["mailbox", i, "require_stages"])
                raise ConfigError(f"{name}:{line}: mailbox[{i}].require_stages: required plug-in stage "
                                  f"{stage!r} is not installed: {problem}")
        for stage in box.parser_stages:
            problem = stage_problem(stage)
            if problem:
                line = locate_key(text, ["mailbox", i, "parser_stages"])
                raise ConfigError(f"{name}:{line}: mailbox[{i}].parser_stages: {problem}")


def _line_from_message(message: str) -> int | str:
    m = re.search(r"line (\d+)", message)
    return int(m.group(1)) if m else "?"


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _expected(err: dict[str, Any]) -> str:
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see the example mailboxes.toml)"
    if kind == "missing":
        if tuple(err["loc"]) == ("mailbox",):
            return "at least one [[mailbox]] table is required"
        return "required key is missing"
    msg = err["msg"]
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    if kind.startswith("literal"):
        return f"expected {msg.removeprefix('Input should be ')}, got {got!r}"
    if kind in ("int_parsing", "int_type", "bool_type", "bool_parsing", "string_type", "list_type",
                "model_type", "dict_type", "greater_than_equal", "greater_than", "too_short"):
        return f"{msg.lower()}, got {got!r}"
    return f"expected {msg}"


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"]+)\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"]+)\s*=")


def locate_key(text: str, loc: list[Any]) -> int:
    """Best-effort line of the key at `loc` (a pydantic error location) in TOML `text`.

    Walks the file tracking the current table path and array-of-tables indices, and
    returns the line where the deepest matching key (or table header) is written.
    """
    target = list(loc)
    counters: dict[str, int] = {}
    table: list[Any] = []
    best_line = 1  # a key missing from the top level: the file's first line
    best_depth = -1
    for lineno, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            names = header.group(2).replace('"', "").split(".")
            if header.group(1) == "[[":
                dotted = ".".join(names)
                counters[dotted] = counters.get(dotted, -1) + 1
                # Nested arrays of tables restart their counters under a new parent.
                for k in list(counters):
                    if k.startswith(dotted + "."):
                        del counters[k]
            table = _path_with_indices(names, counters)
            path = table
        else:
            key = _KEY.match(line)
            if not key:
                continue
            path = table + [key.group(1).replace('"', "")]
        depth = _match_depth(path, target)
        if depth > best_depth:
            best_depth, best_line = depth, lineno
            if depth == len(target):
                return lineno
    return best_line


def _path_with_indices(names: list[str], counters: dict[str, int]) -> list[Any]:
    path: list[Any] = []
    for i, name in enumerate(names):
        path.append(name)
        dotted = ".".join(names[: i + 1])
        if dotted in counters:
            path.append(counters[dotted])
    return path


def _match_depth(path: list[Any], target: list[Any]) -> int:
    if len(path) > len(target):
        return -1
    for a, b in zip(path, target):
        if a != b:
            return -1
    return len(path)
