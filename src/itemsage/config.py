"""Typed configs: dataclasses validated at construction, with errors that name the option."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is out of range; the message names the option and how to fix it."""


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition`. For user-facing option checks, not asserts."""
    if not condition:
        raise ConfigError(message)


def require_int(value: Any, name: str, low: int, high: int | None = None) -> None:
    """ConfigError unless `value` is an integer (not a bool) in low..high (no upper bound when None).
    `name` is the option as errors name it ("train.max_steps"): the CLI turns it into the flag. The
    message states the side that was crossed ("must be an integer >= 2", "... <= 10,000,000")."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and high is not None and value > high:
        raise ConfigError(f"{name} ({_shown(value)}) must be an integer <= {high:,}")
    if not (is_int and value >= low):
        span = f">= {low}" if high is None or is_int else f"from {low:,} to {high:,}"
        raise ConfigError(f"{name} ({_shown(value)}) must be an integer {span}")


def require_number(value: Any, name: str, low: float, high: float, *, above: bool = False, below: bool = False,
                   unit: str = "") -> None:
    """ConfigError unless `value` is a finite number in [low, high] (`above`: > low; `below`: < high)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and (isinstance(value, int) or math.isfinite(value)) \
        and (value > low if above else value >= low) and (value < high if below else value <= high)
    span = f"{'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}"
    require(ok, f"{name} ({_shown(value)}) must be a number in {span}{unit}")


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

SECTIONS = ("train", "compare", "demo", "graph")


def read_run_file(path: str | Path, section: str) -> dict[str, Any]:
    """The `section` table ("train", "compare", "demo" or "graph") of a run file, as a plain dict.

    Accepted: TOML (`[train]`, `[compare]`, `[demo]`, `[graph]` tables, or bare keys for a one-command file),
    JSON of the same shape, or a model artifact's `config.json`, whose `extra.train_config` is the
    resolved training config of the run that wrote it (train only). Relative `dataset` and `out`
    paths are resolved against the file's directory, so a run file works from any working directory.
    Keys and types are checked by `check_table`; this function only reads.
    """
    import json
    import tomllib

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a directory; pass a .toml run file or a model's config.json")
    if not path.exists():
        raise ConfigError(f"--config {path} does not exist; pass a .toml run file or a model's config.json")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError(f"--config {path}: unknown format '{suffix or '(no extension)'}'; "
                          "write a .toml run file (or pass a model's config.json)")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except OSError as err:
        raise ConfigError(f"--config {path} could not be read: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path} is not valid {suffix[1:].upper()}: {err}") from None
    except RecursionError:  # tomllib and json recurse once per nesting level
        raise ConfigError(f"--config {path} is not a usable {suffix[1:].upper()} file: its values are nested "
                          "too deep (a run file holds tables of plain values)") from None
    require(isinstance(data, dict), f"--config {path} must hold a table of options, found {type(data).__name__}")
    extra = data.get("extra")
    if isinstance(extra, dict) and isinstance(extra.get("train_config"), dict):  # a model's config.json
        require(section == "train", f"--config {path} is a model's config.json, which describes a `train` "
                f"run; `{section}` takes a .toml run file with a [{section}] table")
        table = dict(extra["train_config"])
        steps = extra.get("training", {}).get("steps") if isinstance(extra.get("training"), dict) else None
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


@dataclasses.dataclass
class Table:
    """How one table of a run file maps onto a config dataclass. `cls`'s fields are its keys, and
    `prefix` is how the dataclass names them in its errors ("train" for `train.max_steps`).
    `aliases`: a field named by the flag that sets it (key -> field, e.g. "steps" -> "max_steps"; the
    key messages show, the field's own name still accepted); `old`: other accepted names (key ->
    field); `extra`: keys that are not fields (key -> type, e.g. "dataset"); `tables`: the dict fields
    that are tables of another config (TrainConfig.model -> ModelConfig's table). A key may also be
    written with dashes, as its flag is."""

    cls: type
    prefix: str
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    old: dict[str, str] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    tables: dict[str, Table] = dataclasses.field(default_factory=dict)

    def keys(self) -> dict[str, str]:
        """Every accepted key (dashes aside) -> the field or extra key it sets."""
        return {**{f.name: f.name for f in dataclasses.fields(self.cls)}, **{k: k for k in self.extra},
                **self.aliases, **self.old}

    def shown(self) -> list[str]:
        """The keys as messages list them: each field under its preferred name, then the extra keys."""
        preferred = {field: key for key, field in self.aliases.items()}
        return sorted(preferred.get(f.name, f.name) for f in dataclasses.fields(self.cls)) + list(self.extra)


def check_table(table: Any, spec: Table, *, where: str, path: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    """Check a run file's table against `spec` before anything runs: every key known, every value of
    its field's type (read from the dataclass annotations, so a new option is checked without being
    listed anywhere). Ranges stay the dataclass's to check, at construction.

    Returns (values by field name, lists made tuples for tuple fields, nested tables as dicts; and for
    each field set, its name in the dataclass's errors -> its key path as written in the file, e.g.
    {"train.max_steps": "steps", "model.dropout": "model.dropout"}). `where` names the file and table
    in messages ("run.toml [train]"); `path` is the key path of a nested table. Raises ConfigError
    naming the key as written, the file, what was expected and what came.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"`{path}` in {where} must be a table, got {_shown(table)}")
    keys = spec.keys()
    hints = typing.get_type_hints(spec.cls)
    values: dict[str, Any] = {}
    written: dict[str, str] = {}  # field -> key path as written
    names: dict[str, str] = {}
    for key, value in table.items():
        full = f"{path}.{key}" if path else key
        target = keys.get(key, keys.get(key.replace("-", "_")))
        if target is None:
            raise ConfigError(_unknown(full, where, spec, path))
        if target in values:
            raise ConfigError(f"`{written[target]}` and `{full}` in {where} set the same option; keep one")
        written[target] = names[f"{spec.prefix}.{target}"] = full
        if target in spec.tables:
            values[target], inner = check_table(value, spec.tables[target], where=where, path=full)
            names.update(inner)
        else:
            values[target] = _checked(spec.extra.get(target, hints.get(target, Any)), value, full, where)
    return values, names


def _unknown(key: str, where: str, spec: Table, path: str) -> str:
    import difflib

    name = key.rpartition(".")[2].replace("-", "_")
    close = difflib.get_close_matches(name, list(spec.keys()), n=1, cutoff=0.75)
    preferred = {field: k for k, field in spec.aliases.items()}
    hint = f" Did you mean `{preferred.get(spec.keys()[close[0]], close[0])}`?" if close else ""
    old = [f"{field} (= {k})" for k, field in spec.aliases.items()] + [f"{k} (= {f})" for k, f in spec.old.items()]
    return (f"`{key}` in {where} is not a key of {f'the `{path}` table' if path else 'this table'}.{hint} "
            f"Valid keys: {', '.join(spec.shown())}" + (f"; older names also accepted: {', '.join(old)}" if old else "")
            + ".")


_WORDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
          Path: "a string (a path)"}


def _checked(hint: Any, value: Any, key: str, where: str) -> Any:
    """`value` if it has type `hint` (a list becomes a tuple for a tuple field); else ConfigError."""
    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"`{key}` in {where} must be {expected}, got {_shown(value)}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None: None (JSON null) is allowed
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        return _checked(options[0], value, key, where) if len(options) == 1 else value
    if origin is tuple:  # tuple[str, ...]: a list of strings, or one comma-separated string
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            return value if isinstance(value, str) else tuple(value)
        raise wrong("a list of strings")
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong("a table")
        inner = args[1] if len(args) == 2 else Any
        return {k: _checked(inner, v, f"{key}.{k}", where) for k, v in value.items()}
    if hint not in _WORDS:  # Any, or a type the dataclass checks itself
        return value
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: is_number and isinstance(value, int),
          float: is_number and (isinstance(value, int) or math.isfinite(value)), str: isinstance(value, str), Path: isinstance(value, str)}[hint]
    if not ok:
        raise wrong(_WORDS[hint])
    return value


def _shown(value: Any, limit: int = 60) -> str:
    """A value in a message, cut to `limit` characters (a run file may hold a huge one)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
