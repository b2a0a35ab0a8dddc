"""Configuration (D5): typed, validated, and refused with file, line and key when broken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, parse_config
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent


def error_of(text: str, name: str = "mailboxes.toml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, Path(name))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_shipped_mailboxes_toml_is_valid_and_defines_support() -> None:
    cfg = load_config(REPO / "mailboxes.toml")
    box = cfg.mailbox("support")
    assert box.address == "support@msp.example"
    assert box.source.kind == "maildir"
    assert cfg.loop_guard_for(box).limit == 2 and cfg.loop_guard_for(box).window_seconds == 300
    assert box.unknown_sender.default_account == "Unassigned" and box.unknown_sender.match_domain
    assert box.trust.authserv_ids == ["mx.msp.example"] and box.trust.require == "dmarc"


def test_a_wrong_type_names_the_line_and_the_key() -> None:
    text = '[loop_guard]\nlimit = "two"\n\n[[mailbox]]\nname = "support"\naddress = "support@msp.example"\n'
    message = error_of(text)
    assert message.startswith("mailboxes.toml:2: loop_guard.limit: ")
    assert "integer" in message and "'two'" in message


def test_a_bad_value_in_the_second_mailbox_points_at_its_line() -> None:
    text = ('[[mailbox]]\nname = "support"\naddress = "support@msp.example"\n\n'
            '[[mailbox]]\nname = "billing"\naddress = "billing@msp.example"\n\n'
            '[mailbox.unknown_sender]\notherwise = "bounce"\n')
    message = error_of(text)
    assert message.startswith("mailboxes.toml:10: mailbox[1].unknown_sender.otherwise: expected ")
    assert "'create_contact'" in message and "'bounce'" in message


def test_an_unknown_key_is_refused_not_ignored() -> None:
    text = '[[mailbox]]\nname = "support"\naddres = "support@msp.example"\n'
    message = error_of(text)
    assert "mailboxes.toml:" in message
    assert "mailbox[0]" in message


def test_a_misspelt_key_names_its_own_line() -> None:
    text = '[[mailbox]]\nname = "support"\naddress = "support@msp.example"\nloop_gaurd = 3\n'
    assert error_of(text).startswith("mailboxes.toml:4: mailbox[0].loop_gaurd: unknown key")


def test_broken_toml_names_the_line() -> None:
    message = error_of('[[mailbox]]\nname = "support\n')
    assert message.startswith("mailboxes.toml:2: not valid TOML")


def test_a_config_without_mailboxes_is_refused() -> None:
    assert "mailbox" in error_of('[redis]\nurl = "redis://127.0.0.1:6379/0"\n')


def test_an_unknown_parser_stage_is_refused_at_start() -> None:
    text = '[[mailbox]]\nname = "support"\naddress = "support@msp.example"\nparser_stages = ["ticket_number", "nagios"]\n'
    message = error_of(text)
    assert message.startswith("mailboxes.toml:4: mailbox[0].parser_stages: unknown parser stage 'nagios'")


def test_environment_variables_override_connection_settings(monkeypatch) -> None:
    cfg = parse_config('[[mailbox]]\nname = "s"\naddress = "s@msp.example"\n', Path("/etc/mailloop/mailboxes.toml"))
    assert cfg.database_url == "sqlite:////etc/mailloop/mailloop.db"  # relative to the file
    monkeypatch.setenv("DATABASE_URL", "postgresql://db.internal/mailloop")
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/2")
    assert cfg.database_url == "postgresql://db.internal/mailloop"
    assert cfg.redis_url == "redis://cache:6379/2"
    assert cfg.broker_url == "redis://cache:6379/2"


def test_the_config_is_found_by_option_then_environment_then_cwd(tmp_path, monkeypatch) -> None:
    (tmp_path / "mailboxes.toml").write_text('[[mailbox]]\nname = "cwd"\naddress = "a@b.example"\n')
    other = tmp_path / "other.toml"
    other.write_text('[[mailbox]]\nname = "env"\naddress = "a@b.example"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config().mailboxes[0].name == "cwd"
    monkeypatch.setenv("PIPELINE_CONFIG", str(other))
    assert load_config().mailboxes[0].name == "env"
    assert load_config(tmp_path / "mailboxes.toml").mailboxes[0].name == "cwd"


def test_check_config_prints_one_line_for_a_broken_file(tmp_path) -> None:
    bad = tmp_path / "mailboxes.toml"
    bad.write_text('[[mailbox]]\nname = "support"\naddress = "not-an-address"\n')
    proc = run_cli("check-config", str(bad))
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"pipeline: error: {bad}:3: mailbox[0].address: ")
    assert "Traceback" not in proc.stderr.decode()


def test_check_config_accepts_the_shipped_file() -> None:
    proc = run_cli("check-config", str(REPO / "mailboxes.toml"))
    assert proc.returncode == 0, proc.stderr
    assert b"support <support@msp.example>" in proc.stdout


def test_every_command_refuses_a_broken_config_with_one_line(tmp_path) -> None:
    bad = tmp_path / "mailboxes.toml"
    bad.write_text('[database]\nurl = 5\n[[mailbox]]\nname = "support"\naddress = "support@msp.example"\n')
    proc = run_cli("--config", str(bad), "tickets", "list")
    assert proc.returncode == 75
    assert proc.stderr.decode().strip() == (f"pipeline: error: {bad}:2: database.url: "
                                           "input should be a valid string, got 5")


def test_check_config_names_a_secret_variable_that_is_not_set(tmp_path) -> None:
    path = tmp_path / "mailboxes.toml"
    path.write_text('[[mailbox]]\nname = "helpdesk"\naddress = "helpdesk@msp.example"\n\n'
                    '[mailbox.source]\nkind = "imap"\nhost = "imap.msp.example"\nusername = "helpdesk"\n'
                    'password_env = "MAILLOOP_TEST_UNSET_IMAP_PASSWORD"\n')
    env = {k: v for k, v in os.environ.items() if k != "MAILLOOP_TEST_UNSET_IMAP_PASSWORD"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "check-config", str(path)], capture_output=True,
                          env=env, timeout=60)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "mailbox[0] (helpdesk).source.password_env" in err
    assert "MAILLOOP_TEST_UNSET_IMAP_PASSWORD is not set" in err

    ok = run_cli("check-config", str(path), env={"MAILLOOP_TEST_UNSET_IMAP_PASSWORD": "s3cret"})
    assert ok.returncode == 0, ok.stderr.decode()


MAILBOX = '[[mailbox]]\nname = "support"\naddress = "support@msp.example"\n'


@pytest.mark.parametrize("fmt, why", [
    ("T{date.__class__.__init__.__globals__}{seq}", "{date.__class__.__init__.__globals__} is not a field name"),
    ("T{date:%Y%m%d}.{seq[0]}", "{seq[0]} is not a field name"),
    ("T{0}{date:%Y%m%d}{seq}", "{0} is not a field name"),
    ("T{date:%Y%m%d}.{seq!r}", "{seq} takes no conversion"),
    ("T{date:{seq}}{seq}", "no nested field"),
    ("T{date:%Y%m%d}.{seq:>5}", "{seq:>5} is no zero-padded width"),
    ("T{date:%Y%m%d}.{seq}{seq}", "it needs one {seq}, one {date:...}"),
    ("T{date:%Y%m%d}.{number}{seq}", "it needs one {seq}, one {date:...}"),
    ("T{date:%Y%m%d}.{{seq}}", "braces are only for fields"),
    ("T{date:%Y%m%d}.{seq", "not a valid format"),
    ("T{date:%b %d %Y}.{seq}", "%b writes no digits"),
    ("T{date:%Y%m%d%}.{seq}", "% writes no digits"),  # a lone %: strftime writes it, nothing finds it
    ("T{date:%Y%m}.{seq}", "the date must name the day"),  # the sequence restarts daily: numbers would repeat
    ("INC-{seq:06d}", "it needs one {seq}, one {date:...}"),
    ("T{date}-{seq}", "the date must name the day"),
    # Found upper-cased, and carried in our Message-IDs and subjects: no lower case, no +, @, space, NUL.
    ("t{date:%Y%m%d}.{seq}", "it writes 't20261231.999999': a number is capital letters, digits and . _ / # = - only"),
    ("T+{date:%Y%m%d}.{seq}", "a number is capital letters"),
    ("T {date:%Y%m%d}.{seq}", "a number is capital letters"),
    ("T{date:%Y@%m%d}.{seq}", "a number is capital letters"),
    ("T{date:%Y%m%d%%}.{seq}", "a number is capital letters"),
    ("T{date:%Y%m%d}.{seq:04d}\\u0000", "a number is capital letters"),
    ("T{date:%Y%m%d}.{seq:040d}", "longer than the 40 characters a number may have"),
])
def test_a_number_format_reaching_past_date_and_seq_is_refused_in_one_line(fmt: str, why: str) -> None:
    message = error_of(f'[numbering]\nticket = "{fmt}"\n\n' + MAILBOX)
    assert message.startswith("mailboxes.toml:2: numbering.ticket: expected a number format of text, "
                              "{date:<strftime>} and {seq[:0Nd]}")
    assert why in message


@pytest.mark.parametrize("key", ["task", "project"])
def test_task_and_project_formats_are_held_to_the_same_rule(key: str) -> None:
    message = error_of(f'[numbering]\ntimezone = "UTC"\n{key} = "K{{date.year}}{{seq}}"\n\n' + MAILBOX)
    assert message.startswith(f"mailboxes.toml:3: numbering.{key}: ")
    assert "{date.year} is not a field name" in message


@pytest.mark.parametrize("tag", ["[Ticket#{number.__class__}]", "[Ticket#{number:>30}]", "[{number}{number}]",
                                 "[Ticket#{number!r}]", "[Ticket]", "[Ticket#{number}]\\r\\nBcc: x@evil.example",
                                 "[Ticket#{number}]\\u0000"])
def test_a_ticket_tag_other_than_text_and_number_is_refused(tag: str) -> None:
    message = error_of(f'[numbering]\nticket_tag = "{tag}"\n\n' + MAILBOX)
    assert message.startswith("mailboxes.toml:2: numbering.ticket_tag: expected a tag of text and {number}")


@pytest.mark.parametrize("fmt", ["T{date:%Y%m%d}.{seq:04d}", "T-{date:%y%j}-{seq}", "INC{date:%Y%m%d%H}{seq:06}",
                                 "{date:%d.%m.%Y}/{seq:03d}", "CASE#{date:%Y%j}={seq:05d}"])
def test_plain_number_formats_are_taken_and_their_numbers_are_found_again(fmt: str) -> None:
    from datetime import datetime, timezone

    from pipeline.parsers.references import find_number

    config = parse_config(f'[numbering]\nticket = "{fmt}"\n\n' + MAILBOX, Path("mailboxes.toml"))
    number = config.settings.numbering.ticket.format(date=datetime(2026, 12, 7, 9, tzinfo=timezone.utc), seq=12)
    assert find_number(f"Re: printer [Ticket#{number}]", fmt) == number.upper()


def test_check_config_refuses_a_format_reaching_python_attributes_without_a_traceback(tmp_path) -> None:
    bad = tmp_path / "mailboxes.toml"
    bad.write_text('[numbering]\nticket = "T{date.__class__.__init__.__globals__}{seq}"\n\n' + MAILBOX)
    proc = run_cli("check-config", str(bad))
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"pipeline: error: {bad}:2: numbering.ticket: ")


def test_an_intake_relay_that_is_no_address_or_range_is_refused_naming_it() -> None:
    message = error_of(MAILBOX + '\n[mailbox.trust]\nauthserv_ids = ["mx.msp.example"]\n'
                                 'intake_relays = ["10.0.0.0/8", "mx.msp.example"]\n')
    assert message.startswith("mailboxes.toml:7: mailbox[0].trust.intake_relays: expected IP addresses or CIDR")
    assert "got 'mx.msp.example'" in message


def test_the_intake_session_cap_and_idle_timeout_must_be_positive() -> None:
    source = '\n[mailbox.source]\nkind = "smtp"\nsecurity = "none"\n'
    assert "mailbox[0].source.max_sessions: input should be greater than or equal to 1, got 0" in \
        error_of(MAILBOX + source + "max_sessions = 0\n")
    assert "mailbox[0].source.idle_timeout_seconds: input should be greater than 0, got 0" in \
        error_of(MAILBOX + source + "idle_timeout_seconds = 0\n")


def test_tickets_tasks_and_projects_need_formats_of_their_own() -> None:
    same = 'ticket = "N{date:%Y%m%d}.{seq}"\ntask = "N{date:%Y%m%d}.{seq}"\n'
    assert "ticket, task and project numbers need formats of their own" in \
        error_of("[numbering]\n" + same + "\n" + MAILBOX)
