"""Measure EG-CFG against plain decoding: pass@1 and cost per problem (not a test).

    python -m codedistill.egcfg.measure --model tiny-target --dataset synth --split test \
        --max-problems 50 --out results/egcfg_measure

Plain decoding: one greedy program per problem (and optionally one sampled at
``--plain-temperature``) with the HF backend; EG-CFG: one :meth:`EGCFGSolver.solve` per
problem. Every final program is judged on the problem's full tests in the sandbox. Cost per
problem: model forward passes (EG-CFG: each batched cond+uncond call counts once; also the
token positions processed), generated tokens, sandbox executions and wall time. Writes
``summary.json``, ``rows.jsonl`` (per problem and method) and ``egcfg_log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def _load(model: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codedistill.models.tiny import resolve_model_path

    path = resolve_model_path(model)
    tok = AutoTokenizer.from_pretrained(path)
    m = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return m, tok


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-target")
    ap.add_argument("--dataset", default="synth")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-problems", type=int, default=50)
    ap.add_argument("--out", default="results/egcfg_measure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plain-temperature", type=float, default=None)
    ap.add_argument("--egcfg", default="{}", help="EGCFGConfig fields as JSON")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from codedistill.data import load_problems
    from codedistill.egcfg.agents import EGCFGSolver, append_log
    from codedistill.egcfg.config import EGCFGConfig
    from codedistill.execution import Job, Limits, SandboxPool
    from codedistill.generation.hf import HFGenerator
    from codedistill.prompts import PromptStyle, render_prompt, stops_for, to_program

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = load_problems(args.dataset, args.split, max_problems=args.max_problems)
    model, tok = _load(args.model)
    style = PromptStyle("base")
    gen = HFGenerator(model, tok, name=args.model, batch_size=1)
    econf = EGCFGConfig(**json.loads(args.egcfg))
    rows: list[dict] = []
    with SandboxPool(workers=args.workers, limits=Limits(timeout=5.0),
                     warm_targets=["codedistill.egcfg.tracer:trace"]) as pool:
        solver = EGCFGSolver(model, tok, econf, pool=pool, to_program=lambda p, t: to_program(p, style, t)[1])

        def judge(p, completion):
            prog = to_program(p, style, completion)[1]
            v = pool.run([Job(prog, list(p.tests), p.test_setup)])[0]
            return bool(v.passed)

        plain_methods = [("plain_greedy", 0.0)]
        if args.plain_temperature:
            plain_methods.append((f"plain_t{args.plain_temperature}", args.plain_temperature))
        for i, p in enumerate(problems):
            prompt = render_prompt(p, style, tok)
            stop = list(stops_for(p, style))
            for name, temp in plain_methods:
                f0, g0, t0 = gen.forward_passes, gen.generated_tokens, time.time()
                c = gen.sample([prompt], n=1, temperature=temp, max_new_tokens=econf.max_new_tokens,
                               stop=stop, seed=args.seed + i)[0][0]
                wall = time.time() - t0
                rows.append({"task_id": p.task_id, "method": name, "passed": judge(p, c.text),
                             "forward_passes": gen.forward_passes - f0,
                             "generated_tokens": gen.generated_tokens - g0, "sandbox_executions": 0,
                             "wall_time_s": wall, "completion": c.text})
            t0 = time.time()
            cand, rec = solver.solve(p, prompt, stop, seed=args.seed + i)
            wall = time.time() - t0
            append_log(out / "egcfg_log.jsonl", rec)
            cnt = rec["counters"]
            rows.append({"task_id": p.task_id, "method": "egcfg", "passed": judge(p, cand.text),
                         "visible_passed": rec["visible_passed"], "winner": rec["winner"],
                         "agents_run": rec["agents_run"], "forward_passes": cnt["forward_passes"],
                         "forward_rows_tokens": cnt["forward_rows_tokens"],
                         "generated_tokens": cnt["generated_tokens"],
                         "sandbox_executions": cnt["sandbox_executions"], "wall_time_s": wall,
                         "completion": cand.text})
            done = [r for r in rows if r["method"] == "egcfg"]
            print(f"[{i + 1}/{len(problems)}] {p.task_id}: "
                  + ", ".join(f"{r['method']}={'PASS' if r['passed'] else 'fail'}" for r in rows if r["task_id"] == p.task_id)
                  + f" | egcfg pass@1 so far {sum(r['passed'] for r in done) / len(done):.3f}"
                  + f" | plain {sum(r['passed'] for r in rows if r['method'] == 'plain_greedy') / len(done):.3f}",
                  flush=True)
            with open(out / "rows.jsonl", "a", encoding="utf-8") as f:
                for r in rows:
                    if r["task_id"] == p.task_id:
                        f.write(json.dumps(r) + "\n")
    summary: dict[str, Any] = {"model": args.model, "dataset": args.dataset, "split": args.split,
                               "n_problems": len(problems), "egcfg_config": econf.model_dump(), "methods": {}}
    for m in sorted({r["method"] for r in rows}):
        rs = [r for r in rows if r["method"] == m]
        s: dict[str, Any] = {"pass@1": sum(r["passed"] for r in rs) / len(rs)}
        for k in ("forward_passes", "generated_tokens", "sandbox_executions", "wall_time_s", "forward_rows_tokens"):
            vals = [r[k] for r in rs if k in r]
            if vals:
                s[f"{k}_mean"] = statistics.fmean(vals)
                s[f"{k}_median"] = statistics.median(vals)
        if m == "egcfg":
            s["visible_passed"] = sum(bool(r.get("visible_passed")) for r in rs) / len(rs)
            s["winners"] = {w: sum(r["winner"] == w for r in rs) for w in sorted({r["winner"] for r in rs})}
        summary["methods"][m] = s
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["methods"], indent=2))
    return summary


if __name__ == "__main__":
    main()
