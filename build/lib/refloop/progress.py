"""Rich progress bars for long jobs (hidden when output is not a terminal and CI is set)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator:
    """Yields `advance(n=1, total=None, completed=None)`. The bar appears with the first report, so a
    run refused before any work draws none. A job that learns its total only once it starts (SFT:
    steps from the examples) passes it with its first advance, and a resumed job its absolute
    position (`completed`: the trainer's step), so the bar starts where the run stands and its speed
    and ETA count only this session. `enabled=False` yields None (no bar: a job that reports
    progress only when asked, or a process other than the main one)."""
    if not enabled:
        yield None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False, disable=bool(os.environ.get("REFLOOP_NO_PROGRESS"))) as bar:
        task, position, first_total = None, 0, total  # position: the last absolute position reported

        def advance(n: int = 1, total: int | None = None, completed: int | None = None) -> None:
            nonlocal task, position
            if task is None:
                position = completed - 1 if completed is not None else 0
                task = bar.add_task(description, total=total if total is not None else first_total, completed=position)
            elif total is not None:
                bar.update(task, total=total)
            if completed is not None:
                n = completed - position
            position += n
            bar.advance(task, n)

        yield advance


@contextmanager
def staged_progress() -> Iterator:
    """Yields `advance(stage, n, total)`: one bar per stage, opened when the stage first reports."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False, disable=bool(os.environ.get("REFLOOP_NO_PROGRESS"))) as bar:
        tasks: dict[str, object] = {}

        def advance(stage: str, n: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.advance(tasks[stage], n)

        yield advance
