"""Run files (`--config`): each command's table, checked in one place before anything runs.

A table's keys are the fields of the config dataclass its flags fill (`[train]`: TrainConfig, its
`model` table ModelConfig; `[compare]`: CompareConfig, its `train_overrides` table TrainConfig;
`[demo]`: DemoSettings; `[graph]`: GraphConfig), named as the flags name them: `steps` is `--steps`
in every command (the fields' own names, `max_steps`, `train_minutes`, ..., stay accepted), a key may
be written with dashes as its flag is (`batch-size`), and `dataset` and `out` name the command's
directories.
`config.check_table` reads the types from the dataclasses' annotations, so a field added to a config
is a key at once, and checked. Ranges are the dataclasses' own checks, made when the command builds
its config, still before any directory is created; their errors name a value from the file by its
key as written there (`names`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Optional

from itemsage.config import Table


def _spec(section: str) -> Table:
    """The table of `section`, built from the dataclasses (imported here: TrainConfig loads torch)."""
    if section == "graph":
        from itemsage.graph.config import GraphConfig

        return Table(GraphConfig, "graph", extra={"dataset": Path, "out": Path})
    from itemsage.model.config import ModelConfig

    model = Table(ModelConfig, "model")
    if section == "demo":
        from itemsage.demo import DemoSettings

        return Table(DemoSettings, "demo", aliases={"minutes": "train_minutes", "steps": "train_steps"},
                     old={"max_steps": "train_steps", "max_minutes": "train_minutes"}, tables={"model": model})
    from itemsage.train.config import TrainConfig

    train = Table(TrainConfig, "train", aliases={"steps": "max_steps", "minutes": "max_minutes"},
                  tables={"model": model})
    if section == "train":
        return dataclasses.replace(train, extra={"dataset": Path, "out": Path})
    from itemsage.evaluate.compare_runs import CompareConfig

    return Table(CompareConfig, "compare", old={"max_steps": "steps"},
                 extra={"dataset": Path, "out": Path, "random_negatives_ratio": float},
                 tables={"train_overrides": train})


@dataclasses.dataclass
class RunFile:
    """A run file's table for one command, checked: `values` by field name (nested tables as dicts),
    and `names`, each value's name in the dataclasses' errors -> its key as written in the file."""

    path: Optional[Path] = None
    section: str = ""
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    names: dict[str, str] = dataclasses.field(default_factory=dict)

    def pop(self, key: str) -> Any:
        return self.values.pop(key, None)

    def path_value(self, key: str, given: Optional[Path]) -> Optional[Path]:
        """A directory from the command line, else the file's `key` (`dataset`, `out`), else None."""
        value = self.pop(key)
        return given if given is not None else (Path(value) if value is not None else None)

    def file_names(self, given: Iterable[str]) -> dict[str, str]:
        """`names` less the values a flag replaced (`given`: their names in the errors, "train.max_steps")."""
        return {name: key for name, key in self.names.items() if name not in set(given)}


def read(path: Optional[Path], section: str) -> RunFile:
    """The checked `section` table of the run file at `path` (an empty RunFile without one).
    Raises ConfigError naming the file, the key and what is wrong."""
    from itemsage.config import check_table, read_run_file

    if path is None:
        return RunFile(section=section)
    values, names = check_table(read_run_file(path, section), _spec(section), where=f"{path} [{section}]")
    return RunFile(path, section, values, names)
