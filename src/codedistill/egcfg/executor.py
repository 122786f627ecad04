"""Where EG-CFG's executions run: the project's sandbox, never the main process.

:class:`TraceExecutor` runs (a) the tracer on candidate programs (``SandboxPool.call_many``
runs the trusted tracer inside sandboxed children) and (b) a plain pass/fail check of
finished programs on the visible tests (``SandboxPool.run``), many at a time, counting
executions. It uses the given pool, or one of its own (``workers`` servers, the tracer
pre-imported) when none is given.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from codedistill.execution import Job, Limits, SandboxPool

TRACER_TARGET = "codedistill.egcfg.tracer:trace"


def _timeout_result(tests: Sequence[str], why: str) -> dict:
    return {
        "tests": [],
        "compile_error": None,
        "error": why,
        "timed_out": "timeout" in why.lower() or "timed out" in why.lower(),
        "n_tests": len(tests),
    }


class TraceExecutor:
    """Runs tracer / check jobs in the sandbox pool, counting executions."""

    def __init__(self, pool: Any = None, workers: int = 2, timeout: float = 10.0):
        self.workers = max(1, workers)
        self.timeout = timeout
        self.executions = 0
        self._lock = threading.Lock()
        self.limits = Limits(timeout=timeout)
        self._own_pool = pool is None
        if pool is None:
            pool = SandboxPool(workers=self.workers, limits=self.limits, warm_targets=[TRACER_TARGET])
        self.pool = pool

    def close(self) -> None:
        if self._own_pool and self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> TraceExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _count(self, n: int) -> None:
        with self._lock:
            self.executions += n

    def trace_many(self, jobs: Sequence[dict]) -> list[dict]:
        """Tracer results, in job order. A job is the tracer's args (program, tests, ...)."""
        if not jobs:
            return []
        self._count(len(jobs))
        # the whole call's wall clock: the tracer's per-test budget for every test, plus slack
        per_test = max(float(j.get("timeout_s", 2.0)) for j in jobs)
        n_tests = max(len(j.get("tests", [])) for j in jobs)
        limits = replace(self.limits, timeout=min(self.timeout, per_test * max(1, n_tests) + 1.5))
        verdicts = self.pool.call_many(TRACER_TARGET, [dict(j) for j in jobs], limits)
        out = []
        for j, v in zip(jobs, verdicts):
            payload = getattr(v, "payload", None)
            if isinstance(payload, dict):
                out.append(payload)
            else:
                out.append(_timeout_result(j.get("tests", []), str(getattr(v, "result", "failed"))))
        return out

    def check_many(self, programs: Sequence[str], tests: Sequence[str], test_setup: str = "") -> list[dict]:
        """For each program: {"passed": all tests pass, "pass_rate": fraction passed}."""
        if not programs:
            return []
        if not tests:
            return [{"passed": False, "pass_rate": 0.0, "tests_total": 0} for _ in programs]
        self._count(len(programs))
        verdicts = self.pool.run([Job(p, list(tests), test_setup) for p in programs])
        return [
            {"passed": bool(v.passed), "pass_rate": float(v.pass_rate), "tests_total": len(tests)} for v in verdicts
        ]
