"""Parser stages (D9) come from the entry-point group `mailloop.parser_stages`.

The built-in stages are registered there exactly as a plug-in would be (see
pyproject.toml). A mailbox lists the stages it runs, in order, in `parser_stages`;
an unknown name is refused at start.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any, Callable

from pipeline.config import ConfigError

GROUP = "mailloop.parser_stages"

ParserStage = Callable[[Any], None]  # called with the MailContext; has a `name`


@lru_cache(maxsize=1)
def available_stages() -> dict[str, Any]:
    """Every registered parser stage by name (sorted, so runs are deterministic)."""
    found: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        package = ep.dist.name if ep.dist else ep.value
        if ep.name in found:
            raise ConfigError(
                f"parser stage {ep.name!r} is registered twice (by {origin[ep.name]} and by {package})"
            )
        try:
            found[ep.name] = ep.load()
        except Exception as exc:
            raise ConfigError(f"parser stage {ep.name!r} from package {package} does not load: {exc}") from None
        origin[ep.name] = package
    return found


def unknown_stage_names(names: list[str]) -> list[str]:
    known = available_stages()
    return [n for n in names if n not in known]


def build_parser_stages(names: list[str]) -> list[ParserStage]:
    known = available_stages()
    missing = unknown_stage_names(names)
    if missing:
        raise ConfigError(f"unknown parser stage {missing[0]!r} (registered: {', '.join(sorted(known))})")
    return [known[n]() for n in names]
