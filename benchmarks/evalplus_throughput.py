"""codedistill's EvalPlus judge vs ``evalplus.evaluate`` (0.3.1) on the same samples, in one run.

Samples: for each of the first ``--tasks`` tasks of the dataset, the canonical solution,
one that prints, a mutant failing only plus inputs, a wrong program and one that loops
forever (as in tests/test_evalplus_parity.py). Both judges first run once cold (evalplus
computes its ground truth, codedistill its references; each cached), then once warm; the
warm wall times give the ratio. The load average is printed beside each figure: the
ratio moves with it, so compare runs at similar load. Verdicts are compared too.

    python benchmarks/evalplus_throughput.py --dataset humaneval+ --tasks 20 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_evalplus_parity import _evalplus_verdicts, samples_for

from codedistill.data import load_problems
from codedistill.evalplus_judge import EvalPlusJudge


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def timed_evalplus(dataset, task_ids, samples, run_dir: Path, warm_from: Path | None = None):
    """evalplus's verdicts and wall time; ``warm_from``: a run whose ground truth it reuses."""
    run_dir.mkdir()
    if warm_from is not None:
        shutil.copytree(warm_from / "xdg", run_dir / "xdg")
    t = time.perf_counter()
    verdicts = _evalplus_verdicts(dataset, task_ids, samples, run_dir)
    return verdicts, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=("humaneval+", "mbpp+"), default="humaneval+")
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    problems = load_problems(args.dataset, "all")[: args.tasks]
    samples = [s for p in problems for s in samples_for(p)]
    task_ids = [p.task_id for p in problems]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.environ["CODEDISTILL_CACHE"] = str(workdir / "codedistill-cache")
        print(f"{args.dataset}: {len(task_ids)} tasks, {len(samples)} samples, "
              f"{args.workers} workers each")
        with EvalPlusJudge(problems, workers=args.workers) as judge:
            t = time.perf_counter()
            judge.prepare(task_ids)
            print(f"codedistill references (cold): {time.perf_counter() - t:7.2f} s  load {load()}")
            t = time.perf_counter()
            ours = judge.judge(samples)
            ours_s = time.perf_counter() - t
            print(f"codedistill judge (warm):       {ours_s:7.2f} s  load {load()}")
        _, cold = timed_evalplus(args.dataset, task_ids, samples, workdir / "cold")
        print(f"evalplus.evaluate (cold):       {cold:7.2f} s  load {load()}")
        theirs, warm = timed_evalplus(args.dataset, task_ids, samples, workdir / "warm",
                                      warm_from=workdir / "cold")
        print(f"evalplus.evaluate (warm):       {warm:7.2f} s  load {load()}")
    same = sum((v.base_passed, v.plus_passed) == e for v, e in zip(ours, theirs))
    print(f"ratio (warm): {warm / ours_s:.2f}x  verdicts identical {same}/{len(samples)}")
    print(json.dumps({"dataset": args.dataset, "samples": len(samples), "ours_s": ours_s,
                      "evalplus_s": warm, "ratio": warm / ours_s, "identical": same}))


if __name__ == "__main__":
    main()
