"""Typed configs: dataclasses validated at construction, with errors that name the option."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is out of range; the message names the option and how to fix it."""


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition`. For user-facing option checks, not asserts."""
    if not condition:
        raise ConfigError(message)


def from_dict(cls: type[T], data: dict[str, Any], *, section: str) -> T:
    """Build dataclass `cls` from a dict, refusing unknown keys by name (typos must not pass)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    require(not unknown, f"unknown option(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"known: {', '.join(sorted(names))}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
