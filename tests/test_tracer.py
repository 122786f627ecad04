"""The EG-CFG tracer, run in a child process (never in the test process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROG = """def f(xs):
    s = 0
    for x in xs:
        s += x
    return s * 2

def g(n):
    i = 0
    while i < n:
        i += 1
    return i

def h(d):
    key = "k"
    return d[key]
"""


def run_tracer(args: dict) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "codedistill.egcfg.tracer"],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_trace_of_known_function():
    res = run_tracer({"program": PROG, "tests": ["assert f([1, 2, 3]) == 12", "assert f([4]) == 9"]})
    assert res["compile_error"] is None
    t0, t1 = res["tests"]
    assert (t0["call"], t0["result"], t0["expected"], t0["passed"]) == ("f([1, 2, 3])", "12", "12", True)
    assert (t1["result"], t1["expected"], t1["passed"]) == ("8", "9", False)
    payload = {"call": "args", "line": "vars", "return": "value"}
    ev = [(e["event"], e["line"], e[payload[e["event"]]]) for e in t0["events"]]
    assert ev == [
        ("call", 1, {"xs": "[1, 2, 3]"}),
        ("line", 2, {"s": "0"}),
        ("line", 3, {"x": "1"}),
        ("line", 4, {"s": "1"}),
        ("line", 3, {"x": "2"}),
        ("line", 4, {"s": "3"}),
        ("line", 3, {"x": "3"}),
        ("line", 4, {"s": "6"}),
        ("line", 3, {}),
        ("return", 5, "12"),
    ]
    assert t0["truncated"] is False


def test_exceptions_with_line_numbers():
    prog = PROG + "\nBROKEN = 1 / 0\n"
    res = run_tracer({"program": PROG, "tests": ["assert h({}) == 1", "assert nope(1) == 2"]})
    t0, t1 = res["tests"]
    assert t0["exception"] == {"type": "KeyError", "message": "'k'", "line": 15, "stage": "test"}
    assert [e["event"] for e in t0["events"]] == ["call", "line", "exception"]
    assert t0["events"][-1]["line"] == 15 and t0["events"][1]["vars"] == {"key": "'k'"}
    assert t1["exception"]["type"] == "NameError" and t1["exception"]["line"] is None
    # module-level error: line of the program where it happened
    res = run_tracer({"program": prog, "tests": ["assert f([1]) == 2"]})
    exc = res["tests"][0]["exception"]
    assert (exc["type"], exc["line"], exc["stage"]) == ("ZeroDivisionError", 17, "program")
    # syntax error: no tests run, the line is reported
    res = run_tracer({"program": "def f(:\n    pass\n", "tests": ["assert f() == 1"]})
    assert res["tests"] == [] and res["compile_error"]["type"] == "SyntaxError"
    assert res["compile_error"]["line"] == 1


def test_million_iteration_loop_is_truncated_and_fast():
    res = run_tracer(
        {
            "program": PROG,
            "tests": ["assert g(1000000) == 1000000"],
            "max_events": 50,
            "max_chars": 100000,
            "timeout_s": 20,
        }
    )
    t = res["tests"][0]
    assert t["passed"] is True and t["result"] == "1000000"
    assert t["truncated"] is True
    assert len(t["events"]) == 50
    assert t["n_events_seen"] < 100  # tracing was switched off, not just recording
    assert len(json.dumps(t)) < 20000


def test_char_budget_and_long_values():
    prog = (
        "def big(n):\n    xs = list(range(n))\n    s = 'a' * n\n"
        "    for i in range(50):\n        s = s + str(i)\n    return xs\n"
    )
    res = run_tracer({"program": prog, "tests": ["assert big(100000) == []"], "max_chars": 400, "max_repr": 40})
    t = res["tests"][0]
    assert t["passed"] is False and len(t["result"]) <= 40 and t["result"].startswith("[0, 1, 2")
    assert sum(len(json.dumps(e)) for e in t["events"]) <= 400
    assert t["truncated"] is True


def test_endless_loop_times_out_per_test_and_other_tests_still_run():
    prog = "def spin():\n    while True:\n        pass\n\ndef one():\n    return 1\n"
    res = run_tracer(
        {"program": prog, "tests": ["assert spin() == 1", "assert one() == 1"], "timeout_s": 0.5, "max_events": 20}
    )
    t0, t1 = res["tests"]
    assert t0["exception"]["type"] == "TimeoutError"
    assert t1["passed"] is True


@pytest.mark.parametrize("test", ["assert f([2]) == 4", "f([2])"])
def test_stdout_of_program_does_not_leak(test):
    prog = PROG + "\nprint('hello ' * 3000)\n"
    res = run_tracer({"program": prog, "tests": [test]})
    t = res["tests"][0]
    assert t["passed"] is True and t["stdout"].startswith("hello hello") and len(t["stdout"]) <= 200


# --------------------------------------------------------------------------- in the sandbox
@pytest.fixture(scope="module")
def pool():
    from codedistill.execution import Limits, SandboxPool

    with SandboxPool(workers=2, limits=Limits(timeout=5.0), warm_targets=["codedistill.egcfg.tracer:trace"]) as p:
        yield p


def test_trace_through_sandbox_call(pool):
    from codedistill.execution import Limits

    args = {
        "program": PROG,
        "tests": ["assert f([1, 2, 3]) == 12", "assert h({}) == 1", "assert g(1000000) == 1000000"],
        "max_events": 30,
    }
    verdicts = pool.call_many("codedistill.egcfg.tracer:trace", [args, args], Limits(timeout=10.0))
    for v in verdicts:
        res = v.payload
        assert isinstance(res, dict), v.result
        t0, t1, t2 = res["tests"]
        assert (
            t0["passed"]
            and t0["result"] == "12"
            and t0["events"][-1] == {"event": "return", "func": "f", "line": 5, "value": "12"}
        )
        assert t1["exception"]["type"] == "KeyError" and t1["exception"]["line"] == 15
        assert t2["passed"] and t2["truncated"] and len(t2["events"]) == 30
    assert verdicts[0].payload == verdicts[1].payload


def test_sandboxed_tracer_stops_endless_loop_while_recording(pool):
    """In the sandbox the tracer runs in a worker thread (no SIGALRM); the deadline is then
    checked by the trace function itself, so the other tests still run."""
    from codedistill.execution import Limits

    prog = (
        "import time\ndef spin():\n    i = 0\n    while True:\n        time.sleep(0.001)\n"
        "        i += 1\n\ndef one():\n    return 1\n"
    )
    v = pool.call(
        "codedistill.egcfg.tracer:trace",
        {
            "program": prog,
            "tests": ["assert spin() == 1", "assert one() == 1"],
            "timeout_s": 0.5,
            "max_events": 10**6,
            "max_chars": 500_000,
        },
        Limits(timeout=10.0),
    )
    assert v.payload is not None, v.result
    t0, t1 = v.payload["tests"]
    assert t0["exception"]["type"] == "TimeoutError" and t1["passed"] is True


def test_sandboxed_tracer_cannot_touch_the_host(pool, tmp_path):
    from codedistill.execution import Limits

    target = tmp_path / "owned.txt"
    prog = f"def w():\n    open({str(target)!r}, 'w').write('x')\n    return 1\n"
    v = pool.call(
        "codedistill.egcfg.tracer:trace", {"program": prog, "tests": ["assert w() == 1"]}, Limits(timeout=5.0)
    )
    t = v.payload["tests"][0]
    assert t["passed"] is False and t["exception"]["type"] in ("PermissionError", "OSError", "FileNotFoundError")
    assert not target.exists()


def test_setup_names_are_not_program_state():
    res = run_tracer(
        {
            "program": "LIMIT = 3\ndef f(x):\n    return x + LIMIT\n",
            "tests": ["assert f(1) == 4"],
            "test_setup": "METADATA = {'author': 'x'}\nimport math\n",
        }
    )
    t = res["tests"][0]
    assert t["passed"]
    module_vars = [e["vars"] for e in t["events"] if e["func"] == "<module>"]
    assert {"LIMIT": "3"} in module_vars and not any("METADATA" in v for v in module_vars)
