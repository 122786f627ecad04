"""Console output helpers (rich): progress bars and tables, kept out of the core.

Long phases show a rich progress bar (counts, elapsed, ETA) only when stderr is an
interactive terminal; whatever the output, each phase ends with one plain summary line
(what was done, how much, wall time), so CI logs and redirected output stay readable.

rich is imported when something is drawn or styled: ``console`` (the shared stderr console)
is made on first use, and while stderr is plainly no terminal, :func:`say` writes its plain
line without it (a command such as ``codedistill evaluate`` then starts without rich).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from codedistill.errors import CodedistillError

if TYPE_CHECKING:
    from rich.console import Console

    console: Console  # the shared stderr console, made on first use (see __getattr__)

_shared: list[Console] = []


def __getattr__(name: str) -> Any:
    if name == "console":
        return _console()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _console() -> Console:
    if not _shared:
        from rich.console import Console

        _shared.append(Console(stderr=True, soft_wrap=True))
    return _shared[0]


def _plain_stderr() -> bool:
    """stderr is no terminal, so the shared console would style and draw nothing (rich's own
    test, without importing rich: no TTY_COMPATIBLE or FORCE_COLOR, and not a tty)."""
    if _shared or "TTY_COMPATIBLE" in os.environ or "FORCE_COLOR" in os.environ:
        return False
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def friendly_errors(fn):
    """CLI commands: print our own errors as one clear line (exit 2), not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CodedistillError as e:
            import typer  # (here: a command run without typer imports none of it)

            report_error(e)
            raise typer.Exit(2)

    return wrapper


def report_error(e: CodedistillError) -> None:
    """Our own error as one clear line on stderr: ``error: ...``."""
    _console().print(f"[bold red]error:[/] {e}", markup=True, highlight=False)


def interactive(con: Console | None = None) -> bool:
    """True when progress bars may be drawn: a terminal that understands cursor movement."""
    if con is None and _plain_stderr():
        return False
    con = con or _console()
    return con.is_terminal and not con.is_dumb_terminal


def say(message: str, con: Console | None = None) -> None:
    """One plain line on the console (no markup, no highlighting, no emoji codes)."""
    if con is None and _plain_stderr():
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        return
    (con or _console()).print(message, markup=False, highlight=False, emoji=False)


def fmt_seconds(s: float) -> str:
    """``12.3 s``, ``4 min 05 s``, ``1 h 02 min``."""
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class Tracker:
    """One counted phase: ``advance(n)``, optional busy-time accounting (``with timed():``,
    for phases that interleave with others), a ``note`` for the summary line."""

    def __init__(self, description: str, total: int, unit: str = "", start: int = 0):
        self.description = description
        self.total = total
        self.unit = unit
        self.start = start  # already done before this run (resume); counted, not timed
        self.completed = start
        self.note = ""
        self._t0 = time.perf_counter()
        self._t1: float | None = None
        self._busy: float | None = None
        self._on_advance: Callable[[int], None] = lambda n: None
        self._on_total: Callable[[int], None] = lambda n: None

    def advance(self, n: int = 1) -> None:
        self.completed += n
        self._on_advance(n)

    def set_total(self, total: int) -> None:
        self.total = total
        self._on_total(total)

    def add_time(self, seconds: float) -> None:
        """Add busy time by hand (the same accounting as ``timed``)."""
        self._busy = (self._busy or 0.0) + seconds

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Count the time spent in this block as the phase's wall time (else: start to end)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._busy = (self._busy or 0.0) + time.perf_counter() - t

    @property
    def seconds(self) -> float:
        if self._busy is not None:
            return self._busy
        return (self._t1 or time.perf_counter()) - self._t0

    def finish(self) -> None:
        if self._t1 is None:
            self._t1 = time.perf_counter()

    def summary(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        count = f"{self.completed}/{self.total}{unit}"
        if self.start:
            count += f" ({self.start} done before)"
        note = f", {self.note}" if self.note else ""
        return f"{self.description}: {count}{note} in {fmt_seconds(self.seconds)}"


@contextlib.contextmanager
def progress_tasks(
    *specs: tuple[str, int, str] | Tracker,
    enabled: bool = True,
    summary: bool = True,
    con: Console | None = None,
) -> Iterator[list[Tracker]]:
    """Several phases shown together: yields one ``Tracker`` per ``(description, total,
    unit)`` (or a ready Tracker). On an interactive terminal each gets a bar with counts,
    elapsed time and ETA (removed when done); elsewhere nothing is drawn. On normal exit
    each phase that had work prints its one-line summary (``Tracker.summary``) unless
    ``summary=False``."""
    con = con or (None if _plain_stderr() else _console())
    trackers = [s if isinstance(s, Tracker) else Tracker(*s) for s in specs]
    if enabled and interactive(con):
        from rich.progress import (  # only where a bar is drawn (slow to import)
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        prog = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=con,
            transient=True,
        )
        with prog:
            for t in trackers:
                task = prog.add_task(t.description, total=t.total, completed=t.completed, unit=t.unit)
                t._on_advance = functools.partial(lambda task, n: prog.advance(task, n), task)
                t._on_total = functools.partial(lambda task, n: prog.update(task, total=n), task)
            yield trackers
    else:
        yield trackers
    for t in trackers:
        t.finish()
        if enabled and summary and (t.total or t.completed):  # a phase with nothing to do says nothing
            say(t.summary(), con)


@contextlib.contextmanager
def progress_bar(
    description: str,
    total: int,
    enabled: bool = True,
    unit: str = "",
    summary: bool = True,
) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``: a rich bar on a terminal, nothing drawn otherwise; then one
    summary line with the count and wall time (see ``progress_tasks``)."""
    with progress_tasks((description, total, unit), enabled=enabled, summary=summary) as (t,):
        yield t.advance


class RunPlan:
    """What a run will do, said at its start and recorded in ``plan.json`` in the run
    directory; ``chunk(programs, seconds, computed)``, called after every chunk of generation +
    testing, adds an estimate of the run's generation and testing time from the first chunk
    that computed (``computed=False``: a response cache answered it in full; such chunks before
    it are taken off the programs left, later ones and later chunks are ignored).

    ``phases``: dicts with at least ``programs`` (to generate and test) and optionally
    ``done_programs`` (already there from an earlier start)."""

    def __init__(
        self,
        path: Any,
        phases: list[dict[str, Any]],
        extra: dict[str, Any] | None = None,
        note: str = "",
        log: Callable[[str], None] | None = None,
    ):
        self.path = path
        self.log = log or say
        self.note = note
        self.todo = sum(max(0, int(p["programs"]) - int(p.get("done_programs", 0))) for p in phases)
        self.record: dict[str, Any] = {
            "phases": phases,
            "programs_to_generate": self.todo,
            **(extra or {}),
            "estimate": None,
        }
        self._estimated = False
        self.answered = 0  # programs of chunks a response cache answered before the estimate
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            from codedistill.runs import write_json

            write_json(self.path, self.record)

    def announce(self, *lines: str) -> None:
        for line in lines:
            self.log(line)

    def chunk(self, programs: int, seconds: float, computed: bool = True) -> None:
        if self._estimated or programs <= 0:
            return
        if not computed:
            self.answered += programs
            return
        self._estimated = True
        per = seconds / programs
        left = max(programs, self.todo - self.answered)
        total = per * left
        self.record["estimate"] = {
            "first_chunk_programs": programs,
            "first_chunk_seconds": round(seconds, 2),
            "seconds_per_program": round(per, 4),
            "answered_from_cache_before": self.answered,
            "estimated_seconds": round(total, 1),
            "covers": "generation and testing" + (f"; {self.note}" if self.note else ""),
        }
        self._write()
        extra = f"; {self.note}" if self.note else ""
        cached = f" left ({self.answered} answered by the response cache before it)" if self.answered else ""
        self.log(
            f"estimate: first chunk {programs} programs in {fmt_seconds(seconds)} ({per:.2f} s each) -> about "
            f"{fmt_seconds(total)} for the {left} programs of this run{cached} (from one chunk{extra})"
        )
