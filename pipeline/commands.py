"""Commands by mail (D4): what a technician wrote at the top of a mail, parsed.

Two forms, both only at the top of the body:

1. Autotask-compatible indicators on the first line, nothing else on it:
   ``#T=1.5 #R=Senior Engineer #S=In Progress`` (a value runs to the next indicator);
2. command lines, one per line, case-insensitive: ``#time``, ``#status``,
   ``#wait until``, ``#resolve``, ``#role``, ``#assign``, ``#unassign``, ``#priority``.

`parse_commands` is a plain function: it returns the commands it understood, a failure
for every line it did not (with the line number and why), and the text that is left
for the note. Whether the commands may apply (who sent them, did the mail pass the
trust policy) and what they do to a ticket is decided elsewhere (`pipeline.lifecycle`,
the write stage); what needs the directory (does a role or resource exist) is checked
when they are applied. Customers' words (`accept`, `reject: reason`, `close`) are read
here too, by `parse_customer_answer`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parseaddr
from typing import Literal

from pipeline.config import PRIORITIES, STATUSES

CommandName = Literal["time", "status", "wait_until", "resolve", "role", "assign", "unassign", "priority"]

RESOLUTION_METHODS = ("responded to customer", "no response from customer", "rejected", "rejected as spam")
DEFAULT_RESOLUTION = "responded to customer"

# More than this in one entry is almost always a unit mistake (`#time 90` meaning minutes).
MAX_HOURS = 24.0

COMMAND_FORMS = {
    "time": "#time <duration> [role=<role>] [billable=yes|no]",
    "status": "#status <status name>",
    "wait": "#wait until YYYY-MM-DD [HH:MM]",
    "resolve": "#resolve [<resolution method>]",
    "role": "#role <role>",
    "assign": "#assign <resource address>",
    "unassign": "#unassign",
    "priority": "#priority <" + "|".join(PRIORITIES) + ">",
}


@dataclass(frozen=True)
class Command:
    """One understood command. `line` is 1-based within the body; `text` is as written."""

    name: CommandName
    line: int
    text: str
    value: str | None = None  # status, resolution method, role, address or priority (canonical spelling)
    hours: float | None = None
    role: str | None = None  # `#time … role=…` (checked against the directory when applied)
    billable: bool | None = None
    until: datetime | None = None  # naive: a wall-clock time in the configured time zone


@dataclass(frozen=True)
class CommandFailure:
    line: int
    text: str
    why: str


@dataclass
class ParsedCommands:
    commands: list[Command] = field(default_factory=list)
    failures: list[CommandFailure] = field(default_factory=list)
    # The command lines as written, in order: what a "not applied" note lists.
    lines: list[str] = field(default_factory=list)
    text: str = ""  # the body without the command lines: the note, and a time entry's summary

    @property
    def found(self) -> bool:
        return bool(self.lines)


class _Bad(ValueError):
    """A command that does not parse; the message says why, for the sender."""


_AUTOTASK_LINE = re.compile(r"^#[A-Za-z]+\s*=")
_AUTOTASK_INDICATOR = re.compile(r"#([A-Za-z]+)\s*=\s*(.*?)\s*(?=#[A-Za-z]+\s*=|$)")
# Any line starting with `#` and a letter is meant as a command: a typo must be reported, not kept as text.
_COMMAND_LINE = re.compile(r"^#[A-Za-z]")
_NAME_ARGS = re.compile(r"^#([A-Za-z][A-Za-z_-]*)(.*)$", re.DOTALL)


def parse_commands(body: str) -> ParsedCommands:
    """Commands at the top of `body` (the new text of a mail), and the text that remains.

    Leading blank lines are skipped; the first line may carry Autotask indicators; then
    command lines (blank lines between them allowed) until the first line of text.
    A `#` line after that is text: commands are only read at the top.
    """
    out = ParsedCommands()
    lines = body.splitlines()
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    first = True
    while i < len(lines):
        raw = lines[i].strip()
        if not raw:
            i += 1
            continue
        if not raw.startswith("#") or not (_AUTOTASK_LINE.match(raw) or _COMMAND_LINE.match(raw)):
            break
        out.lines.append(raw)
        if _AUTOTASK_LINE.match(raw):
            if first:
                _parse_indicators(raw, i + 1, out)
            else:
                out.failures.append(CommandFailure(
                    i + 1, raw, "Autotask indicators (#T=, #R=, #S=) are only read on the first line"))
        else:
            try:
                out.commands.append(parse_command_line(raw, i + 1))
            except _Bad as exc:
                out.failures.append(CommandFailure(i + 1, raw, str(exc)))
        first = False
        i += 1
    if out.lines:
        out.text = "\n".join(lines[i:]).strip("\n")
    else:
        out.text = body
    return out


def _parse_indicators(raw: str, line: int, out: ParsedCommands) -> None:
    for m in _AUTOTASK_INDICATOR.finditer(raw):
        key, value = m.group(1).upper(), m.group(2)
        text = m.group(0).strip()
        try:
            if not value:
                raise _Bad(f"#{key}= has no value")
            if key == "T":
                out.commands.append(Command("time", line, text, hours=parse_duration(value)))
            elif key == "R":
                out.commands.append(Command("role", line, text, value=value))
            elif key == "S":
                out.commands.append(_status_command(value, line, text))
            else:
                raise _Bad(f"unknown indicator #{key}=; the first line takes #T= (hours), #R= (role), "
                           "#S= (status)")
        except _Bad as exc:
            out.failures.append(CommandFailure(line, text, str(exc)))


def parse_command_line(raw: str, line: int = 1) -> Command:
    """One `#name args` line to a Command; raises ValueError (with the reason) when it does not parse."""
    m = _NAME_ARGS.match(raw.strip())
    if not m:
        raise _Bad("not a command line")
    name, args = m.group(1).lower(), m.group(2)
    if args and not args[0].isspace():
        raise _Bad(f"write a space after #{name}")
    args = args.strip()
    if name == "time":
        return _time_command(args, line, raw)
    if name == "status":
        if not args:
            raise _Bad(f"no status given; write {COMMAND_FORMS['status']}")
        return _status_command(args, line, raw)
    if name == "wait":
        return Command("wait_until", line, raw, until=_wait_until(args))
    if name == "resolve":
        return Command("resolve", line, raw, value=_choice(args, RESOLUTION_METHODS, "resolution method")
                       if args else DEFAULT_RESOLUTION)
    if name == "role":
        if not args:
            raise _Bad(f"no role given; write {COMMAND_FORMS['role']}")
        return Command("role", line, raw, value=args)
    if name == "assign":
        address = parseaddr(args)[1].strip().lower()
        if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", address):
            raise _Bad(f"no resource address given; write {COMMAND_FORMS['assign']}")
        return Command("assign", line, raw, value=address)
    if name == "unassign":
        if args:
            raise _Bad("#unassign takes nothing after it")
        return Command("unassign", line, raw)
    if name == "priority":
        if not args:
            raise _Bad(f"no priority given; write {COMMAND_FORMS['priority']}")
        return Command("priority", line, raw, value=_choice(args, PRIORITIES, "priority"))
    raise _Bad(f"unknown command #{name}; known: " + ", ".join(f"#{k}" for k in COMMAND_FORMS))


_KEY_VALUE = re.compile(r"\b(role|billable)\s*=\s*", re.IGNORECASE)


def _time_command(args: str, line: int, raw: str) -> Command:
    parts = _KEY_VALUE.split(args)
    duration = parts[0].strip()
    if not duration:
        raise _Bad(f"no duration given; write {COMMAND_FORMS['time']}")
    hours = parse_duration(duration)
    role = billable = None
    for key, value in zip(parts[1::2], parts[2::2]):
        value = value.strip().strip('"').strip()
        if key.lower() == "role":
            if not value:
                raise _Bad("role= has no value")
            role = value
        else:
            billable = _yes_no(value)
    return Command("time", line, raw, hours=hours, role=role, billable=billable)


def _status_command(value: str, line: int, raw: str) -> Command:
    status = _choice(value, STATUSES, "status")
    if status == "Waiting Until":
        raise _Bad("Waiting Until needs a date: write #wait until YYYY-MM-DD [HH:MM]")
    return Command("status", line, raw, value=status)


_UNITS_H = r"(?:h|hr|hrs|hour|hours)"
_UNITS_M = r"(?:m|min|mins|minute|minutes)"
_DURATIONS = (
    (re.compile(rf"(\d+(?:[.,]\d+)?)\s*{_UNITS_H}?", re.I), lambda m: _num(m.group(1))),
    (re.compile(rf"(\d+)\s*{_UNITS_H}\s*(\d+)\s*{_UNITS_M}", re.I), lambda m: int(m.group(1)) + int(m.group(2)) / 60),
    (re.compile(rf"(\d+)\s*{_UNITS_M}", re.I), lambda m: int(m.group(1)) / 60),
    (re.compile(r"(\d+):([0-5]\d)"), lambda m: int(m.group(1)) + int(m.group(2)) / 60),
)


def parse_duration(text: str) -> float:
    """`1.5`, `1h30m`, `90m`, `1.5h`, `1:30` (and `1,5`, `1h 30m`) to hours; ValueError otherwise."""
    value = text.strip()
    for pattern, hours in _DURATIONS:
        m = pattern.fullmatch(value)
        if m:
            result = round(hours(m), 4)
            if result <= 0:
                raise _Bad(f"duration {value!r} is zero")
            if result > MAX_HOURS:
                raise _Bad(f"duration {value!r} is more than {MAX_HOURS:g} hours in one entry "
                           f"(a plain number is hours: did you mean {value}m?)")
            return result
    raise _Bad(f"{value!r} is not a duration; write e.g. 1.5, 1h30m, 90m, 1.5h or 1:30")


def _num(text: str) -> float:
    return float(text.replace(",", "."))


def _yes_no(value: str) -> bool:
    v = value.lower()
    if v in ("yes", "y", "true", "1"):
        return True
    if v in ("no", "n", "false", "0"):
        return False
    raise _Bad(f"billable={value!r}: write billable=yes or billable=no")


def _choice(value: str, options: tuple[str, ...], what: str) -> str:
    """The canonical spelling of `value` among `options`, compared without case or extra spaces."""
    wanted = " ".join(value.split()).lower()
    for option in options:
        if option.lower() == wanted:
            return option
    raise _Bad(f"unknown {what} {value.strip()!r}; one of: " + ", ".join(options))


_DATE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})(?:[ T]+(\d{1,2}):(\d{2}))?")


def _wait_until(args: str) -> datetime:
    rest = re.sub(r"^until\b\s*", "", args, flags=re.I)
    m = _DATE.fullmatch(rest.strip())
    if not m:
        raise _Bad(f"{rest.strip() or 'nothing'!r} is not a date; write {COMMAND_FORMS['wait']}")
    y, mo, d, h, mi = (int(g) if g else 0 for g in m.groups())
    try:
        return datetime(y, mo, d, h, mi)
    except ValueError as exc:
        raise _Bad(f"{rest.strip()!r} is not a date: {exc}") from None


# -- customers' answers (D2) ------------------------------------------------------------------

@dataclass(frozen=True)
class CustomerAnswer:
    word: Literal["accept", "reject", "close"]
    reason: str = ""


_ANSWER = re.compile(r"^(accept|close|reject)\s*[.!]?\s*(?::\s*(.*))?$", re.IGNORECASE)


def parse_customer_answer(text: str) -> CustomerAnswer | None:
    """`accept`, `reject: <reason>` or `close` on the first line of a customer's new text.

    Only the whole first line counts, so "Accepting this is hard…" is a reply, not an answer;
    a reason for `reject` may follow the colon or on the lines below.
    """
    lines = text.strip().splitlines()
    if not lines:
        return None
    m = _ANSWER.match(lines[0].strip())
    if not m:
        return None
    word = m.group(1).lower()
    reason = (m.group(2) or "").strip()
    if word == "reject":
        if not reason:
            reason = "\n".join(lines[1:]).strip()
        return CustomerAnswer("reject", reason)
    if m.group(2) is not None:  # "accept: …" / "close: …" are not the plain words
        return None
    return CustomerAnswer(word)  # type: ignore[arg-type]


# -- who may give commands (D4, D8) -----------------------------------------------------------

def command_authority(sender_kind: str, trust_passed: bool, trust_why: str) -> tuple[bool, str]:
    """May this mail's commands apply? Only a resource's, and only in mail that passed the trust policy."""
    if sender_kind != "resource":
        who = {"contact": "a contact", "new_contact": "a new contact"}.get(sender_kind, "not a known resource")
        return False, f"only a resource may give commands; the sender is {who}"
    if not trust_passed:
        return False, f"the mail did not pass the trust policy: {trust_why}"
    return True, "an authenticated resource"


def not_applied_text(text: str, commands: ParsedCommands, why: str) -> str:
    """The note of a mail whose commands did not apply: its text, then the commands and why."""
    footer = f"[Commands not applied: {why}]\n" + "\n".join(commands.lines)
    return f"{text.rstrip()}\n\n{footer}" if text.strip() else footer
