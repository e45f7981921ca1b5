"""Typed configs: dataclasses validated at construction, with errors that name the option."""

from __future__ import annotations

import dataclasses
from pathlib import Path
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


# ---- run files: `--config run.toml` -------------------------------------------------------------

SECTIONS = ("train", "compare", "demo")


def read_run_file(path: str | Path, section: str) -> dict[str, Any]:
    """The `section` table ("train", "compare" or "demo") of a run file, as a plain dict.

    Accepted: TOML (`[train]`, `[compare]`, `[demo]` tables, or bare keys for a one-command file),
    JSON of the same shape, or a model artifact's `config.json`, whose `extra.train_config` is the
    resolved training config of the run that wrote it (train only). Relative `dataset` and `out`
    paths are resolved against the file's directory, so a run file works from any working directory.
    Values are checked by the command's config dataclass; this function only reads.
    """
    import json
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist; pass a .toml run file or a model's config.json")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise ConfigError(f"--config {path}: unknown format '{suffix or '(no extension)'}'; "
                              "write a .toml run file (or pass a model's config.json)")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path} is not valid {suffix[1:].upper()}: {err}") from err
    require(isinstance(data, dict), f"--config {path} must hold a table of options, found {type(data).__name__}")
    extra = data.get("extra")
    if isinstance(extra, dict) and isinstance(extra.get("train_config"), dict):  # a model's config.json
        require(section == "train", f"--config {path} is a model's config.json, which describes a `train` "
                f"run; `{section}` takes a .toml run file with a [{section}] table")
        table = dict(extra["train_config"])
        steps = extra.get("training", {}).get("steps")
        if table.get("max_minutes") is not None and isinstance(steps, int):
            # A minute budget ran a measured step count; the re-run fixes that count so it repeats.
            table["max_minutes"], table["max_steps"] = None, steps
        return table
    if section in data:
        table = data[section]
        require(isinstance(table, dict), f"--config {path}: `{section}` must be a table ([{section}]), "
                f"found {type(table).__name__}")
    else:
        others = [s for s in SECTIONS if s in data]
        require(not others, f"--config {path} has no [{section}] table (it has [{'], ['.join(others)}]); "
                f"add a [{section}] table for `itemsage {section}`")
        table = data
    table = dict(table)
    for key in ("dataset", "out"):
        if isinstance(table.get(key), str):
            table[key] = str((path.parent / table[key]) if not Path(table[key]).is_absolute() else table[key])
    return table


def check_keys(table: dict[str, Any], known: Any, *, section: str) -> None:
    """Refuse keys of a run file's [section] that no option of the command takes (typos must not pass)."""
    unknown = sorted(set(table) - set(known))
    require(not unknown, f"--config: unknown key(s) {', '.join(unknown)} in [{section}]; "
            f"known: {', '.join(sorted(known))}")
