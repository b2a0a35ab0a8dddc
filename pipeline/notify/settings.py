"""Notification settings (D1.7): a mailbox's `[mailbox.notifications]` and the global `[smtp]`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.settings_model import SettingsModel


class NotificationSettings(SettingsModel):
    from_address: str | None = None  # default: the mailbox address
    from_name: str | None = None
    ticket_created: bool = True
    note_added: bool = True
    sender_rejected: bool = True
    # Tell a resource which command line of their mail failed and why (D4).
    command_failed: bool = True
    # Tell the ticket's contact it was resolved, and how to accept or reject it (D2).
    ticket_resolved: bool = True


class SmtpSettings(SettingsModel):
    """The server notifications are sent through; the password only by environment-variable name."""

    host: str = "127.0.0.1"
    port: int = Field(25, ge=1, le=65535)
    security: Literal["none", "starttls", "tls"] = "none"
    username: str | None = None
    password_env: str | None = None
    timeout_seconds: float = Field(30, gt=0)
