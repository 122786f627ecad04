"""pass@k (Chen et al. 2021, unbiased estimator) with bootstrap confidence intervals.

All functions are pure: they take per-problem counts (n samples, c correct) and return
numbers. The bootstrap resamples *problems* (the unit the benchmark samples from);
the paired bootstrap resamples the same problems for two runs, so the difference's
interval accounts for problem difficulty shared by both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from codedistill.results import Estimate, PairedDifference

DEFAULT_KS = (1, 5, 10)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples passes) from n samples, c passing.

    1 - C(n-c, k) / C(n, k), computed as a stable product.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or k > n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def per_problem_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> np.ndarray:
    return np.array([pass_at_k(n, c, k) for n, c in counts], dtype=float)


def counts_from_results(rows: Iterable[Mapping[str, Any]], key: str = "passed") -> OrderedDict[str, tuple[int, int]]:
    """(n, c) per task_id from result rows with ``task_id`` and ``key`` (``passed``; for
    HumanEval+ / MBPP+ rows also ``base_passed``), in first-seen order."""
    n: OrderedDict[str, list[int]] = OrderedDict()
    for r in rows:
        nc = n.setdefault(str(r["task_id"]), [0, 0])
        nc[0] += 1
        nc[1] += bool(r[key])
    return OrderedDict((t, (a, b)) for t, (a, b) in n.items())


def bootstrap_mean(values: np.ndarray, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Mean with a percentile bootstrap CI, resampling the entries of ``values``."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("no problems to average over")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    means = values[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return Estimate(float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def warm_up() -> None:
    """Run the bootstrap once on a tiny input. numpy imports ``numpy.random`` and sets up
    ``quantile`` on their first use (some 30 ms): a caller that will need the intervals can
    take that off its critical path (``codedistill evaluate`` does it while the programs
    run). Each bootstrap makes its own generator from its seed: its numbers do not change."""
    bootstrap_mean(np.array([0.0, 1.0]), n_boot=2, seed=0)


def ks_for(n_min: int, ks: Sequence[int] = DEFAULT_KS) -> list[int]:
    return [k for k in ks if k <= n_min]


def pass_at_k_report(
    counts: Mapping[str, tuple[int, int]],
    ks: Sequence[int] = DEFAULT_KS,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """``{"pass@1": Estimate.to_dict(), ..., "n_problems", "num_samples"}``.

    k runs over ``ks`` where k <= the smallest n of any problem.
    """
    if not counts:
        raise ValueError("no results")
    ns = [n for n, _ in counts.values()]
    out: dict[str, Any] = {}
    for k in ks_for(min(ns), ks):
        est = bootstrap_mean(per_problem_pass_at_k(list(counts.values()), k), n_boot, seed=seed)
        out[f"pass@{k}"] = est.to_dict()
    out["n_problems"] = len(counts)
    out["num_samples"] = min(ns) if min(ns) == max(ns) else {"min": min(ns), "max": max(ns)}
    return out


def has_base(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Rows judged as EvalPlus judges (HumanEval+ / MBPP+): each carries ``base_passed``."""
    return bool(rows) and all("base_passed" in r for r in rows)


def results_report(
    rows: Sequence[Mapping[str, Any]], ks: Sequence[int] = DEFAULT_KS, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """:func:`pass_at_k_report` of result rows (``passed``). Rows of HumanEval+ / MBPP+
    (:func:`has_base`) add, side by side, ``"base"`` (the original tests' inputs only) and
    ``"plus"`` (base and plus inputs: the same numbers as the top-level pass@k, since
    ``passed`` is ``plus_passed``), each ``{"pass@k": estimate}``, as EvalPlus reports them."""
    out = pass_at_k_report(counts_from_results(rows), ks, n_boot, seed)
    if has_base(rows):
        base = pass_at_k_report(counts_from_results(rows, "base_passed"), ks, n_boot, seed)
        out["base"] = {k: v for k, v in base.items() if k.startswith("pass@")}
        out["plus"] = {k: v for k, v in out.items() if k.startswith("pass@")}
    return out


def paired_bootstrap(
    before: Mapping[str, tuple[int, int]],
    after: Mapping[str, tuple[int, int]],
    k: int = 1,
    n_boot: int = 5000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Difference after - before of pass@k over the problems both runs share.

    Resamples problems once per replicate for both runs. Returns the difference, its CI,
    and a one-sided bootstrap p-value for "no improvement" (share of replicates <= 0).
    """
    common = [t for t in before if t in after]
    if not common:
        raise ValueError("the two runs share no problem")
    b = per_problem_pass_at_k([before[t] for t in common], k)
    a = per_problem_pass_at_k([after[t] for t in common], k)
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    diff = Estimate(float(d.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))
    return PairedDifference(
        k=k,
        n_problems=len(common),
        before=float(b.mean()),
        after=float(a.mean()),
        diff=diff,
        p_value_no_improvement=float((means <= 0).mean()),
    )
