"""Parser stages (D9): named in the entry-point group `mailloop.parser_stages`, or by dotted path.

The built-in stages are registered in that group exactly as a plug-in's are (see
pyproject.toml). A mailbox lists the stages it runs, in order, in `parser_stages`;
each item is a registered name (`ticket_number`) or, for a local stage that is not
packaged, a dotted path `module:Class` importable on the worker's path. An unknown
name, a name registered twice, or a stage that does not load is refused at start with
the package (or path) to blame.

A stage is a class with a `name` and `__call__(ctx)`; one instance serves every mail of
the process, so it keeps no per-mail state on itself.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Callable

from pipeline.config import ConfigError

GROUP = "mailloop.parser_stages"

ParserStage = Callable[[Any], None]  # called with the MailContext; has a `name`


@lru_cache(maxsize=1)
def available_stages() -> dict[str, Any]:
    """Every registered parser stage class by name (sorted, so runs are deterministic)."""
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
            raise ConfigError(f"parser stage {ep.name!r} from package {package} does not load: "
                              f"{type(exc).__name__}: {exc}") from None
        origin[ep.name] = package
    return found


def is_dotted_path(name: str) -> bool:
    return ":" in name


@lru_cache(maxsize=None)
def resolve_stage(name: str) -> Any:
    """The stage class for a registered name or a `module:Class` path; ConfigError if there is none."""
    if not is_dotted_path(name):
        known = available_stages()
        if name not in known:
            raise ConfigError(f"unknown parser stage {name!r} (registered: {', '.join(sorted(known))}; "
                              "a local stage is named by its path, 'module:Class')")
        return known[name]
    module_name, _, attr = name.partition(":")
    try:
        obj: Any = import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise ConfigError(f"parser stage {name!r} does not load: {type(exc).__name__}: {exc}") from None
    if not callable(obj):
        raise ConfigError(f"parser stage {name!r} is not a class or callable")
    return obj


def stage_problem(name: str) -> str | None:
    """Why `name` cannot be used as a parser stage, or None when it can."""
    try:
        resolve_stage(name)
    except ConfigError as exc:
        return str(exc)
    return None


@lru_cache(maxsize=64)
def _instances(names: tuple[str, ...]) -> tuple[ParserStage, ...]:
    return tuple(resolve_stage(n)() for n in names)


def build_parser_stages(names: list[str] | tuple[str, ...]) -> tuple[ParserStage, ...]:
    """The mailbox's parser stages, in its order, made once per process."""
    return _instances(tuple(names))
