"""Line-level execution tracer for EG-CFG. Runs INSIDE the sandboxed child, never in the
main process (the sandbox calls :func:`trace` with JSON args and returns its JSON result).

For each test snippet the program is executed in a fresh namespace, then the test, under
``sys.settrace``. Only frames whose code comes from the program (filename ``<solution>``)
are recorded. One event per executed line, with the local variables that changed by that
line (``vars``: name -> truncated repr); calls, returns (with the value) and exceptions (with
the line). When an ``assert CALL == EXPECTED`` test is seen, the call is evaluated on its own
so its return value can be shown next to the expected one.

Budgets: ``max_events`` events and ``max_chars`` characters of recorded text per test. Once a
budget is hit, recording stops AND tracing is switched off (``sys.settrace(None)`` and the
frames' local tracers removed), so a million-iteration loop runs at full speed and costs no
memory. ``timeout_s`` per test turns an endless loop into a ``TimeoutError`` instead of
killing the whole trace call: checked by the trace function while it records, and by
SIGALRM when the tracer runs in the main thread (standalone). Inside the sandbox the call
runs in a worker thread, so an endless loop after the recording budget is spent is ended by
the sandbox's own time limit (the caller then reports the candidate as timed out).

Standalone use (for tests without the sandbox): ``python -m codedistill.egcfg.tracer`` reads
the args as JSON on stdin and writes the result as JSON on stdout.
"""

from __future__ import annotations

import ast
import io
import json
import reprlib
import signal
import sys
import threading
import time
import traceback
import types
from typing import Any

SOLUTION_FILE = "<solution>"
_SKIP_TYPES = (types.FunctionType, type, types.ModuleType, types.BuiltinFunctionType)
TEST_FILE = "<test>"

DEFAULTS = {
    "max_events": 200,
    "max_chars": 6000,
    "max_repr": 80,
    "timeout_s": 2.0,
    "types": False,  # also record type names (events get "types" / "type"; the paper template shows them)
}


class _Repr(reprlib.Repr):
    def __init__(self, limit: int):
        super().__init__()
        self.maxstring = max(limit - 2, 8)
        self.maxother = limit
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdeque = 8
        self.maxdict = 6
        self.maxlevel = 3
        self.maxlong = limit

    def repr_instance(self, x, level):  # user objects: guarded, truncated
        try:
            s = repr(x)
        except Exception as e:  # noqa: BLE001
            return f"<repr failed: {type(e).__name__}>"
        return s if len(s) <= self.maxother else s[: self.maxother - 3] + "..."


def safe_repr(x: Any, limit: int = 80) -> str:
    try:
        s = _Repr(limit).repr(x)
    except Exception as e:  # noqa: BLE001  (e.g. int too large to print)
        s = f"<{type(x).__name__}: repr failed: {type(e).__name__}>"
    return s if len(s) <= limit else s[: limit - 3] + "..."


class _Recorder:
    def __init__(
        self, max_events: int, max_chars: int, max_repr: int, deadline: float | None = None, types: bool = False
    ):
        self.deadline = deadline
        self.types = types
        self.prev_types: dict[int, dict[str, str]] = {}
        self.last_types: dict[str, str] = {}
        self.setup_names: set[str] = set()  # names the test setup defined (not the program's state)
        self.max_events = max_events
        self.max_chars = max_chars
        self.max_repr = max_repr
        self.events: list[dict] = []
        self.chars = 0
        self.seen = 0  # events observed (recorded or not) before tracing stopped
        self.truncated = False
        self.prev_line: dict[int, int | None] = {}  # id(frame) -> line being executed
        self.prev_vars: dict[int, dict[str, str]] = {}
        self.raised: set[int] = set()

    # -- budget ---------------------------------------------------------------
    def _add(self, ev: dict) -> None:
        size = len(json.dumps(ev, ensure_ascii=False))
        if len(self.events) >= self.max_events or self.chars + size > self.max_chars:
            self.stop()
            return
        self.events.append(ev)
        self.chars += size

    def stop(self) -> None:
        if not self.truncated:
            self.truncated = True
            sys.settrace(None)

    # -- trace functions ----------------------------------------------------------
    def global_trace(self, frame, event, arg):
        if self.truncated or frame.f_code.co_filename != SOLUTION_FILE:
            return None
        return self.local_trace(frame, event, arg)

    def _delta(self, frame) -> dict[str, str]:
        """Locals whose repr changed since the last snapshot of this frame (their type names
        in ``self.last_types`` when types are recorded)."""
        key = id(frame)
        old = self.prev_vars.get(key, {})
        new = {}
        tnew = {}
        module = frame.f_code.co_name == "<module>"
        for k, v in list(frame.f_locals.items()):
            if k.startswith("__") or isinstance(v, _SKIP_TYPES) or (module and k in self.setup_names):
                continue
            new[k] = safe_repr(v, self.max_repr)
            if self.types:
                tnew[k] = type(v).__name__
        self.prev_vars[key] = new
        told = self.prev_types.get(key, {})
        self.prev_types[key] = tnew
        changed = {k: v for k, v in new.items() if old.get(k) != v or told.get(k) != tnew.get(k)}
        self.last_types = {k: tnew[k] for k in changed} if self.types else {}
        return changed

    def _with_types(self, ev: dict) -> dict:
        if self.types:
            ev["types"] = self.last_types
        return ev

    def local_trace(self, frame, event, arg):
        if self.truncated:
            frame.f_trace = None
            return None
        self.seen += 1
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.stop()
            raise _Timeout()
        key = id(frame)
        func = frame.f_code.co_name
        if event == "call":
            self.prev_vars[key] = {}
            self.prev_line[key] = None
            self.raised.discard(key)
            if func != "<module>":
                self._add(
                    self._with_types(
                        {"event": "call", "func": func, "line": frame.f_lineno, "args": self._delta(frame)}
                    )
                )
        elif event == "line":
            prev = self.prev_line.get(key)
            if prev is not None:
                delta = self._delta(frame)
                if delta or func != "<module>":
                    self._add(self._with_types({"event": "line", "func": func, "line": prev, "vars": delta}))
            self.prev_line[key] = frame.f_lineno
        elif event == "return":
            prev = self.prev_line.pop(key, None)
            delta = self._delta(frame)
            if prev is not None and delta:
                self._add(self._with_types({"event": "line", "func": func, "line": prev, "vars": delta}))
            if key in self.raised:  # leaving by an exception, not a return
                self.raised.discard(key)
            elif func != "<module>":
                ev = {"event": "return", "func": func, "line": frame.f_lineno, "value": safe_repr(arg, self.max_repr)}
                if self.types:
                    ev["type"] = type(arg).__name__
                self._add(ev)
            self.prev_vars.pop(key, None)
            self.prev_types.pop(key, None)
        elif event == "exception":
            exc_type, exc, _ = arg
            self.raised.add(key)
            self._add(
                {
                    "event": "exception",
                    "func": func,
                    "line": frame.f_lineno,
                    "type": exc_type.__name__,
                    "message": _msg(exc, self.max_repr),
                }
            )
        if self.truncated:
            frame.f_trace = None
            return None
        return self.local_trace


def _msg(exc: BaseException, limit: int) -> str:
    try:
        m = str(exc)
    except Exception:  # noqa: BLE001
        m = "<unprintable>"
    return m if len(m) <= limit else m[: limit - 3] + "..."


def _exc_info(exc: BaseException, max_repr: int) -> dict:
    line = None
    for fs in traceback.extract_tb(exc.__traceback__):
        if fs.filename == SOLUTION_FILE:
            line = fs.lineno
    if isinstance(exc, SyntaxError) and exc.filename == SOLUTION_FILE:
        line = exc.lineno
    return {"type": type(exc).__name__, "message": _msg(exc, max_repr), "line": line}


def split_assert(test: str) -> tuple[str | None, str | None]:
    """``assert CALL == EXPECTED`` -> (CALL, EXPECTED) source; else (None, None)."""
    try:
        mod = ast.parse(test.strip())
    except SyntaxError:
        return None, None
    if len(mod.body) != 1 or not isinstance(mod.body[0], ast.Assert):
        return None, None
    t = mod.body[0].test
    if isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq):
        return ast.unparse(t.left), ast.unparse(t.comparators[0])
    if isinstance(t, ast.Call):
        return ast.unparse(t), "True"
    return None, None


class _CappedIO(io.StringIO):
    """stdout of the traced code: keeps the first ``cap`` characters, drops the rest."""

    def __init__(self, cap: int = 2000):
        super().__init__()
        self.cap = cap
        self.n = 0

    def write(self, s: str) -> int:
        if self.n < self.cap:
            super().write(s[: self.cap - self.n])
        self.n += len(s)
        return len(s)


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Timeout()


def _run_one(program: str, setup: str, test: str, opts: dict) -> dict:
    rec = _Recorder(
        int(opts["max_events"]),
        int(opts["max_chars"]),
        int(opts["max_repr"]),
        deadline=time.monotonic() + float(opts["timeout_s"]),
        types=bool(opts.get("types")),
    )
    out: dict[str, Any] = {
        "test": test,
        "call": None,
        "result": None,
        "expected": None,
        "passed": False,
        "exception": None,
        "stdout": "",
    }
    call_src, exp_src = split_assert(test)
    out["call"] = call_src
    ns: dict[str, Any] = {"__name__": "__main__"}
    buf = _CappedIO()
    old_stdout = sys.stdout
    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if use_alarm:
        old_handler = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, float(opts["timeout_s"]))
    stage = "setup"
    try:
        sys.stdout = buf
        if setup:
            exec(compile(setup, "<setup>", "exec"), ns)
        stage = "program"
        rec.setup_names = set(ns)
        code = compile(program, SOLUTION_FILE, "exec")
        if rec.max_events > 0:
            sys.settrace(rec.global_trace)
        try:
            exec(code, ns)
            stage = "test"
            if call_src is not None and exp_src is not None:
                value = eval(compile(call_src, TEST_FILE, "eval"), ns)
                sys.settrace(None)
                out["result"] = safe_repr(value, int(opts["max_repr"]))
                expected = eval(compile(exp_src, TEST_FILE, "eval"), ns)
                out["expected"] = safe_repr(expected, int(opts["max_repr"]))
                out["passed"] = bool(value == expected)
            else:
                exec(compile(test, TEST_FILE, "exec"), ns)
                out["passed"] = True
        finally:
            sys.settrace(None)
    except _Timeout:
        out["exception"] = {
            "type": "TimeoutError",
            "message": f"{stage} exceeded {opts['timeout_s']}s",
            "line": rec.prev_line and list(rec.prev_line.values())[-1] or None,
        }
    except BaseException as e:  # noqa: BLE001  (SystemExit, KeyboardInterrupt from user code too)
        sys.settrace(None)
        out["exception"] = _exc_info(e, int(opts["max_repr"]))
        out["exception"]["stage"] = stage
    finally:
        sys.settrace(None)
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
        sys.stdout = old_stdout
    out["stdout"] = buf.getvalue()[:200]
    out["events"] = rec.events
    out["truncated"] = rec.truncated
    out["n_events_seen"] = rec.seen
    return out


def trace(args: dict | None = None, /, **kwargs: Any) -> dict:
    """Trace ``args["program"]`` on each of ``args["tests"]`` (args as a dict or as keywords,
    so both ``trace(args)`` and the sandbox's ``target(**args)`` work).

    args: program (str), tests (list[str]), test_setup (str, optional), and the budgets
    max_events, max_chars, max_repr, timeout_s (see ``DEFAULTS``). Returns
    ``{"tests": [per-test dict], "compile_error": dict | None}``; per test: test, call,
    result, expected, passed, exception {type, message, line, stage} | None, events,
    truncated, n_events_seen, stdout.
    """
    args = {**(args or {}), **kwargs}
    opts = {**DEFAULTS, **{k: args[k] for k in DEFAULTS if k in args}}
    program = args["program"]
    try:
        compile(program, SOLUTION_FILE, "exec")
    except SyntaxError as e:
        return {"tests": [], "compile_error": _exc_info(e, int(opts["max_repr"]))}
    setup = args.get("test_setup", "") or ""
    results = [_run_one(program, setup, t, opts) for t in args.get("tests", [])]
    return {"tests": results, "compile_error": None}


def main() -> None:
    args = json.loads(sys.stdin.read())
    res = trace(args)
    sys.stdout.write(json.dumps(res))


if __name__ == "__main__":
    main()
