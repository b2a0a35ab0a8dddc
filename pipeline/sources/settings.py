"""A mailbox's `[mailbox.source]` table (D5, D7): where its mail comes from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.settings_model import SettingsModel


class SourceSettings(SettingsModel):
    kind: Literal["maildir", "stdin", "imap", "pop3", "smtp", "lmtp"] = "stdin"
    path: str | None = None  # Maildir folder
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password_env: str | None = None  # secrets only by environment-variable name
    folder: str | None = None
    poll_seconds: int = Field(60, ge=1)

    @model_validator(mode="after")
    def _needs(self) -> "SourceSettings":
        if self.kind == "maildir" and not self.path:
            raise ValueError("a Maildir source needs 'path'")
        return self
