"""The `[mailbox.source]` table: the shipped examples parse, secrets are named and checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import ConfigError, parse_config
from pipeline.sources.settings import missing_secrets, polled_by_beat, runs_long
from pipeline.tasks.policy import beat_schedule
from tests.conftest import config_text

SHIPPED = Path(__file__).resolve().parents[2] / "mailboxes.toml"


def _with_examples_uncommented() -> str:
    text = SHIPPED.read_text(encoding="utf-8")
    head, rest = text.split("# BEGIN SOURCE EXAMPLES\n", 1)
    examples, tail = rest.split("# END SOURCE EXAMPLES\n", 1)
    lines = [line[2:] if line.startswith("# ") else "" for line in examples.splitlines()]
    return head + "\n".join(lines) + "\n" + tail


def test_the_shipped_mailboxes_toml_has_a_valid_example_of_every_source() -> None:
    config = parse_config(_with_examples_uncommented(), SHIPPED)
    kinds = {box.source.kind for box in config.mailboxes}
    assert kinds == {"maildir", "imap", "pop3", "smtp", "stdin"}
    assert config.mailbox("m365").source.auth == "xoauth2"
    assert config.mailbox("support").source.path == "var/maildir/support"  # the default mailbox as it was
    # Who fetches what: beat polls Maildir and POP3; IMAP IDLE and the listener run long.
    assert set(beat_schedule(config)) >= {"fetch:support", "fetch:legacy"}
    assert "fetch:helpdesk" not in beat_schedule(config)
    assert [b.name for b in config.mailboxes if runs_long(b.source)] == ["helpdesk", "m365", "alerts"]
    assert not any(polled_by_beat(b.source) for b in config.mailboxes if b.name in ("alerts", "sales"))


def test_missing_secrets_names_each_unset_variable_and_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(_with_examples_uncommented(), SHIPPED)
    monkeypatch.delenv("HELPDESK_IMAP_PASSWORD", raising=False)
    monkeypatch.setenv("LEGACY_POP3_PASSWORD", "set")
    assert missing_secrets(config) == [
        "mailbox[1] (helpdesk).source.password_env: environment variable HELPDESK_IMAP_PASSWORD is not set"]
    monkeypatch.setenv("HELPDESK_IMAP_PASSWORD", "set")
    assert missing_secrets(config) == []


@pytest.mark.parametrize(("source", "expected"), [
    ('{ kind = "imap", host = "imap.example", username = "u" }',
     "password login needs 'password_env'"),
    ('{ kind = "imap", host = "imap.example", username = "u", auth = "xoauth2" }',
     "XOAUTH2 needs exactly one of 'oauth_token_env' or 'oauth_token_command'"),
    ('{ kind = "pop3", username = "u", password_env = "P" }',
     "a POP3 source needs 'host' and 'username'"),
    ('{ kind = "smtp", port = 2525 }',
     "an SMTP/LMTP listener takes plain connections"),
    ('{ kind = "imap", host = "h", username = "u", password = "hunter2" }',
     "unknown key"),
])
def test_a_broken_source_table_is_refused_with_its_line_and_what_is_expected(source: str, expected: str) -> None:
    text = config_text("sqlite:///x.db", "p:", source=source)
    with pytest.raises(ConfigError) as err:
        parse_config(text, Path("mailboxes.toml"))
    assert re.match(r"mailboxes\.toml:\d+: mailbox\[0\]\.source", str(err.value)), str(err.value)
    assert expected in str(err.value)
