"""One LoRA fine-tuning step, the completion loss over full logits vs the memory-lean loss.

The training step of BTP's fine-tuning phase on its own: LoRA (r 16, alpha 32, on the
attention projections q/k/v/o), torch's AdamW, one batch of ``--batch`` sequences of
``--tokens`` tokens whose last ``--completion`` tokens carry the loss (the rest is prompt).
Variants, each in its own subprocess (a fresh process: its peak RSS is its own):

- ``full``: the model's full logits [batch, tokens, vocabulary] in float32 and
  ``completion_loss`` on them (the loss before codedistill.training.loss);
- ``lean``: ``CompletionLoss`` as the trainer runs it (the LM head on completion positions
  only, chunked, each chunk's gradients computed in the forward pass: fused linear
  cross-entropy);
- ``lean_recompute`` (optional): the same, each chunk recomputed in backward instead (what
  a LoRA-adapted head gets);
- ``last_k`` (optional): the model's own head on the last K positions (FSDP/DeepSpeed path).

For each: seconds per step (forward + backward + optimizer step; ``--steps`` steps, the
first includes the allocator's warm-up), peak RSS during the steps (Linux: VmHWM reset after
loading through /proc/self/clear_refs) and over the whole process, RSS after loading, the
loss (equal across variants: the same initial adapter and batch), and the 1-minute load
average before and after the variant, printed beside every figure.

    python benchmarks/lora_step.py                       # gemma-3-270m (pip install 'codedistill[gemma]')
    python benchmarks/lora_step.py --tiny                # the shipped tiny-target, small batch (seconds)
    python benchmarks/lora_step.py --variants full,lean,lean_recompute,last_k --steps 3 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("full", "lean", "lean_recompute", "last_k")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """VmHWM := VmRSS (Linux >= 4.0); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from codedistill.models.loading import load_causal_lm
    from codedistill.models.registry import local_path, resolve_model
    from codedistill.training.loss import CompletionLoss, completion_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    model = load_causal_lm(str(local_path(resolve_model(args.model))), "cpu", "float32")
    torch.manual_seed(0)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    model.train()
    load_s = time.perf_counter() - t_load
    vocab = model.get_base_model().config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(vocab, 32000), (args.batch, args.tokens), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, -args.completion :] = ids[:, -args.completion :]
    weights = torch.ones(args.batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    mode = "chunked" if args.variant.startswith("lean") else args.variant
    lean = CompletionLoss(model, mode=mode, fused=False if args.variant == "lean_recompute" else None)
    rss_loaded = _status_kb("VmRSS")
    reset = _reset_peak()
    steps, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        if args.variant == "full":
            loss = completion_loss(model(input_ids=ids, attention_mask=mask).logits, labels, weights)
        else:
            loss, _ = lean(model, ids, mask, labels, weights)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    kb = 1024 * 1024
    return {
        "variant": args.variant,
        "loss_mode": "full"
        if args.variant == "full"
        else lean.mode + (" fused" if getattr(lean, "fused", False) else ""),
        "model": args.model,
        "vocab": vocab,
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 1),
        "step_s": [round(s, 2) for s in steps],
        "losses": losses,
        "rss_after_load_gb": round(rss_loaded / kb, 2) if rss_loaded else None,
        "peak_rss_steps_gb": round(_status_kb("VmHWM") / kb, 2) if reset and _status_kb("VmHWM") else None,
        "peak_rss_process_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="alias or directory (default gemma-3-270m; --tiny: tiny-target)")
    ap.add_argument("--batch", type=int, default=None, help="sequences (default 16; --tiny: 4)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default 100; --tiny: 32)")
    ap.add_argument("--completion", type=int, default=None, help="labelled last tokens (default 50; --tiny: 16)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--variants", default="full,lean", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny-target, 4 x 32 tokens: a check that the script runs")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the subprocess's own variant
    args = ap.parse_args()
    small = args.tiny
    args.model = args.model or ("tiny-target" if small else "gemma-3-270m")
    args.batch = args.batch or (4 if small else 16)
    args.tokens = args.tokens or (32 if small else 100)
    args.completion = args.completion or (16 if small else 50)
    if args.variant:
        print(json.dumps(worker(args)))
        return
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        sys.exit(f"unknown variant(s) {', '.join(bad)}; use {', '.join(VARIANTS)}")
    print(
        f"one LoRA step (r 16 on {'/'.join(TARGETS)}, AdamW) on {args.model}: batch {args.batch} x "
        f"{args.tokens} tokens, loss on the last {args.completion}; {args.steps} steps per variant",
        flush=True,
    )
    rows = []
    for v in variants:
        before = os.getloadavg()[0]
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--model", args.model]
        cmd += ["--batch", str(args.batch), "--tokens", str(args.tokens), "--completion", str(args.completion)]
        cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        after = os.getloadavg()[0]
        if proc.returncode != 0:
            sys.exit(f"variant {v} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["load_avg_1m"] = [round(before, 2), round(after, 2)]
        rows.append(row)
        load = f"[load {before:.2f} -> {after:.2f}]"
        print(
            f"{v:7s} ({row['loss_mode']}): step s {', '.join(f'{s:.2f}' for s in row['step_s'])} {load}; "
            f"peak RSS in the steps {row['peak_rss_steps_gb']} GB, whole process {row['peak_rss_process_gb']} GB, "
            f"after loading {row['rss_after_load_gb']} GB {load}; loss {row['losses'][0]:.6f}; "
            f"{row['threads']} threads",
            flush=True,
        )
    ref = rows[0]["losses"][0]
    spread = max(abs(r["losses"][0] - ref) / max(abs(ref), 1e-12) for r in rows)
    print(f"first-step loss: the same in every variant to {spread:.1e} (relative)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "settings": {k: getattr(args, k) for k in ("model", "batch", "tokens", "completion", "steps")},
                    "rows": rows,
                    "loss_spread": spread,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
