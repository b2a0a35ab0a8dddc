"""A mailbox's `[mailbox.resolve_back.<stage name>]` tables: the HTTP call that tells an RMM a ticket is done.

Keyed by the name of the RMM parser stage that claimed the alert (`datto_rmm`, `ninjaone`, …).
Every string but `method` is a sandboxed Jinja2 template (see `pipeline.resolve_back.call`).
Secrets are named, never written, as for sources and [smtp]: `secrets_env` maps a name the
templates use (`{{ secrets.token }}`) to the environment variable holding the value; it is
read when the call is made, so the value is never stored, and `pipeline check-config` names
a variable that is not set.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.settings_model import SettingsModel


class ResolveBackSettings(SettingsModel):
    url: str = Field(min_length=1)  # template, e.g. "https://rmm.example/api/alert/{{ alert.alert_id }}/resolve"
    method: Literal["POST", "PUT", "PATCH", "DELETE", "GET"] = "POST"
    body: str | None = None  # template; no body when unset
    headers: dict[str, str] = {}  # name -> template
    secrets_env: dict[str, str] = {}  # template name -> environment variable name
    timeout_seconds: float = Field(10, gt=0, le=30)  # the notify task's time limit bounds a batch
    # Calls in all (the task's quick retries, then the sweep's slower ones) before the row is failed.
    max_attempts: int = Field(12, ge=1, le=100)

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def secret_variables(self) -> list[tuple[str, str]]:
        """(key, environment-variable name) of every secret this call reads, as a source's do."""
        return [(f"secrets_env.{name}", var) for name, var in self.secrets_env.items()]
