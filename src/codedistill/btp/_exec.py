"""Testing programs for BTP: the project's sandbox (``codedistill.execution`` through
``codedistill.evaluation.execute``) when it is installed, else a minimal private
fallback that runs each program in its own ``python -I`` subprocess (never in this
process) with a wall-clock timeout and a memory limit."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Sequence

from codedistill.data.problem import Problem

_HARNESS = r"""
import json, sys
d = json.loads(sys.stdin.read())
ns = {"__name__": "__main__"}
out = {"passed": 0, "total": len(d["tests"]), "result": "passed"}
try:
    exec(compile(d["setup"] + "\n" + d["program"], "<program>", "exec"), ns)
except BaseException as e:
    out["result"] = "failed: program: " + type(e).__name__
else:
    for t in d["tests"]:
        try:
            exec(compile(t, "<test>", "exec"), ns)
            out["passed"] += 1
        except BaseException as e:
            if out["result"] == "passed":
                out["result"] = "failed: " + type(e).__name__
sys.__stdout__.write("\n@@RESULT@@" + json.dumps(out) + "\n")
sys.__stdout__.flush()
"""


def _limit_memory() -> None:  # pragma: no cover - runs in the child
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    except Exception:
        pass


def _fallback_one(program: str, problem: Problem, timeout: float) -> dict[str, Any]:
    payload = json.dumps({"program": program, "setup": problem.test_setup, "tests": list(problem.tests)})
    total = len(problem.tests)
    try:
        cp = subprocess.run(
            [sys.executable, "-I", "-c", _HARNESS], input=payload, capture_output=True, text=True,
            timeout=timeout * max(1, total), preexec_fn=_limit_memory,
        )
        tail = cp.stdout.rsplit("@@RESULT@@", 1)
        if len(tail) != 2:
            raise ValueError("no result")
        r = json.loads(tail[1].strip().splitlines()[0])
        passed = int(r["passed"])
        result = r["result"]
    except subprocess.TimeoutExpired:
        passed, result = 0, "timed out"
    except (ValueError, KeyError, IndexError):
        passed, result = 0, "failed: crashed"
    return {
        "passed": total > 0 and passed == total,
        "result": result,
        "pass_rate": passed / total if total else 0.0,
        "tests_passed": passed,
        "tests_total": total,
    }


def sandbox_available() -> bool:
    try:
        from codedistill.execution import Job, Limits, SandboxPool  # noqa: F401
    except ImportError:
        return False
    return True


def run_tests(
    pairs: Sequence[tuple[str, Problem]], timeout: float = 3.0, workers: int | None = None, pool: Any = None
) -> list[dict[str, Any]]:
    """Verdict dicts (passed, result, pass_rate, tests_passed, tests_total) in input order."""
    if not pairs:
        return []
    if sandbox_available():
        from codedistill.evaluation import execute

        return execute(list(pairs), workers=workers, timeout=timeout, pool=pool)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers or 2) as ex:
        return list(ex.map(lambda pp: _fallback_one(pp[0], pp[1], timeout), pairs))


def open_pool(workers: int | None, timeout: float) -> Any:
    """A shared sandbox pool (context manager) when the sandbox exists, else None."""
    if not sandbox_available():
        return None
    from codedistill.execution import Limits, SandboxPool

    return SandboxPool(workers=workers, limits=Limits(timeout=timeout))
