"""Measure EG-CFG against plain greedy decoding: pass@1, paired CIs and cost per problem.

    python -m codedistill.egcfg.measure --model tiny-target --dataset synth --split test \
        --max-problems 200 --templates compact,paper --out results/egcfg_measure

Plain decoding: one greedy program per problem with the HF backend. EG-CFG: one
:meth:`EGCFGSolver.solve` per problem and trace template. Every final program, and the FIRST
agent's own program, is judged on the problem's full tests in the sandbox. On MBPP/synth the
visible tests are the judging tests, so EG-CFG's returned program is an "any of N agents
passes" number; the first agent's pass@1 is the single-program one (both are reported).

Cost per problem: model forward passes (a batched cond+uncond call counts once; also the token
positions processed), generated tokens, sandbox executions and wall time. Paired bootstrap
CIs (:func:`codedistill.metrics.paired_bootstrap`) for each EG-CFG variant against greedy and
paper against compact. Writes ``rows.jsonl`` (appended per problem: a restart resumes),
``egcfg_log_<template>.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

COST_KEYS = ("forward_passes", "forward_rows_tokens", "generated_tokens", "sandbox_executions", "wall_time_s")


def load_model(model: str):
    """(model, tokenizer) in float32 for EG-CFG's HF decoder: a tiny model, a registry alias
    (gemma-3-270m), a saved directory or a GGUF; the pad token falls back to eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codedistill.models.loading import hide_loading_bars
    from codedistill.models.registry import local_path, resolve_model

    hide_loading_bars()
    path = local_path(resolve_model(model))  # a tiny model, a registry alias (gemma-3-270m), a directory or GGUF
    tok = AutoTokenizer.from_pretrained(path)
    m = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return m, tok


def summarize(rows: list[dict], methods: list[str]) -> dict[str, Any]:
    """pass@1 per method, cost means/medians, paired bootstrap CIs against plain greedy."""
    from codedistill.metrics import paired_bootstrap

    out: dict[str, Any] = {"methods": {}, "paired": {}}
    by = {m: {r["task_id"]: r for r in rows if r["method"] == m} for m in methods}
    for m in methods:
        rs = list(by[m].values())
        if not rs:
            continue
        s: dict[str, Any] = {"n": len(rs), "pass@1": sum(r["passed"] for r in rs) / len(rs)}
        if m != "plain_greedy":
            s["first_agent_pass@1"] = sum(r["first_agent_passed"] for r in rs) / len(rs)
            s["any_agent_visible_pass"] = sum(bool(r["visible_passed"]) for r in rs) / len(rs)
            s["agents_run_mean"] = statistics.fmean(r["agents_run"] for r in rs)
            s["unguided"] = sum(not r.get("guided", True) for r in rs)
            s["agreement_stops"] = sum(r.get("agreement_stops", 0) for r in rs)
            per: dict[str, list[bool]] = {}
            for r in rs:
                for a, ok in r.get("per_agent_passed", {}).items():
                    per.setdefault(a, []).append(bool(ok))
            s["per_agent"] = {a: {"ran_on": len(v), "pass@1_where_ran": sum(v) / len(v)} for a, v in per.items()}
        for k in COST_KEYS:
            vals = [r[k] for r in rs if k in r]
            if vals:
                s[f"{k}_mean"] = statistics.fmean(vals)
                s[f"{k}_median"] = statistics.median(vals)
        out["methods"][m] = s

    def counts(m: str, key: str = "passed") -> dict[str, tuple[int, int]]:
        return {t: (1, int(bool(r[key]))) for t, r in by[m].items()}

    base = counts("plain_greedy") if by.get("plain_greedy") else {}
    for m in methods:
        if m == "plain_greedy" or not by[m] or not base:
            continue
        out["paired"][f"{m} - plain_greedy"] = paired_bootstrap(base, counts(m)).to_dict()
        first = counts(m, "first_agent_passed")
        out["paired"][f"{m}[first agent] - plain_greedy"] = paired_bootstrap(base, first).to_dict()
    eg = [m for m in methods if m.startswith("egcfg_") and by[m]]
    if "egcfg_compact" in eg and "egcfg_paper" in eg:
        paper_vs_compact = paired_bootstrap(counts("egcfg_compact"), counts("egcfg_paper"))
        out["paired"]["egcfg_paper - egcfg_compact"] = paper_vs_compact.to_dict()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-target")
    ap.add_argument("--dataset", default="synth")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-problems", type=int, default=50)
    ap.add_argument("--shots", type=int, default=0, help="MBPP few-shot examples in the prompt (3: the literature's)")
    ap.add_argument("--out", default="results/egcfg_measure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--templates", default="compact,paper", help="trace templates to run, comma-separated")
    ap.add_argument("--egcfg", default="{}", help="EGCFGConfig fields as JSON (for every template)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared, loaded box)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, args.threads))

    from codedistill.data import load_problems
    from codedistill.egcfg.agents import EGCFGSolver, append_log
    from codedistill.egcfg.config import EGCFGConfig
    from codedistill.evaluation import execute, warm_targets
    from codedistill.execution import Limits, SandboxPool
    from codedistill.generation.hf import HFGenerator
    from codedistill.prompts import PromptStyle, render_prompt, stops_for, to_program

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = load_problems(args.dataset, args.split, max_problems=args.max_problems, shots=args.shots)
    model, tok = load_model(args.model)
    style = PromptStyle("base")
    gen = HFGenerator(model, tok, name=args.model, batch_size=1)
    templates = [t.strip() for t in args.templates.split(",") if t.strip()]
    confs = {t: EGCFGConfig(**{**json.loads(args.egcfg), "trace_template": t}) for t in templates}
    methods = ["plain_greedy"] + [f"egcfg_{t}" for t in templates]
    rows_path = out / "rows.jsonl"
    rows: list[dict] = (
        [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()] if rows_path.exists() else []
    )
    done = {t for t in {r["task_id"] for r in rows} if {r["method"] for r in rows if r["task_id"] == t} >= set(methods)}
    rows = [r for r in rows if r["task_id"] in done]
    (out / "config.json").write_text(
        json.dumps({"args": vars(args), "egcfg": {t: c.model_dump() for t, c in confs.items()}}, indent=2)
    )
    with SandboxPool(
        workers=args.workers,
        limits=Limits(timeout=5.0),
        warm_targets=["codedistill.egcfg.tracer:trace", *warm_targets(problems)],
    ) as pool:
        solvers = {
            t: EGCFGSolver(model, tok, c, pool=pool, to_program=lambda p, x: to_program(p, style, x)[1])
            for t, c in confs.items()
        }

        def judge(p, completion):
            prog = to_program(p, style, completion)[1]
            return bool(execute([(prog, p)], pool=pool)[0]["passed"])

        for i, p in enumerate(problems):
            if p.task_id in done:
                continue
            prompt = render_prompt(p, style, tok)
            stop = list(stops_for(p, style))
            new: list[dict] = []
            f0, g0, t0 = gen.forward_passes, gen.generated_tokens, time.time()
            c = gen.sample(
                [prompt],
                n=1,
                temperature=0.0,
                max_new_tokens=confs[templates[0]].max_new_tokens,
                stop=stop,
                seed=args.seed + i,
            )[0][0]
            new.append(
                {
                    "task_id": p.task_id,
                    "method": "plain_greedy",
                    "passed": judge(p, c.text),
                    "forward_passes": gen.forward_passes - f0,
                    "generated_tokens": gen.generated_tokens - g0,
                    "sandbox_executions": 0,
                    "wall_time_s": time.time() - t0,
                    "completion": c.text,
                }
            )
            for t, solver in solvers.items():
                t0 = time.time()
                cand, rec = solver.solve(p, prompt, stop, seed=args.seed + i)
                wall = time.time() - t0
                append_log(out / f"egcfg_log_{t}.jsonl", rec)
                cnt = rec["counters"]
                first = rec["agents"][0]["completion"]
                per_agent = {a["agent"]: judge(p, a["completion"]) for a in rec["agents"]}
                new.append(
                    {
                        "per_agent_passed": per_agent,
                        "task_id": p.task_id,
                        "method": f"egcfg_{t}",
                        "passed": judge(p, cand.text),
                        "first_agent_passed": judge(p, first),
                        "visible_passed": rec["visible_passed"],
                        "guided": bool(p.visible_tests),
                        "winner": rec["winner"],
                        "agents_run": rec["agents_run"],
                        "agreement_stops": sum(
                            bool(a["lines"] and a["lines"][-1].get("agreement_stop")) for a in rec["agents"]
                        ),
                        **{k: cnt[k] for k in COST_KEYS if k != "wall_time_s"},
                        "wall_time_s": wall,
                        "completion": cand.text,
                    }
                )
            rows += new
            with open(rows_path, "a", encoding="utf-8") as f:
                for r in new:
                    f.write(json.dumps(r) + "\n")
            k = len({r["task_id"] for r in rows})
            print(
                f"[{i + 1}/{len(problems)}] {p.task_id}: "
                + ", ".join(f"{r['method']}={'PASS' if r['passed'] else 'fail'}" for r in new)
                + " | so far "
                + ", ".join(f"{m} {sum(r['passed'] for r in rows if r['method'] == m) / k:.3f}" for m in methods),
                flush=True,
            )
        for s in solvers.values():
            s.close()
    summary = {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "n_problems": len(problems),
        "templates": templates,
        **summarize(rows, methods),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("methods", "paired")}, indent=2))
    return summary


if __name__ == "__main__":
    main()
