"""Per-iteration statistics of a BTP run (what goes into ``iter_K/stats.json``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from codedistill.btp.replay import ReplayEntry
from codedistill.btp.samplers import Draw, effective_sample_size

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def distribution(values: Sequence[float], bins: int = 20, lo: float = 0.0, hi: float = 1.0) -> dict[str, Any]:
    """Histogram over [lo, hi] plus mean, std and quantiles."""
    v = np.asarray(values, dtype=float)
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    out: dict[str, Any] = {
        "n": int(v.size),
        "histogram": {"counts": counts.tolist(), "edges": [round(float(e), 6) for e in edges]},
    }
    if v.size:
        out.update(
            mean=float(v.mean()),
            std=float(v.std()),
            quantiles={f"q{int(q * 100):02d}": float(np.quantile(v, q)) for q in QUANTILES},
        )
    else:
        out.update(mean=None, std=None, quantiles={})
    return out


def buffer_stats(entries: Sequence[ReplayEntry], p2_alpha: float, iteration: int) -> dict[str, Any]:
    values = [e.value(p2_alpha) for e in entries]
    new = [e for e in entries if e.iteration == iteration]
    return {
        "size": len(entries),
        "new_this_iteration": len(new),
        "problems": len({e.task_id for e in entries}),
        "problems_with_a_passing_program": len({e.task_id for e in entries if e.passed}),
        "by_source": dict(Counter(e.source for e in entries)),
        "share_fully_passing": float(np.mean([e.passed for e in entries])) if entries else 0.0,
        "share_zero_pass": float(np.mean([e.pass_rate == 0 for e in entries])) if entries else 0.0,
        "p2value": distribution(values),
        "pass_rate": distribution([e.pass_rate for e in entries], bins=10),
        "seq_prob": distribution([e.p for e in entries]),
    }


def sampling_stats(
    entries: Sequence[ReplayEntry], d: Draw, method: str, alpha: float, is_beta: float | None, p2_alpha: float
) -> dict[str, Any]:
    drawn = [entries[i] for i in d.indices]
    n = len(drawn)
    per_problem = Counter(e.task_id for e in drawn)
    per_entry = Counter(d.indices)
    probs = np.asarray(d.probs, dtype=float)
    return {
        "method": method,
        "alpha": alpha,
        "is_beta": is_beta,
        "draws": n,
        "unique_programs_drawn": len(per_entry),
        "unique_problems_drawn": len(per_problem),
        "draws_per_problem": {
            "mean": float(np.mean(list(per_problem.values()))) if per_problem else 0.0,
            "min": min(per_problem.values()) if per_problem else 0,
            "max": max(per_problem.values()) if per_problem else 0,
            "counts": dict(per_problem),
        },
        "share_fully_passing_drawn": float(np.mean([e.passed for e in drawn])) if n else 0.0,
        "share_zero_pass_drawn": float(np.mean([e.pass_rate == 0 for e in drawn])) if n else 0.0,
        "mean_pass_rate_drawn": float(np.mean([e.pass_rate for e in drawn])) if n else 0.0,
        # ESS of the draws (Kish, over draw counts per program) and of the distribution
        "effective_sample_size": effective_sample_size(list(per_entry.values())),
        "distribution_ess": float(1.0 / np.sum(probs**2)) if probs.size and probs.sum() > 0 else 0.0,
        "is_weights": distribution(d.is_weights, bins=10) if d.is_weights else None,
        # P2Value of every draw (same bins as the buffer's): what the sampler picked
        "p2value_drawn": distribution([e.value(p2_alpha) for e in drawn]),
    }
