"""Prioritised replay: which buffer entries the target is fine-tuned on.

Methods (``values`` are P2Values, ``alpha`` the ``--sampling-alpha``):

* ``power``   - P(i) ∝ v_i ** alpha (alpha = 0: uniform; alpha -> inf: greedy);
* ``rank``    - P(i) ∝ 1 / rank_i ** alpha, rank 1 = highest value (ties broken by
                buffer order, so the ranking is deterministic);
* ``greedy``  - the ``n`` highest-valued entries, without replacement (repeats the
                ranking cyclically if ``n`` exceeds the buffer);
* ``uniform`` - P(i) = 1 / N.

Stochastic methods draw ``n`` indices *with* replacement (as prioritized experience
replay does), from a ``numpy.random.Generator`` the caller seeds.
Importance-sampling weights (Schaul et al. 2016): w_i = (N * P(i)) ** -beta, divided by
their maximum so they only scale the loss down.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SAMPLING_METHODS = ("power", "rank", "greedy", "uniform")
MAX_SAMPLING_ALPHA = 20.0


def check_sampling(method: str, alpha: float) -> None:
    if method not in SAMPLING_METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(SAMPLING_METHODS)}")
    if not (0.0 <= alpha <= MAX_SAMPLING_ALPHA):
        raise ValueError(f"sampling alpha must lie in [0, {MAX_SAMPLING_ALPHA:g}], got {alpha}")


def ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks, highest value first, ties in index order."""
    v = np.asarray(values, dtype=float)
    order = np.lexsort((np.arange(len(v)), -v))  # primary: -v, secondary: index
    r = np.empty(len(v), dtype=float)
    r[order] = np.arange(1, len(v) + 1)
    return r


def sampling_probs(values: Sequence[float], method: str, alpha: float = 1.0) -> np.ndarray:
    """The distribution a stochastic method draws from (greedy: uniform over the top)."""
    check_sampling(method, alpha)
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        return v
    if np.any(v < 0) or np.any(~np.isfinite(v)):
        raise ValueError("P2Values must be finite and non-negative")
    if method == "uniform":
        return np.full(n, 1.0 / n)
    if method == "power":
        w = np.power(v, alpha) if alpha > 0 else np.ones(n)
        if w.sum() <= 0:
            return np.full(n, 1.0 / n)
        return w / w.sum()
    if method == "rank":
        w = 1.0 / np.power(ranks(v), alpha)
        return w / w.sum()
    # greedy: the point mass over the deterministic top list has no single "probability";
    # report a uniform distribution over the top-n entries elsewhere.
    r = ranks(v)
    return (r == 1).astype(float)


@dataclass
class Draw:
    indices: list[int]  # buffer indices, in draw order (with repeats)
    probs: np.ndarray  # the sampling distribution over the whole buffer
    is_weights: list[float]  # per drawn index, 1.0 without IS


def draw(
    values: Sequence[float],
    n: int,
    method: str,
    alpha: float,
    rng: np.random.Generator,
    is_beta: float | None = None,
) -> Draw:
    """Draw ``n`` buffer indices by priority (see module doc)."""
    check_sampling(method, alpha)
    N = len(values)
    if N == 0 or n <= 0:
        return Draw([], np.zeros(N), [])
    if method == "greedy":
        order = np.argsort(ranks(values), kind="stable")
        idx = [int(order[i % N]) for i in range(n)]
        counts = Counter(idx)
        probs = np.array([counts.get(i, 0) / n for i in range(N)])
    else:
        probs = sampling_probs(values, method, alpha)
        idx = [int(i) for i in rng.choice(N, size=n, replace=True, p=probs)]
    weights = [1.0] * len(idx)
    if is_beta is not None and is_beta > 0 and method != "greedy":
        w_all = np.power(N * probs, -is_beta, where=probs > 0, out=np.zeros(N))
        wmax = max(w_all[i] for i in set(idx))
        weights = [float(w_all[i] / wmax) for i in idx]
    return Draw(idx, probs, weights)


def effective_sample_size(weights: Sequence[float]) -> float:
    """Kish ESS: (sum w)^2 / sum w^2 (for draw counts: how many distinct examples the
    draws are worth)."""
    w = np.asarray(weights, dtype=float)
    s2 = float(np.sum(w * w))
    return float(np.sum(w) ** 2 / s2) if s2 > 0 else 0.0
