"""`codedistill evaluate`: score a samples file (the command's work, without typer).

:func:`run` is the command; ``codedistill.cli`` declares its options for typer. A plain
command line (``evaluate SAMPLES [--option VALUE | --option=VALUE ...]``) is read here
(:func:`plain_argv`) and run by :func:`run_plain` without typer at all: typer takes tens of
milliseconds to import, and (0.29) builds a pydantic validator for each option it parses,
importing pydantic first; that was most of the command's start-up, before the sandboxes
could start. ``codedistill`` / ``python -m codedistill`` (:func:`codedistill.__main__.main`)
try it first; anything else (help, another command, an unknown or repeated option, a value
that is not plainly of its type) goes to typer, which parses it, or names what is wrong, as
it always does. tests/test_evaluate_cli.py checks both readings against each other.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

from codedistill.errors import CodedistillError

# flag -> (parameter of run, type), as codedistill.cli declares them
OPTIONS: dict[str, tuple[str, type]] = {
    "--dataset": ("dataset", str),
    "--data-path": ("data_path", Path),
    "--out": ("out", Path),
    "--workers": ("workers", int),
    "--timeout": ("timeout", float),
    "--metrics-out": ("metrics_out", Path),
    "--seed": ("seed", int),
}
_PLAIN_VALUE = {int: re.compile(r"0|[1-9][0-9]{0,8}"), float: re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")}


def run(
    samples: Path,
    dataset: str = "humaneval",
    data_path: Path | None = None,
    out: Path | None = None,
    workers: int | None = None,
    timeout: float = 3.0,
    metrics_out: Path | None = None,
    seed: int = 0,
) -> None:
    """Score a samples file: one result row per sample (input order) and pass@k with 95% CIs
    (see ``codedistill evaluate --help``)."""
    from codedistill.data import load_problems
    from codedistill.evaluation import execute, program_of, read_samples, warm_targets_of, write_results
    from codedistill.execution import Limits, SandboxPool
    from codedistill.ui import progress_bar, say

    # The sandboxes start (in their own processes, no more than there are samples) while the
    # dataset and the samples are read.
    with SandboxPool(workers=workers, limits=Limits(timeout=timeout), warm_targets=warm_targets_of(dataset)) as pool:
        pool.start(_count_lines(samples))
        problems = {p.task_id: p for p in load_problems(dataset, "all", data_path=data_path, visible_tests=False)}
        rows = read_samples(samples, problems, dataset)
        pairs = [(program_of(r, problems[r["task_id"]]), problems[r["task_id"]]) for r in rows]
        # numpy (for the bootstrap intervals) loads, and warms up, while the programs run; its
        # OpenBLAS would start a thread per core that spins a while, competing with the
        # sandboxes, for nothing: the intervals use no BLAS (the pool's fork servers keep the
        # environment the pool was made in)
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        threading.Thread(target=_import_metrics, name="import-metrics", daemon=True).start()
        with progress_bar("executing", len(pairs)) as advance:
            verdicts = execute(pairs, timeout=timeout, progress=advance, pool=pool)
    stem = str(samples)[: -len(".jsonl")] if str(samples).endswith(".jsonl") else str(samples)
    out = out or Path(stem + "_results.jsonl")
    results = [{"task_id": r["task_id"], **v} for r, v in zip(rows, verdicts)]
    write_results(out, results)

    from codedistill.evaluation import score
    from codedistill.runs import write_json

    metrics = score(results, seed=seed)
    metrics_out = metrics_out or Path(stem + "_metrics.json")
    write_json(metrics_out, metrics)
    say(f"results: {out}\nmetrics: {metrics_out}")
    if "base" in metrics:  # HumanEval+ / MBPP+: base and plus side by side
        from codedistill.report.format import base_plus_lines

        for line in base_plus_lines(dataset, metrics):
            say(line)
    sys.stdout.write(json.dumps(metrics, indent=2) + "\n")


def _import_metrics() -> None:
    """What the command needs once the programs have run: numpy (warmed up) for the bootstrap
    intervals, the results writer."""
    with contextlib.suppress(Exception):  # imported again (and any error raised) where used
        import codedistill.metrics
        import codedistill.runs  # noqa: F401

        codedistill.metrics.warm_up()  # (numpy.random and quantile load on first use)


def _count_lines(path: Path) -> int:
    """Non-blank lines of ``path`` (0 if it cannot be read: the reader reports why)."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


# --------------------------------------------------------------------------- a plain line
def plain_argv(argv: list[str]) -> dict[str, Any] | None:
    """The parameters of :func:`run` for ``argv`` (the arguments after the program's name)
    when it is a plain ``evaluate SAMPLES [--option VALUE | --option=VALUE ...]`` line: each
    option at most once, every value non-empty, not starting with ``-`` and, for a number,
    plain digits. None for anything else (typer's to parse, or to report)."""
    if not argv or argv[0] != "evaluate":
        return None
    given: dict[str, Any] = {}
    samples: str | None = None
    rest = iter(argv[1:])
    for arg in rest:
        if not arg.startswith("-"):
            if samples is not None:
                return None
            samples = arg
            continue
        flag, eq, value = arg.partition("=")
        if flag not in OPTIONS:
            return None
        name, kind = OPTIONS[flag]
        if not eq:
            value = next(rest, "")
        if name in given or not value or value.startswith("-"):
            return None
        if kind in _PLAIN_VALUE and not _PLAIN_VALUE[kind].fullmatch(value):
            return None
        given[name] = kind(value)
    if not samples:
        return None
    defaults = {n: p.default for n, p in inspect.signature(run).parameters.items() if n != "samples"}
    return {"samples": Path(samples)} | defaults | given


def run_plain(params: dict[str, Any]) -> None:
    """Run the command with ``params`` and end the process as typer's standalone mode does:
    status 0; one ``error: ...`` line and status 2 for our own errors; 130 on Ctrl-C; a
    broken pipe ends quietly (status 1); any other exception propagates (a traceback)."""
    import errno

    try:
        run(**params)
    except CodedistillError as e:
        from codedistill.ui import report_error

        report_error(e)
        _end(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
        _quiet_broken_pipe()
        sys.exit(1)
    _end(0)


def _end(code: int) -> None:
    """Exit with ``code`` once the command is done: the exit handlers run and stdout and
    stderr are flushed, but the interpreter's own teardown (every module, numpy's included,
    object by object: tens of milliseconds) is skipped, as nothing of the command is left to
    it (its files are written and closed, its sandboxes shut down)."""
    import atexit

    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        _quiet_broken_pipe()
        code = code or 1
    os._exit(code)


def _quiet_broken_pipe() -> None:
    for stream in (sys.stdout, sys.stderr):  # nothing left to flush into the closed pipe
        with contextlib.suppress(Exception):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
