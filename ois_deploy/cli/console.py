"""What every command prints with: consoles, progress bars, tables."""

from __future__ import annotations

import sys
from typing import Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def console_for(json_path: Optional[str], stderr: bool = False) -> Console:
    """Human output goes to stderr when JSON goes to stdout. Logs and pipes get wide tables."""
    to_stderr = stderr or json_path == "-"
    tty = (sys.stderr if to_stderr else sys.stdout).isatty()
    return Console(stderr=to_stderr, highlight=False, width=None if tty else 120)


def note(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def progress_steps(console: Console):
    """A spinner with elapsed time for long, step-wise work; returns (context, step callback, finish)."""
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True)
    state = {"task": None}

    def step(text: str) -> None:
        if state["task"] is not None:
            bar.update(state["task"], completed=1, total=1)
        state["task"] = bar.add_task(text, total=None)

    def finish() -> None:
        if state["task"] is not None:
            bar.update(state["task"], completed=1, total=1)

    return bar, step, finish


def counted_progress(console: Console, total: int, what: str, stats: bool = False):
    """A bar over `total` items: (context, task id); with stats, a text field `stats` to update."""
    columns = [TextColumn(what), BarColumn(), MofNCompleteColumn()]
    if stats:
        columns.append(TextColumn("{task.fields[stats]}"))
    bar = Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    return bar, bar.add_task(what, total=total, **({"stats": ""} if stats else {}))


def table(title: str, columns: list[str], rows: list[list[str]], left: int = 1) -> Table:
    """A table whose first `left` columns are left-aligned and the rest right-aligned (numbers)."""
    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i < left else "right")
    for row in rows:
        t.add_row(*row)
    return t
