"""Console output helpers (rich): progress bars and tables, kept out of the core."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)

console = Console(stderr=True, soft_wrap=True)


def friendly_errors(fn):
    """CLI commands: print our own errors as one clear line (exit 2), not a traceback."""
    import typer

    from codedistill.errors import CodedistillError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CodedistillError as e:
            console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
            raise typer.Exit(2)

    return wrapper


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``; a rich bar on a terminal, plain periodic lines otherwise."""
    if not enabled:
        yield lambda n=1: None
        return
    prog = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )
    with prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)
