"""Text of result numbers, the same in every table codedistill prints or writes.

``fmt_metric`` prints an estimate (:class:`codedistill.results.Estimate` on disk),
``fmt_diff`` a paired difference; both print "-" for a missing record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from codedistill.results import Estimate, PairedDifference


def fmt_metric(m: Mapping[str, Any] | None) -> str:
    """``0.436 [0.356, 0.522]``: an estimate with its 95% CI."""
    if not m:
        return "-"
    e = Estimate.from_dict(m)
    return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"


def fmt_diff(d: Mapping[str, Any] | None) -> str:
    """``+0.182 [+0.106, +0.260]``: a paired difference after - before with its 95% CI."""
    if not d:
        return "-"
    e = PairedDifference.from_dict(d).diff
    return f"{e.value:+.3f} [{e.low:+.3f}, {e.high:+.3f}]"


def fmt_num(x: Any, digits: int = 3) -> str:
    """A number to ``digits`` decimals (integers and booleans as they are, "-" for None)."""
    if x is None:
        return "-"
    if isinstance(x, (bool, int)):
        return str(x)
    try:
        return f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return str(x)


def fmt_pct(x: Any) -> str:
    """``98.0%`` ("-" for None)."""
    return "-" if x is None else f"{float(x):.1%}"


def fmt_param(v: Any) -> str:
    """A hyperparameter value: floats to 4 significant digits (1e-05, 0.003, 8), the rest as they are."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def pass_ks(report: Mapping[str, Any] | None) -> list[str]:
    """The ``pass@k`` keys of a pass@k report, by k."""
    return sorted((k for k in report or {} if k.startswith("pass@")), key=lambda s: int(s[5:]))


def base_plus_lines(dataset: str, metrics: Mapping[str, Any]) -> list[str]:
    """``mbpp+ pass@1: base 0.700 [...], plus 0.600 [...]`` per k for a HumanEval+ / MBPP+
    report (one with ``base``; nothing for other datasets), and the tasks whose EvalPlus
    tests lost inputs on this machine."""
    if "base" not in metrics:
        return []
    lines = [
        f"{dataset} {k}: base {fmt_metric(metrics['base'].get(k))}, plus {fmt_metric(metrics.get(k))}"
        f" ({metrics.get('n_problems')} tasks)"
        for k in pass_ks(metrics)
    ]
    for task, flags in (metrics.get("evalplus_flagged_tasks") or {}).items():
        lines.append(f"flagged {task}: {'; '.join(flags)}")
    return lines
