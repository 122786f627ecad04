"""The result types every run file shares: an estimate with its confidence interval, and a
paired difference of two runs.

On disk (comparison.json, metrics.json, ablation.json, matrix.json, sweep.json) an estimate
is ``{"value", "ci_low", "ci_high"}`` and a paired difference is ``{"k", "n_problems",
"before", "after", "diff", "ci_low", "ci_high", "p_value_no_improvement"}``. Writers build
them with ``to_dict``, readers parse them with ``from_dict``; nothing else names the keys.
Intervals are 95% percentile bootstrap intervals (codedistill.metrics).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from codedistill.errors import DataError


def _floats(d: Mapping[str, Any], *keys: str) -> list[float]:
    missing = [k for k in keys if k not in d]
    if missing:
        raise DataError(
            f"a result record lacks {', '.join(missing)} (has {', '.join(map(str, d)) or 'nothing'}); "
            "it was not written by codedistill.metrics: rerun the command that made it."
        )
    return [float(d[k]) for k in keys]


@dataclass(frozen=True)
class Estimate:
    """A value with the bounds of its confidence interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Estimate:
        return cls(*_floats(d, "value", "ci_low", "ci_high"))


@dataclass(frozen=True)
class PairedDifference:
    """pass@k after - before over the problems both runs share, with its CI and the one-sided
    bootstrap p-value for "no improvement"."""

    k: int
    n_problems: int
    before: float
    after: float
    diff: Estimate
    p_value_no_improvement: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "n_problems": self.n_problems,
            "before": self.before,
            "after": self.after,
            "diff": self.diff.value,
            "ci_low": self.diff.low,
            "ci_high": self.diff.high,
            "p_value_no_improvement": self.p_value_no_improvement,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PairedDifference:
        k, n, before, after, diff, low, high, p = _floats(
            d, "k", "n_problems", "before", "after", "diff", "ci_low", "ci_high", "p_value_no_improvement"
        )
        return cls(int(k), int(n), before, after, Estimate(diff, low, high), p)
