"""The progress bar of long work: description, bar, done/total, images per second and ETA (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TimeRemainingColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    """Images per second: rich's windowed speed while running, the overall rate once finished."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed or (task.completed / task.elapsed if task.elapsed else 0.0)
        return Text(f"{speed:.1f} img/s", style="progress.data.speed")


def progress_bar(console: Console, enabled: bool = True) -> Progress:
    """A bar on `console` (the CLI's stderr); `enabled=False` shows nothing."""
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), RateColumn(), "ETA", TimeRemainingColumn())
    return Progress(*columns, console=console, disable=not enabled)
