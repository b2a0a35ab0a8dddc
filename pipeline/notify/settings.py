"""Notification settings (D1.7): a mailbox's `[mailbox.notifications]` and the global `[smtp]`."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from pipeline.settings_model import SettingsModel

# Who a notification can go to (D1.7). Anything with an "@" in a recipient list is an explicit address.
ROLES = ("sender", "contact", "primary_resource", "queue_members", "account_manager")

_ADDRESS = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class EventRecipients(SettingsModel):
    """Who gets each event, by role or explicit address; the defaults are short on purpose."""

    ticket_created: list[str] = ["sender"]
    note_added: list[str] = ["primary_resource"]
    status_changed: list[str] = ["contact"]
    ticket_resolved: list[str] = ["contact"]
    # Only ever the sender: these two answer the mail itself.
    sender_rejected: list[Literal["sender"]] = ["sender"]
    command_failed: list[Literal["sender"]] = ["sender"]

    @field_validator("ticket_created", "note_added", "status_changed", "ticket_resolved")
    @classmethod
    def _roles(cls, value: list[str]) -> list[str]:
        for item in value:
            if item not in ROLES and not _ADDRESS.fullmatch(item):
                raise ValueError(f"a role ({', '.join(ROLES)}) or a mail address, got {item!r}")
        return [item.lower() if "@" in item else item for item in value]


class NotificationSettings(SettingsModel):
    from_address: str | None = None  # default: the mailbox address
    from_name: str | None = None
    # A folder of template overrides (relative to mailboxes.toml); a file there replaces the
    # shipped one of the same name (pipeline/notify/templates/README.md lists names and variables).
    templates: str | None = None
    ticket_created: bool = True
    note_added: bool = True
    # Tell the contact when a technician's command changes the status (not for Resolved: see below).
    status_changed: bool = True
    sender_rejected: bool = True
    # Tell a resource which command line of their mail failed and why (D4).
    command_failed: bool = True
    # Tell the ticket's contact it was resolved, and how to accept or reject it (D2).
    ticket_resolved: bool = True
    recipients: EventRecipients = EventRecipients()
    # A loop breaker that holds even when another system changes the subject every time: at
    # most this many automatic answers (ticket created, sender rejected, command failed) to
    # one address in the window, across all mailboxes. Tickets are still created.
    answer_limit: int = Field(5, ge=1)
    answer_window_seconds: int = Field(3600, ge=1)


class SmtpSettings(SettingsModel):
    """The server notifications are sent through; credentials only by environment-variable name."""

    host: str = "127.0.0.1"
    port: int = Field(25, ge=1, le=65535)
    security: Literal["none", "starttls", "tls"] = "none"
    username: str | None = None
    username_env: str | None = None
    password_env: str | None = None
    # A CA bundle to verify the server's certificate with (default: the system's).
    ca_file: str | None = None
    timeout_seconds: float = Field(30, gt=0)
