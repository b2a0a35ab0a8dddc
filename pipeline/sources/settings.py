"""A mailbox's `[mailbox.source]` table (D5, D7): where its mail comes from.

Secrets are named, never written: `password_env` and `oauth_token_env` hold the name of an
environment variable, `oauth_token_command` a command that prints a fresh access token.
Whether a named variable is set is checked by `missing_secrets` (for `check-config`) and
again when a fetcher connects, not while the file is parsed: `ingest FILE` needs no source.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from pipeline.settings_model import SettingsModel

if TYPE_CHECKING:
    from pipeline.config import Config

DEFAULT_PORTS = {
    ("imap", "tls"): 993, ("imap", "starttls"): 143, ("imap", "none"): 143,
    ("pop3", "tls"): 995, ("pop3", "starttls"): 110, ("pop3", "none"): 110,
    ("smtp", "none"): 2525, ("lmtp", "none"): 2424,
}


class SourceSettings(SettingsModel):
    kind: Literal["maildir", "stdin", "imap", "pop3", "smtp", "lmtp"] = "stdin"
    path: str | None = None  # Maildir folder

    # IMAP / POP3: the server. SMTP / LMTP: the address this listener binds to.
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    # "tls": TLS from the first byte (993, 995); "starttls": upgrade a plain connection;
    # "none": no TLS at all (tests, or a relay on loopback).
    security: Literal["tls", "starttls", "none"] = "tls"
    ca_file: str | None = None  # CA bundle for the server's certificate (default: the system's)
    timeout_seconds: float = Field(60, gt=0)

    username: str | None = None
    auth: Literal["password", "xoauth2"] = "password"
    password_env: str | None = None  # secrets only by environment-variable name
    oauth_token_env: str | None = None  # XOAUTH2: a variable holding the access token, or …
    oauth_token_command: list[str] | None = None  # … a command printing a fresh one (run per login)

    # IMAP: the folder read, where journaled mail goes ("move") or the keyword set on it
    # ("flag": the mail stays where it is), and where a mail that cannot be fetched goes.
    folder: str = "INBOX"
    processed: Literal["move", "flag"] = "move"
    processed_folder: str = "Processed"
    processed_flag: str = "$MailloopJournaled"
    failed_folder: str = "Failed"
    idle: bool = True  # use IDLE when the server offers it (a long-running fetcher); else poll
    reconcile_seconds: int = Field(900, ge=10)  # full scan of the folder so no UID is ever skipped
    fetch_batch: int = Field(50, ge=1, le=1000)  # mails journaled before they are moved together

    # SMTP / LMTP intake: the addresses accepted (the mailbox's own address always is).
    recipients: list[str] = []  # noqa: RUF012 - pydantic copies field defaults
    max_message_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    # Sessions at once (one more is told 421), and how long a session may be silent between
    # commands before it is closed. Mailboxes sharing a listener: the largest of each applies.
    max_sessions: int = Field(50, ge=1)
    idle_timeout_seconds: float = Field(300, gt=0)

    poll_seconds: int = Field(60, ge=1)

    @model_validator(mode="after")
    def _needs(self) -> SourceSettings:
        if self.kind == "maildir" and not self.path:
            raise ValueError("a Maildir source needs 'path'")
        if self.kind in ("imap", "pop3"):
            if not self.host or not self.username:
                raise ValueError(f"{'an' if self.kind == 'imap' else 'a'} {self.kind.upper()} source needs 'host' and 'username'")
            if self.auth == "password" and not self.password_env:
                raise ValueError("password login needs 'password_env', the environment variable holding it")
            if self.auth == "xoauth2" and bool(self.oauth_token_env) == bool(self.oauth_token_command):
                raise ValueError("XOAUTH2 needs exactly one of 'oauth_token_env' or 'oauth_token_command'")
            if self.kind == "pop3" and self.auth == "xoauth2":
                raise ValueError("XOAUTH2 is supported for IMAP; POP3 takes auth = \"password\"")
        if self.kind in ("smtp", "lmtp") and self.security != "none":
            raise ValueError("an SMTP/LMTP listener takes plain connections: set security = \"none\" "
                             "(terminate TLS in the relaying MTA)")
        if self.oauth_token_command is not None and not self.oauth_token_command:
            raise ValueError("'oauth_token_command' is a command and its arguments, e.g. [\"get-token\", \"support\"]")
        return self

    @property
    def server_port(self) -> int:
        return self.port or DEFAULT_PORTS[(self.kind, self.security)]

    @property
    def listen_host(self) -> str:
        return self.host or "127.0.0.1"

    def secret_variables(self) -> list[tuple[str, str]]:
        """(key, environment-variable name) of every secret this source reads."""
        if self.kind not in ("imap", "pop3"):
            return []
        named = [("password_env", self.password_env)] if self.auth == "password" else \
            [("oauth_token_env", self.oauth_token_env)]
        return [(key, name) for key, name in named if name]


def polled_by_beat(source: SourceSettings) -> bool:
    """Fetched by the scheduled fetch task (Maildir, POP3, IMAP without IDLE)."""
    return source.kind in ("maildir", "pop3") or (source.kind == "imap" and not source.idle)


def runs_long(source: SourceSettings) -> bool:
    """Served by a long-running process of `pipeline run` / `pipeline listen` (IMAP IDLE, listeners)."""
    return source.kind in ("smtp", "lmtp") or (source.kind == "imap" and source.idle)


def missing_secrets(config: Config) -> list[str]:
    """One line per secret variable named in the configuration but not set in this environment.

    For `pipeline check-config`: a fetcher started without its password would otherwise
    only find out at its first login.
    """
    problems = []
    for i, box in enumerate(config.mailboxes):
        for key, name in box.source.secret_variables():
            if not os.environ.get(name):
                problems.append(f"mailbox[{i}] ({box.name}).source.{key}: environment variable {name} is not set")
    return problems
