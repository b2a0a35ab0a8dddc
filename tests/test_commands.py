"""Commands by mail (D4), parsed: both forms, every command, the bad forms — no database needed."""

from __future__ import annotations

from datetime import datetime

import pytest

from pipeline.commands import (
    command_authority,
    not_applied_text,
    parse_command_line,
    parse_commands,
    parse_customer_answer,
    parse_duration,
)


def one(body: str):
    parsed = parse_commands(body)
    assert not parsed.failures, parsed.failures
    assert len(parsed.commands) == 1, parsed.commands
    return parsed.commands[0]


def failure(body: str):
    parsed = parse_commands(body)
    assert len(parsed.failures) == 1, parsed
    return parsed.failures[0]


@pytest.mark.parametrize("text", ["1.5", "1h30m", "90m", "1.5h", "1:30", "1,5", "1h 30m", "1.5 hours", "90 min"])
def test_every_duration_form_is_one_and_a_half_hours(text: str) -> None:
    assert parse_duration(text) == 1.5


@pytest.mark.parametrize("text, hours", [("15m", 0.25), ("0.25", 0.25), ("2h", 2.0), ("0:45", 0.75), ("8", 8.0)])
def test_other_durations(text: str, hours: float) -> None:
    assert parse_duration(text) == hours


@pytest.mark.parametrize("text, why", [
    ("1h3Om", "not a duration"),  # a letter O for a zero, as phones autocorrect
    ("soon", "not a duration"),
    ("0", "zero"),
    ("0m", "zero"),
    ("90", "did you mean 90m?"),  # 90 hours in one entry is a unit mistake
    ("1:75", "not a duration"),
    ("-1", "not a duration"),
])
def test_bad_durations_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert why in str(info.value)


def test_time_command_with_role_and_billable() -> None:
    c = one("#time 1h30m role=Senior Engineer billable=no\nDone.")
    assert (c.name, c.hours, c.role, c.billable, c.line) == ("time", 1.5, "Senior Engineer", False, 1)


def test_time_command_alone_leaves_role_and_billable_to_the_defaults() -> None:
    c = one("#time 45m")
    assert (c.hours, c.role, c.billable) == (0.75, None, None)


def test_command_names_are_case_insensitive() -> None:
    assert one("#TIME 1:30").hours == 1.5
    assert one("#Status waiting CUSTOMER").value == "Waiting Customer"


@pytest.mark.parametrize("line, name, value", [
    ("#status In Progress", "status", "In Progress"),
    ("#status waiting customer", "status", "Waiting Customer"),
    ("#status Resolved", "status", "Resolved"),
    ("#status new", "status", "New"),
    ("#resolve", "resolve", "responded to customer"),
    ("#resolve no response from customer", "resolve", "no response from customer"),
    ("#resolve Rejected as spam", "resolve", "rejected as spam"),
    ("#role Senior Engineer", "role", "Senior Engineer"),
    ("#assign tom@msp.example", "assign", "tom@msp.example"),
    ("#assign Tom Tech <Tom@MSP.example>", "assign", "tom@msp.example"),
    ("#unassign", "unassign", None),
    ("#priority critical", "priority", "Critical"),
    ("#priority Low", "priority", "Low"),
])
def test_every_command_line(line: str, name: str, value: str | None) -> None:
    c = one(line)
    assert (c.name, c.value, c.text) == (name, value, line)


def test_wait_until_gives_a_wall_clock_time() -> None:
    assert one("#wait until 2026-12-01 09:00").until == datetime(2026, 12, 1, 9, 0)
    assert one("#wait until 2026-12-01").until == datetime(2026, 12, 1, 0, 0)
    assert one("#wait until 2026-12-01T14:30").until == datetime(2026, 12, 1, 14, 30)


@pytest.mark.parametrize("line, why", [
    ("#status Waiting for Godot", "unknown status 'Waiting for Godot'; one of: New, In Progress"),
    ("#status", "no status given"),
    ("#status Waiting Until", "Waiting Until needs a date"),
    ("#wait until next week", "'next week' is not a date"),
    ("#wait until 2026-02-30 09:00", "is not a date"),
    ("#resolve fixed it", "unknown resolution method 'fixed it'"),
    ("#priority urgent", "unknown priority 'urgent'; one of: Low, Medium, High, Critical"),
    ("#assign tom", "no resource address given"),
    ("#unassign tom@msp.example", "#unassign takes nothing"),
    ("#role", "no role given"),
    ("#time", "no duration given"),
    ("#time 1h billable=maybe", "billable='maybe'"),
    ("#time1h", "write a space after #time"),
    ("#tiem 1h", "unknown command #tiem; known: #time, #status"),
])
def test_bad_command_lines_fail_with_line_and_reason(line: str, why: str) -> None:
    f = failure(f"{line}\nThe note.")
    assert f.line == 1 and f.text == line
    assert why in f.why


def test_autotask_indicators_on_the_first_line() -> None:
    parsed = parse_commands("#T=1.5 #R=Senior Engineer #S=In Progress\nRebooted the switch.")
    assert not parsed.failures
    assert [(c.name, c.hours, c.value) for c in parsed.commands] == [
        ("time", 1.5, None), ("role", None, "Senior Engineer"), ("status", None, "In Progress")]
    assert [c.text for c in parsed.commands] == ["#T=1.5", "#R=Senior Engineer", "#S=In Progress"]
    assert parsed.text == "Rebooted the switch."


def test_autotask_indicators_in_any_order_and_case() -> None:
    parsed = parse_commands("#s=Waiting Customer #t=0.25")
    assert [(c.name, c.hours, c.value) for c in parsed.commands] == [
        ("status", None, "Waiting Customer"), ("time", 0.25, None)]


def test_bad_autotask_indicators_fail_one_by_one() -> None:
    parsed = parse_commands("#T=0.25 #S=Closed-ish #X=1\nText")
    assert [c.name for c in parsed.commands] == ["time"]
    assert [(f.text, f.line) for f in parsed.failures] == [("#S=Closed-ish", 1), ("#X=1", 1)]
    assert "unknown status" in parsed.failures[0].why and "unknown indicator #X=" in parsed.failures[1].why


def test_autotask_text_after_a_value_is_part_of_the_value() -> None:
    # "Nothing else on that line": text after an indicator belongs to its value, and fails there.
    f = failure("#T=1.5 fixed the printer\n")
    assert f.text == "#T=1.5 fixed the printer" and "not a duration" in f.why


def test_autotask_indicators_below_the_first_line_fail() -> None:
    f = failure("#time 1h\n#T=1.5\nText")
    assert f.line == 2 and "only read on the first line" in f.why


def test_both_forms_together_and_blank_lines_between_commands() -> None:
    parsed = parse_commands("\n#T=0.5 #R=Engineer\n\n#status Waiting Customer\n#priority High\n\nCalled her.\n")
    assert [c.name for c in parsed.commands] == ["time", "role", "status", "priority"]
    assert [c.line for c in parsed.commands] == [2, 2, 4, 5]
    assert parsed.text == "Called her."
    assert parsed.lines == ["#T=0.5 #R=Engineer", "#status Waiting Customer", "#priority High"]


def test_commands_are_only_read_at_the_top() -> None:
    parsed = parse_commands("Hi Jane,\n#time 1h\n#status Resolved\n")
    assert parsed.commands == [] and parsed.failures == [] and not parsed.found
    assert parsed.text == "Hi Jane,\n#time 1h\n#status Resolved\n"


def test_command_lines_are_removed_from_the_text() -> None:
    parsed = parse_commands("#time 1h30m\n#status Waiting Customer\nCleared the cache.\nJane, please retry.")
    assert parsed.text == "Cleared the cache.\nJane, please retry."


def test_a_hash_and_a_digit_is_text() -> None:
    assert not parse_commands("#1 problem: the printer\n").found


def test_parse_command_line_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown command"):
        parse_command_line("#frobnicate")


@pytest.mark.parametrize("text, word, reason", [
    ("accept", "accept", ""),
    ("Accept.\n\nThanks!", "accept", ""),
    ("close", "close", ""),
    ("CLOSE!", "close", ""),
    ("reject: the prompt is back", "reject", "the prompt is back"),
    ("Reject:\nIt still asks for my password.", "reject", "It still asks for my password."),
])
def test_customer_answers(text: str, word: str, reason: str) -> None:
    answer = parse_customer_answer(text)
    assert answer is not None and (answer.word, answer.reason) == (word, reason)


@pytest.mark.parametrize("text", ["Accepting this is hard", "I accept", "close the ticket please?", "", "close: x"])
def test_other_text_is_no_customer_answer(text: str) -> None:
    assert parse_customer_answer(text) is None


def test_only_an_authenticated_resource_may_command() -> None:
    assert command_authority("resource", True, "dmarc pass") == (True, "an authenticated resource")
    ok, why = command_authority("resource", False, "no Authentication-Results from a trusted host")
    assert not ok and "did not pass the trust policy: no Authentication-Results" in why
    for kind in ("contact", "new_contact", "unknown"):
        ok, why = command_authority(kind, True, "dmarc pass")
        assert not ok and "only a resource may give commands" in why


def test_the_note_of_commands_not_applied_lists_them_and_why() -> None:
    parsed = parse_commands("#time 5h\n#status Resolved\nWorks now.")
    text = not_applied_text(parsed.text, parsed, "only a resource may give commands")
    assert text == "Works now.\n\n[Commands not applied: only a resource may give commands]\n#time 5h\n#status Resolved"
