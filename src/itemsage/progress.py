"""One Rich progress bar for every stage that shows one (embed, the Python API's encode, demo data).

`progress_bar(enabled, unit=...)` is a `rich.progress.Progress` context manager: description, bar,
done/total, speed in `unit`/s and time remaining. Disabled, it draws nothing and costs nothing.
"""

from __future__ import annotations

from typing import Any


def progress_bar(enabled: bool = True, *, unit: str = "items", transient: bool = False) -> Any:
    """A Rich Progress (use as `with progress_bar(...) as bar: task = bar.add_task(...)`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else "")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Speed(),
                    TimeRemainingColumn(), disable=not enabled, transient=transient)
