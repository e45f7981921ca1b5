"""One Rich progress bar for every stage that shows one (demo data, train, embed, the Python API).

`progress_bar(enabled, unit=...)` is a `rich.progress.Progress` context manager: description, bar,
done/total, speed in `unit`/s (or a stage's own `fields` text, e.g. train's pairs/s and loss),
time elapsed and time remaining. Disabled, it draws nothing.
"""

from __future__ import annotations

from typing import Any


def progress_bar(enabled: bool = True, *, unit: str = "items", fields: str | None = None,
                 transient: bool = False) -> Any:
    """A Rich Progress (use as `with progress_bar(...) as bar: task = bar.add_task(...)`).

    `fields`: a format of the task's fields shown instead of the measured speed, e.g.
    "{task.fields[loss]:.4f}" (pass the fields to `add_task`/`update`)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else "")

    middle = TextColumn(fields) if fields else Speed()
    return Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), middle,
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=transient)
