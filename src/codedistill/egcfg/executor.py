"""Where EG-CFG's executions run: the project's sandbox, never the main process.

:class:`TraceExecutor` runs (a) the tracer on candidate programs and (b) a plain pass/fail
check of finished programs on the visible tests, many at a time.

* In the project's sandbox (``codedistill.execution.SandboxPool``: ``call_many`` runs the
  trusted tracer in sandboxed children, ``run`` the checks): the given pool, or one of its
  own (``exec_workers`` workers, the tracer pre-imported in the fork servers) when none
  is given. This is the default.
* ``backend="subprocess"`` (or when ``codedistill.execution`` cannot be imported): one fresh
  ``python -m codedistill.egcfg.tracer`` child per job, with CPU-time and memory rlimits, a
  wall-clock timeout and a scratch working directory, several in parallel threads. The
  checks use the same tracer with recording off (``max_events=0``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

TRACER_TARGET = "codedistill.egcfg.tracer:trace"


def _timeout_result(tests: Sequence[str], why: str) -> dict:
    return {"tests": [], "compile_error": None, "error": why, "timed_out": "timeout" in why.lower() or "timed out" in why.lower(),
            "n_tests": len(tests)}


def _limits():
    import resource

    def set_limits():
        os.setsid()
        for res, val in ((resource.RLIMIT_AS, 1 << 30), (resource.RLIMIT_CPU, 20),
                         (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_NPROC, 256)):
            try:
                resource.setrlimit(res, (val, val))
            except (ValueError, OSError):
                pass
    return set_limits


def run_tracer_subprocess(args: dict, timeout: float) -> dict:
    """The tracer in a fresh, rlimited child process (fallback sandbox)."""
    with tempfile.TemporaryDirectory(prefix="egcfg_") as wd:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "HOME": wd}
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = src
        try:
            r = subprocess.run(
                [sys.executable, "-m", "codedistill.egcfg.tracer"], input=json.dumps(args),
                capture_output=True, text=True, timeout=timeout, cwd=wd, env=env,
                preexec_fn=_limits(),
            )
        except subprocess.TimeoutExpired:
            return _timeout_result(args.get("tests", []), f"timeout after {timeout:.1f}s")
    if r.returncode != 0:
        return _timeout_result(args.get("tests", []), f"tracer exited {r.returncode}: {r.stderr[-300:]}")
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        return _timeout_result(args.get("tests", []), "tracer output not JSON")


class TraceExecutor:
    """Runs tracer / check jobs in the sandbox pool (or the fallback), counting executions."""

    def __init__(self, pool: Any = None, workers: int = 2, timeout: float = 10.0, backend: str = "sandbox"):
        self.workers = max(1, workers)
        self.timeout = timeout
        self.executions = 0
        self._lock = threading.Lock()
        self._own_pool = False
        self.limits = None
        if backend == "sandbox":
            try:
                from codedistill.execution import Limits, SandboxPool
            except ImportError:  # pragma: no cover - the sandbox is part of the project
                backend = "subprocess"
            else:
                self.limits = Limits(timeout=timeout)
                if pool is None:
                    pool = SandboxPool(workers=self.workers, limits=self.limits, warm_targets=[TRACER_TARGET])
                    self._own_pool = True
        self.pool = pool
        self.backend = backend

    def close(self) -> None:
        if self._own_pool and self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> "TraceExecutor":
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
        if self.backend == "sandbox":
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
        with ThreadPoolExecutor(self.workers) as ex:
            return list(ex.map(lambda j: run_tracer_subprocess(j, self.timeout), jobs))

    def check_many(self, programs: Sequence[str], tests: Sequence[str], test_setup: str = "") -> list[dict]:
        """For each program: {"passed": all tests pass, "pass_rate": fraction passed}."""
        if not programs:
            return []
        if not tests:
            return [{"passed": False, "pass_rate": 0.0, "tests_total": 0} for _ in programs]
        if self.backend == "sandbox":
            from codedistill.execution import Job

            self._count(len(programs))
            verdicts = self.pool.run([Job(p, list(tests), test_setup) for p in programs])
            return [{"passed": bool(v.passed), "pass_rate": float(v.pass_rate), "tests_total": len(tests)}
                    for v in verdicts]
        res = self.trace_many([{"program": p, "tests": list(tests), "test_setup": test_setup,
                                "max_events": 0, "timeout_s": min(3.0, self.timeout)} for p in programs])
        out = []
        for r in res:
            ok = [bool(t.get("passed")) and not t.get("exception") for t in r.get("tests", [])]
            n_ok = sum(ok)
            out.append({"passed": bool(ok) and n_ok == len(tests), "pass_rate": n_ok / len(tests),
                        "tests_total": len(tests)})
        return out
