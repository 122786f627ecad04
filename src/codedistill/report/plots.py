"""Plots of ablations, sweeps, pairing matrices and cross-run tables (matplotlib, Agg).

The BTP run figures live in codedistill.btp.plots (the loop draws them too); these take
the JSON files of SCHEMAS (ablation.json, sweep.json, matrix.json) as plain dicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from codedistill.btp.plots import _plt, _save, ci_bounds


def plot_ablation(variants: Sequence[Mapping[str, Any]], out: Path, metric: str = "pass@1",
                  reference: str | None = None, title: str = "", baseline: float | None = None) -> Path:
    """Horizontal bars, one per finished variant, coloured by group: ``metric`` with its
    95% CI; the reference (full method) hatched and its value drawn as a vertical line."""
    plt = _plt()
    rows = [v for v in variants if (v.get("metrics") or {}).get(metric)]
    fig, ax = plt.subplots(figsize=(8, max(2.4, 0.42 * len(rows) + 1.3)))
    names = [v["name"] for v in rows]
    vals = [v["metrics"][metric]["value"] for v in rows]
    errs = [[], []]
    for v in rows:
        lo, hi = ci_bounds(v["metrics"][metric])
        errs[0].append(v["metrics"][metric]["value"] - lo)
        errs[1].append(hi - v["metrics"][metric]["value"])
    groups = sorted({str(v.get("group", "")) for v in rows})
    n_colors = 10 if len(groups) <= 10 else 20  # tab10 repeated its colours past 10 groups
    cmap = plt.get_cmap(f"tab{n_colors}")
    gcolor = {g: cmap(i % n_colors) for i, g in enumerate(groups)}
    colors = [gcolor[str(v.get("group", ""))] for v in rows]
    ys = list(range(len(rows)))[::-1]
    bars = ax.barh(ys, vals, xerr=errs, color=colors, alpha=0.85, capsize=3, edgecolor="black", linewidth=0.5)
    for b, n in zip(bars, names):
        if n == reference:
            b.set_hatch("//")
            b.set_linewidth(1.2)
    for y, x, hi in zip(ys, vals, errs[1]):
        ax.text(min(x + hi + 0.01, 1.0), y, f"{x:.3f}", va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{n} (reference)" if n == reference else n for n in names], fontsize=8)
    if reference in names:
        ax.axvline(vals[names.index(reference)], color="black", linestyle="--", linewidth=1)
    if baseline is not None:
        ax.axvline(baseline, color="tab:red", linestyle=":", linewidth=1.5, label="target before BTP")
    ax.set_xlim(0, 1.08)
    ax.set_xlabel(f"{metric} on held-out problems (95% bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if len(groups) > 1 or baseline is not None:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles = [Patch(color=gcolor[g], label=g or "-") for g in groups]
        if baseline is not None:
            handles.append(Line2D([0], [0], color="tab:red", linestyle=":", label=f"target before BTP ({baseline:.3f})"))
        ax.legend(handles=handles, fontsize=7, title="group", title_fontsize=7,
                  loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title or f"ablation: {metric} per variant", fontsize=10)
    return _save(plt, fig, out)


def plot_sweep_history(trials: Sequence[Mapping[str, Any]], out: Path, direction: str = "maximize",
                       objective: str = "objective") -> Path:
    """Objective value per finished trial, pruned trials at their last intermediate value,
    and the best value so far."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    done = sorted((t for t in trials if t.get("state") == "COMPLETE" and t.get("value") is not None),
                  key=lambda t: t["number"])
    pruned = [t for t in trials if t.get("state") == "PRUNED"]
    if done:
        ax.plot([t["number"] for t in done], [t["value"] for t in done], "o", color="tab:blue",
                label="complete trial")
        best, xs, ys = None, [], []
        for t in done:
            v = t["value"]
            best = v if best is None else (max(best, v) if direction == "maximize" else min(best, v))
            xs.append(t["number"])
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    px, py = [], []
    for t in pruned:
        inter = t.get("intermediate") or {}
        if t.get("value") is not None:
            px.append(t["number"])
            py.append(t["value"])
        elif inter:
            last = max(inter, key=lambda s: int(s))
            px.append(t["number"])
            py.append(inter[last])
    if px:
        ax.plot(px, py, "x", color="tab:gray", markersize=8, label="pruned (last reported value)")
    numbers = [t["number"] for t in trials]
    if numbers:
        ax.set_xticks(sorted(set(numbers)))
    shown = [t["value"] for t in done] + py
    if "pass@" in objective and shown:  # a share of problems: keep the axis in [0, 1]
        ax.set_ylim(-0.02, min(1.02, max(shown) * 1.15 + 0.05))
    ax.set_xlabel("trial number")
    ax.set_ylabel(objective)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("optimisation history", fontsize=10)
    return _save(plt, fig, out)


def plot_importance(importances: Mapping[str, float], out: Path) -> Path:
    """Hyperparameter importances (Optuna's fANOVA or mean-decrease), largest on top."""
    plt = _plt()
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, max(2.2, 0.38 * len(items) + 1.2)))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue", edgecolor="black", linewidth=0.5)
    top = max([v for _, v in items] + [0.0])
    for y, (_, v) in enumerate(items):
        ax.text(v + 0.015 * top, y, f"{v:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.15 + 1e-9)
    ax.set_xlabel("importance for the objective (share, sums to 1)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title("hyperparameter importance", fontsize=10)
    return _save(plt, fig, out)


def plot_before_after(rows: Sequence[tuple[str, Mapping[str, Any], Mapping[str, Any]]], out: Path,
                      metric: str = "pass@1", title: str = "") -> Path:
    """Per run (label, before metrics, after metrics): before and after bars with CIs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 3.8))
    w = 0.38
    for j, (name, color) in enumerate((("before", "tab:gray"), ("after", "tab:blue"))):
        xs, ys, lo, hi = [], [], [], []
        for i, r in enumerate(rows):
            m = r[1 + j]
            if not m or metric not in m:
                continue
            v = m[metric]
            a, b = ci_bounds(v)
            xs.append(i + (j - 0.5) * w)
            ys.append(v["value"])
            lo.append(v["value"] - a)
            hi.append(b - v["value"])
        bars = ax.bar(xs, ys, width=w, yerr=[lo, hi], capsize=3, color=color, label=name,
                      edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=2)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r[0] for r in rows], fontsize=8, rotation=15 if len(rows) > 3 else 0, ha="right" if len(rows) > 3 else "center")
    ax.set_ylim(0, 1.12)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel(f"{metric} (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.set_title(title or f"{metric} before and after", fontsize=10)
    return _save(plt, fig, out)
