"""The base of every configuration table's model (D5), shared by config.py and the packages
that own a table (sources, notify)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SettingsModel(BaseModel):
    # Unknown keys are refused: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)
