"""The progress bar of long work: description, bar, done/total, images per second and ETA (rich)."""

from __future__ import annotations

from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task
from rich.text import Text


def rate(task: Task) -> float:
    """Items per second: rich's windowed speed while running (once it has two updates), the overall
    rate since the start before that and once finished."""
    return task.finished_speed or task.speed or (task.completed / task.elapsed if task.elapsed else 0.0)


class RateColumn(ProgressColumn):
    """Images per second (:func:`rate`)."""

    def render(self, task: Task) -> Text:
        return Text(f"{rate(task):.1f} img/s", style="progress.data.speed")


class EtaColumn(ProgressColumn):
    """Time left at the :func:`rate` of :class:`RateColumn`: shown from the first update on."""

    def render(self, task: Task) -> Text:
        speed = rate(task)
        if task.total is None or not speed:
            return Text("ETA -:--:--", style="progress.remaining")
        seconds = max(task.total - task.completed, 0) / speed
        return Text(f"ETA {timedelta(seconds=round(seconds))}", style="progress.remaining")


def progress_bar(console: Console, enabled: bool = True) -> Progress:
    """A bar on `console` (the CLI's stderr); `enabled=False` shows nothing."""
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), RateColumn(), EtaColumn())
    return Progress(*columns, console=console, disable=not enabled)
