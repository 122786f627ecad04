"""Generation throughput: the HF backend (in process) vs the vLLM backend (a vLLM server
started by codedistill, reached through the OpenAI-compatible client), in one run.

Same model, same prompts (MBPP test prompts if the local MBPP copy is there, else synth),
same settings (n samples per prompt at temperature T, top-p 1, max_new_tokens, the
benchmark's stop strings), both in float32 on CPU (bf16/auto on a GPU). For each backend:
generated tokens per second (kept tokens, the same count both backends put in
``Candidate.num_tokens``), problems per minute, wall time; then vLLM / HF. The vLLM
server's start-up is timed separately and left out of its rate (it is paid once per phase);
its response cache is off, so every request is really served. ``--reps`` alternates which
backend goes first (the machine may be shared) and reports the median.

    python benchmarks/generation_throughput.py [--model tiny-target] [--problems 40] [--n 10]
        [--max-new-tokens 384] [--temperature 0.8] [--reps 1] [--batch-size 16] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def load_prompts(n: int):
    from codedistill.data import load_problems
    from codedistill.prompts import PromptStyle, render_prompt, stops_for

    try:
        ps, ds = load_problems("mbpp", "test", max_problems=n), "mbpp"
    except Exception:  # no local MBPP: the synthetic benchmark
        ps, ds = load_problems("synth", "test", max_problems=n), "synth"
    st = PromptStyle("base")
    return [render_prompt(p, st) for p in ps], stops_for(ps[0], st), ds


def timed(gen, prompts, stop, args) -> dict:
    t0 = time.perf_counter()
    out = gen.sample(prompts, n=args.n, temperature=args.temperature, top_p=1.0,
                     max_new_tokens=args.max_new_tokens, stop=stop, seed=args.seed)
    dt = time.perf_counter() - t0
    toks = sum(c.num_tokens for cs in out for c in cs)
    return {"seconds": dt, "tokens": toks, "tokens_per_s": toks / dt, "problems_per_min": len(prompts) / dt * 60,
            "mean_tokens_per_sample": toks / (len(prompts) * args.n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-target")
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16, help="HF: sequences per generate call")
    ap.add_argument("--concurrency", type=int, default=32, help="vLLM: requests in flight")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import torch

    from codedistill.generation import make_generator
    from codedistill.models.registry import resolve_model

    spec = resolve_model(args.model)
    prompts, stop, ds = load_prompts(args.problems)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = make_generator(spec, "hf", device=device, dtype=args.dtype, batch_size=args.batch_size)
    vl = make_generator(spec, "vllm", {"cache": False, "concurrency": args.concurrency}, dtype=args.dtype)
    try:
        # warm-up: one prompt each (kernels, allocator, HTTP connections); the vLLM server
        # starts on its first request, so its warm-up is its start-up
        hf.sample(prompts[:1], n=2, temperature=args.temperature, top_p=1.0, max_new_tokens=16, stop=stop, seed=1)
        t0 = time.perf_counter()
        vl.sample(prompts[:1], n=2, temperature=args.temperature, top_p=1.0, max_new_tokens=16, stop=stop, seed=1)
        startup = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {"hf": [], "vllm": []}
        for rep in range(args.reps):
            order = [("hf", hf), ("vllm", vl)] if rep % 2 == 0 else [("vllm", vl), ("hf", hf)]
            for name, gen in order:
                r = timed(gen, prompts, stop, args)
                runs[name].append(r)
                print(f"rep {rep + 1} {name:5s} {r['tokens']:7d} tokens in {r['seconds']:7.1f} s = "
                      f"{r['tokens_per_s']:8.1f} tokens/s, {r['problems_per_min']:7.1f} problems/min", flush=True)
        med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
        load = os.getloadavg()
        info = vl.usage()["server"]
    finally:
        vl.close()
    ratio = med["vllm"]["tokens_per_s"] / med["hf"]["tokens_per_s"]
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print()
    print(f"{args.model} on {len(prompts)} {ds} test prompts x {args.n} samples, T={args.temperature}, "
          f"max_new_tokens {args.max_new_tokens}, {info['dtype']}, {device_name}")
    print("| backend | tokens/s | problems/min | wall s | mean tokens/sample |")
    print("|---|---|---|---|---|")
    for k in ("hf", "vllm"):
        m = med[k]
        print(f"| {k} | {m['tokens_per_s']:.1f} | {m['problems_per_min']:.1f} | {m['seconds']:.1f} | "
              f"{m['mean_tokens_per_sample']:.1f} |")
    print(f"vLLM / HF tokens/s: {ratio:.2f}x   (vLLM {info['vllm_version']} server start-up {startup:.0f} s, "
          f"not included; load average at the end {load[0]:.1f} on {os.cpu_count()} cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "dataset": ds, "device": device_name, "median": med, "ratio": ratio,
                       "vllm_startup_s": startup, "vllm": info, "runs": runs,
                       "loadavg": load}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
