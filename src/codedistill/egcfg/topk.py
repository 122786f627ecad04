"""CFG from top-k log-probs (served models): the guided next token without full logits.

A server (vLLM, DeepSeek's API: ``top_logprobs <= 20``) returns, per request, the ``k`` most
likely next tokens with their log-probs. EG-CFG needs two distributions per step, the
conditional one (prompt with the execution signal) and the unconditional one, so one step
costs two requests. :func:`topk_cfg` applies the CFG formula of :mod:`.cfg`,

    log p_guided(t) ∝ log p_u(t) + gamma * (log p_c(t) - log p_u(t)),

over the UNION of the two top-k sets, as upstream does for DeepSeek-V3. A token in one set but
not in the other has an unknown log-prob on the other side; ``missing`` says what stands in:

* ``"kth"`` (default): the smallest log-prob of that side's top-k, an upper bound of the
  unknown value (the token ranked below all k returned ones);
* ``"zero"``: probability 0 (upstream: it scatters the top-k into a zero vector and guides
  with ``p_u * ((p_c + eps) / (p_u + eps)) ** gamma``), which gives no mass to tokens the
  unconditional side did not return and almost none to those the conditional side did not.

The approximation is exact for the tokens in both sets; it can differ from exact CFG when
the exact argmax lies outside the union or when a stand-in value reorders the union.
``benchmarks``/``measure_topk`` below measures how often on a real model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

Missing = Literal["kth", "zero"]
Token = TypeVar("Token", int, str)  # a token id, or a token's text (served top-k)
EPS = 1e-8


def topk_cfg(
    cond: Mapping[Token, float], uncond: Mapping[Token, float], gamma: float, missing: Missing = "kth", eps: float = EPS
) -> dict[Token, float]:
    """Guided log-probs (normalised over the union of the two top-k sets) from the
    conditional and unconditional top-k ``{token id: log-prob}``. ``gamma = 0``: the
    unconditional top-k as is (renormalised); ``gamma = 1``: the conditional one."""
    if not uncond:
        raise ValueError("the unconditional top-k is empty")
    items: dict[Token, float]
    if gamma == 0 or not cond:
        items = dict(uncond)
    elif gamma == 1:
        items = dict(cond)
    else:
        union: list[Token] = list(uncond) + [t for t in cond if t not in uncond]
        items = {}
        if missing == "kth":
            fill_c, fill_u = min(cond.values()), min(uncond.values())
            for t in union:
                lu, lc = uncond.get(t, fill_u), cond.get(t, fill_c)
                items[t] = lu + gamma * (lc - lu)
        else:  # upstream: p_u * ((p_c + eps) / (p_u + eps)) ** gamma with p = 0 off the top-k
            for t in union:
                if t not in uncond:
                    continue  # p_u = 0: no guided mass
                pu, pc = math.exp(uncond[t]), math.exp(cond[t]) if t in cond else 0.0
                items[t] = uncond[t] + gamma * (math.log(pc + eps) - math.log(pu + eps))
    m = max(items.values())
    z = m + math.log(sum(math.exp(v - m) for v in items.values()))
    return {t: v - z for t, v in items.items()}


def guided_token(
    cond: Mapping[Token, float], uncond: Mapping[Token, float], gamma: float, missing: Missing = "kth"
) -> Token:
    """The greedy guided token: argmax of :func:`topk_cfg` (ties: the lower token id)."""
    lp = topk_cfg(cond, uncond, gamma, missing)
    return min(lp, key=lambda t: (-lp[t], t))


def _topk(logprobs, k: int) -> dict[int, float]:
    v, i = logprobs.topk(k)
    return {int(t): float(x) for t, x in zip(i.tolist(), v.tolist())}


def agreement_on_steps(steps, gammas=(0.5, 1.0, 3.0), ks=(5, 20), missing: Missing = "kth") -> dict:
    """For (cond log-probs, uncond log-probs) full-vocabulary pairs (one per decoding step):
    how often :func:`guided_token` over the top-k union equals exact CFG's argmax."""
    from codedistill.egcfg.cfg import guided_logprobs

    out: dict = {}
    for g in gammas:
        for k in ks:
            same = 0
            for lc, lu in steps:
                exact = int(guided_logprobs(lc, lu, g)[0].argmax())
                same += guided_token(_topk(lc.log_softmax(-1), k), _topk(lu.log_softmax(-1), k), g, missing) == exact
            out[f"gamma={g},k={k}"] = {"steps": len(steps), "agree": same / len(steps) if steps else None}
    return out


def main(argv: list[str] | None = None) -> dict:
    """Exact CFG vs top-k CFG on the guided lines an EG-CFG run logged (its signals).

    python -m codedistill.egcfg.topk --log results/egcfg_measure_synth/egcfg_log_compact.jsonl \\
        --model tiny-target --max-lines 150
    """
    import argparse
    import json

    import torch

    from codedistill.data import load_problems
    from codedistill.egcfg.signal import prompt_builder

    ap = argparse.ArgumentParser()
    ap.add_argument("--log", required=True)
    ap.add_argument("--model", default="tiny-target")
    ap.add_argument("--dataset", default="synth")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-lines", type=int, default=150)
    ap.add_argument("--missing", default="kth", choices=["kth", "zero"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from codedistill.egcfg.measure import load_model

    model, tok = load_model(args.model)
    problems = {p.task_id: p for p in load_problems(args.dataset, args.split)}
    steps: list[tuple[Any, Any]] = []  # (conditional, unconditional) logits per token
    with open(args.log, encoding="utf-8") as f:
        recs = [json.loads(x) for x in f if x.strip()]
    for rec in recs:
        p = problems.get(rec["task_id"])
        if p is None:
            continue
        build = prompt_builder(p, "base")
        for a in rec["agents"]:
            done = ""
            for line in a["lines"]:
                sig, text = line.get("signal"), line.get("text", "")
                if sig and text and len(steps) < 100_000 and args.max_lines > 0:
                    args.max_lines -= 1
                    prefix = tok.encode(done, add_special_tokens=False) if done else []
                    new = tok.encode(done + text, add_special_tokens=False)[len(prefix) :]
                    u = tok.encode(build("", a["spec"]["prompt"])) + prefix
                    c = tok.encode(build(sig, a["spec"]["prompt"])) + prefix
                    with torch.no_grad():  # teacher-forced: every position of the line in one pass each
                        lu = model(torch.tensor([u + new])).logits[0, len(u) - 1 : -1].float()
                        lc = model(torch.tensor([c + new])).logits[0, len(c) - 1 : -1].float()
                    steps += list(zip(lc, lu))
                done += text
    res = {
        "log": args.log,
        "model": args.model,
        "missing": args.missing,
        "steps": len(steps),
        "agreement": agreement_on_steps(steps, missing=args.missing),
    }
    print(json.dumps(res, indent=2))
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
