"""Executable prefixes, trace formatting within a token budget, prompt insertion."""

from __future__ import annotations

import ast

from codedistill.egcfg.signal import build_signal, format_trace, insert_signal, make_executable
from codedistill.egcfg.tracer import split_assert


def test_make_executable_drops_incomplete_lines_and_fills_empty_blocks():
    assert make_executable("def f(x):\n    y = x +") == "def f(x):\n    pass\n"
    assert make_executable("def f(x):\n    y = x + 1\n    if y > 2:\n") == \
        "def f(x):\n    y = x + 1\n    if y > 2:\n        pass\n"
    assert make_executable("def f(x):\n    return (x +\n") == "def f(x):\n    pass\n"
    assert make_executable("x = 1\ny = [1, 2,\n") == "x = 1\n"
    assert make_executable("def f(xs):\n    for x in xs:\n        s = x\n    return s") == \
        "def f(xs):\n    for x in xs:\n        s = x\n    return s\n"
    assert make_executable("%%% garbage") == ""
    for code in ("def f(x):\n    while x:\n", "class A:\n    def m(self):\n        return [1,"):
        out = make_executable(code)
        ast.parse(out)
        assert out.startswith(code.split("\n")[0])


def test_split_assert():
    assert split_assert("assert f(1, [2]) == 3") == ("f(1, [2])", "3")
    assert split_assert("assert is_ok('a')") == ("is_ok('a')", "True")
    assert split_assert("assert math.isclose(f(1), 2.0)") == ("math.isclose(f(1), 2.0)", "True")
    assert split_assert("x = 1") == (None, None)
    assert split_assert("assert f(1) != 3") == (None, None)


TRACE = {"compile_error": None, "tests": [{
    "test": "assert total([1, 2]) == 4", "call": "total([1, 2])", "result": "3", "expected": "4",
    "passed": False, "exception": None, "truncated": True, "events": [
        {"event": "call", "func": "total", "line": 1, "args": {"xs": "[1, 2]"}},
        {"event": "line", "func": "total", "line": 2, "vars": {"s": "0"}},
        {"event": "line", "func": "total", "line": 3, "vars": {"x": "1"}},
        {"event": "line", "func": "total", "line": 4, "vars": {"s": "1"}},
        {"event": "return", "func": "total", "line": 5, "value": "3"},
    ]}]}
PROG = "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n"


def test_format_trace():
    lines = format_trace(PROG, TRACE, new_from_line=3)
    assert lines == [
        "# Candidate:",
        "#       for x in xs:",
        "#           s += x",
        "#       return s",
        "# Test: assert total([1, 2]) == 4",
        "#   call total(xs=[1, 2])",
        "#   line 2: s = 0  -> s=0",
        "#   line 3: for x in xs:  -> x=1",
        "#   line 4: s += x  -> s=1",
        "#   total returned 3",
        "#   ... (trace truncated)",
        "#   Result: total([1, 2]) = 3; expected 4 (failed)",
    ]
    exc = {"compile_error": None, "tests": [{"test": "assert total(None) == 0", "call": "total(None)",
           "exception": {"type": "TypeError", "message": "'NoneType' object is not iterable", "line": 3},
           "events": [{"event": "exception", "func": "total", "line": 3, "type": "TypeError",
                       "message": "'NoneType' object is not iterable"}]}]}
    out = format_trace(PROG, exc, new_from_line=6)
    assert out[-2:] == ["#   line 3: for x in xs:  !! TypeError: 'NoneType' object is not iterable",
                        "#   Result: TypeError at line 3: 'NoneType' object is not iterable"]
    assert format_trace(PROG, {"error": "timed out"}, 1)[-1] == "#   Execution stopped: timed out"


def test_build_signal_respects_token_budget():
    count = lambda s: len(s.split())  # noqa: E731  (a whitespace "tokenizer")
    cands = [(PROG, TRACE, 3)] * 3
    full = build_signal(cands, count, 10_000)
    assert full.count("# Candidate:") == 3 and full.endswith("# End of execution feedback.\n")
    for budget in (40, 60, 90):
        sig = build_signal(cands, count, budget)
        assert count(sig) <= budget
        assert "# ..." in sig and sig.count("# Candidate:") == 3
    assert build_signal(cands, count, 5) == ""  # not even the frame fits
    assert build_signal([], count, 100) == ""


def test_insert_signal_positions():
    sig = "# feedback\n"
    mbpp = "You are an expert...\nassert f(1) == 2\n[BEGIN]\n"
    assert insert_signal(mbpp, sig) == "You are an expert...\nassert f(1) == 2\n# feedback\n[BEGIN]\n"
    he = "def f(x):\n    \"\"\"doc\"\"\"\n"
    assert insert_signal("import os\n" + he, sig, he) == "import os\n# feedback\n" + he
    assert insert_signal("plain prompt", sig, "", None) == "plain prompt\n# feedback\n"
    assert insert_signal(mbpp, "") == mbpp


def test_dropped_candidate_lines_are_shown_as_not_run():
    from codedistill.egcfg.signal import make_executable_ex

    prog, dropped = make_executable_ex("def f(s):\n    return s.upper() + '')\n")
    assert prog == "def f(s):\n    pass\n" and dropped == "    return s.upper() + '')"
    lines = format_trace(prog, {"compile_error": None, "tests": []}, new_from_line=2, dropped=dropped)
    assert lines == ["# Candidate:", "#       pass", "#       return s.upper() + '')  <- not run (does not parse yet)"]
