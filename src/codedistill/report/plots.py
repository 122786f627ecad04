"""Figures of every kind of run (matplotlib, Agg backend), drawn from the run's JSON files.

BTP runs (:func:`plot_btp_run`, from comparison.json and iter_K/stats.json): pass@k before
and after with 95% CI error bars, P2Value histograms per iteration, sampling statistics over
iterations, training loss curves. Ablations, sweeps and pairing matrices: per-variant bars,
optimisation history, hyperparameter importance, before/after bars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from codedistill.results import Estimate


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Path) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _hist_bars(ax, hist: Mapping[str, Any], **style: Any) -> None:
    """A stored histogram ({"edges", "counts"}) as edge-aligned bars."""
    edges = hist["edges"]
    ax.bar(
        edges[:-1],
        hist["counts"],
        width=[b - a for a, b in zip(edges[:-1], edges[1:])],
        align="edge",
        edgecolor="black",
        **style,
    )


def plot_p2value_histograms(stats: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """One panel per iteration: the P2Value histogram of the whole buffer after that
    iteration, and over it the P2Values of the programs drawn for fine-tuning."""
    plt = _plt()
    n = max(1, len(stats))
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False, sharey=True)
    for ax, st in zip(axes[0], stats):
        _hist_bars(ax, st["buffer"]["p2value"]["histogram"], color="tab:blue", label=f"buffer ({st['buffer']['size']})")
        samp = st.get("sampling") or {}
        if samp.get("p2value_drawn"):  # absent in stats.json written before it was recorded
            _hist_bars(
                ax,
                samp["p2value_drawn"]["histogram"],
                color="tab:orange",
                alpha=0.75,
                label=f"drawn ({samp['draws']}, {samp['method']} alpha {samp['alpha']:g})",
            )
            ax.legend(fontsize=8, loc="upper center")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # head room for the legend
        ax.set_title(f"iteration {st['iteration']}")
        ax.set_xlabel("P2Value")
    axes[0][0].set_ylabel("programs")
    return _save(plt, fig, out)


def plot_pass_at_k(rows: Sequence[tuple[str, Mapping[str, Any]]], out: Path, title: str = "") -> Path:
    """Grouped bars: for each model/stage (label, metrics) its pass@k with CI error bars,
    the value written above each bar's CI."""
    plt = _plt()
    ks = sorted({k for _, m in rows for k in m if k.startswith("pass@")}, key=lambda s: int(s[5:]))
    n = max(1, len(rows))
    width = min(0.8 / n, 0.3)
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 0.75 * n * max(1, len(ks)) + 2.5)), 4.2))
    for i, (label, m) in enumerate(rows):
        xs, ys, lo, hi = [], [], [], []
        for j, k in enumerate(ks):
            if k not in m:
                continue
            e = Estimate.from_dict(m[k])
            xs.append(j + (i - (n - 1) / 2) * width)
            ys.append(e.value)
            lo.append(e.value - e.low)
            hi.append(e.high - e.value)
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=label, edgecolor="black", linewidth=0.5)
        for x, y, h in zip(xs, ys, hi):
            ax.text(x, y + h + 0.015, f"{y:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(ks)))
    ax.set_xticklabels(ks)
    ax.set_xlim(-0.5, len(ks) - 0.5)
    ax.set_ylim(0, 1.12)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("pass@k (share of problems)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=min(4, n), frameon=False)
    return _save(plt, fig, out)


def plot_loss_curves(curves: Sequence[tuple[int, Sequence[float]]], out: Path) -> Path:
    """Training loss per optimizer step, iterations one after another."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    offset = 0
    for it, losses in curves:
        xs = list(range(offset + 1, offset + len(losses) + 1))
        ax.plot(xs, list(losses), marker=".", label=f"iteration {it}")
        offset += len(losses)
    ax.set_xlabel("optimizer step (all iterations, in order)")
    ax.set_ylabel("loss (cross-entropy per\ncompletion token, nats)")
    ax.grid(alpha=0.3)
    ax.set_title("fine-tuning loss", fontsize=10)
    ax.legend(fontsize=8)
    return _save(plt, fig, out)


def plot_sampling_stats(stats: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """Over iterations: what the buffer holds and what the sampler drew from it (shares of
    fully passing and zero-pass programs, mean P2Value), and the counts (buffer size,
    draws, unique programs drawn, effective sample size)."""
    if len(stats) == 1:
        return _sampling_bars(stats[0], out)
    plt = _plt()
    its = [s["iteration"] for s in stats]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    series = [
        ("fully passing, buffer", [s["buffer"]["share_fully_passing"] for s in stats], "tab:green", "--"),
        ("fully passing, drawn", [s["sampling"]["share_fully_passing_drawn"] for s in stats], "tab:green", "-"),
        ("zero-pass, buffer", [s["buffer"]["share_zero_pass"] for s in stats], "tab:red", "--"),
        ("zero-pass, drawn", [s["sampling"]["share_zero_pass_drawn"] for s in stats], "tab:red", "-"),
        ("mean P2Value, buffer", [s["buffer"]["p2value"]["mean"] or 0.0 for s in stats], "tab:blue", "--"),
    ]
    if all((s["sampling"].get("p2value_drawn") or {}).get("mean") is not None for s in stats):
        series.append(("mean P2Value, drawn", [s["sampling"]["p2value_drawn"]["mean"] for s in stats], "tab:blue", "-"))
    for label, ys, color, ls in series:
        a1.plot(its, ys, marker="o", color=color, linestyle=ls, label=label)
    a1.set_ylim(-0.03, 1.03)
    a1.set_ylabel("share of programs / P2Value")
    a1.set_title("buffer (dashed) vs drawn for fine-tuning (solid)", fontsize=10)
    a1.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    counts = [
        ("buffer size", [s["buffer"]["size"] for s in stats], "tab:gray"),
        ("draws", [s["sampling"]["draws"] for s in stats], "tab:purple"),
        ("unique programs drawn", [s["sampling"]["unique_programs_drawn"] for s in stats], "tab:orange"),
        ("effective sample size", [s["sampling"]["effective_sample_size"] for s in stats], "tab:cyan"),
    ]
    for label, ys, color in counts:
        a2.plot(its, ys, marker="o", color=color, label=label)
    a2.set_ylim(bottom=0)
    a2.set_ylabel("programs")
    a2.set_title("counts", fontsize=10)
    a2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    for ax in (a1, a2):
        ax.set_xlabel("iteration")
        ax.set_xticks(its)
        if len(its) == 1:
            ax.set_xlim(its[0] - 0.5, its[0] + 0.5)
        ax.grid(alpha=0.3)
    return _save(plt, fig, out)


def _sampling_bars(st: Mapping[str, Any], out: Path) -> Path:
    """plot_sampling_stats for a single iteration: buffer vs drawn side by side as bars."""
    plt = _plt()
    b, sm = st["buffer"], st["sampling"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    drawn_p2 = (sm.get("p2value_drawn") or {}).get("mean")
    groups = ["fully passing", "zero-pass", "mean P2Value"]
    series = [
        ("buffer", "tab:gray", [b["share_fully_passing"], b["share_zero_pass"], b["p2value"]["mean"] or 0.0]),
        (
            "drawn for fine-tuning",
            "tab:orange",
            [sm["share_fully_passing_drawn"], sm["share_zero_pass_drawn"], drawn_p2],
        ),
    ]
    w = 0.38
    for j, (label, color, values) in enumerate(series):
        xs = [i + (j - 0.5) * w for i, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        a1.bar(xs, ys, width=w, color=color, label=label, edgecolor="black", linewidth=0.5)
        for x, y in zip(xs, ys):
            a1.text(x, y + 0.02, f"{y:.2f}", ha="center", va="bottom", fontsize=8)
    a1.set_xticks(range(len(groups)))
    a1.set_xticklabels(groups)
    a1.set_ylim(0, 1.3)
    a1.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    a1.set_ylabel("share of programs / P2Value")
    a1.set_title(f"iteration {st['iteration']}: buffer vs drawn", fontsize=10)
    a1.legend(fontsize=8, loc="upper center", ncols=2, frameon=False)
    counts = [
        ("buffer", b["size"]),
        ("draws", sm["draws"]),
        ("unique\ndrawn", sm["unique_programs_drawn"]),
        ("effective\nsample size", sm["effective_sample_size"]),
    ]
    bars = a2.bar(
        range(len(counts)),
        [c for _, c in counts],
        color=["tab:gray", "tab:purple", "tab:orange", "tab:cyan"],
        edgecolor="black",
        linewidth=0.5,
    )
    a2.bar_label(bars, labels=[f"{c:.0f}" if float(c).is_integer() else f"{c:.1f}" for _, c in counts], fontsize=8)
    a2.set_xticks(range(len(counts)))
    a2.set_xticklabels([n for n, _ in counts], fontsize=8)
    a2.set_ylim(0, max(c for _, c in counts) * 1.15 + 1)
    a2.set_ylabel("programs")
    a2.set_title("counts", fontsize=10)
    for ax in (a1, a2):
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    return _save(plt, fig, out)


def plot_btp_run(plot_dir: Path, comparison: Mapping[str, Any], stats: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    """Every figure of a BTP run into ``plot_dir``; returns {name: path}."""
    plot_dir = Path(plot_dir)
    made: dict[str, Path] = {}
    for ds, e in comparison["datasets"].items():
        rows = [("target before", e["target_before"])]
        rows += [
            (f"target after iteration {stage.rsplit('iter', 1)[1]}", m)
            for stage, m in e.get("target_per_iteration", {}).items()
            if stage != "target_iter0"
        ]
        if len(rows) == 1:
            rows.append(("target after", e["target_after"]))
        if "source" in e:
            rows.append(("source", e["source"]))
        made[f"pass_at_k_{ds}"] = plot_pass_at_k(
            rows,
            plot_dir / f"pass_at_k_{ds}.png",
            title=f"{ds} {(e.get('protocol') or {}).get('split', 'test')}, {e['n_problems']} problems: "
            "pass@k with 95% bootstrap CI",
        )
    if stats:
        made["p2value_hist"] = plot_p2value_histograms(stats, plot_dir / "p2value_hist.png")
        made["sampling_stats"] = plot_sampling_stats(stats, plot_dir / "sampling_stats.png")
        curves = [(s["iteration"], s["training"].get("losses") or []) for s in stats]
        if any(c for _, c in curves):
            made["loss_curve"] = plot_loss_curves(curves, plot_dir / "loss_curve.png")
    return made


def plot_ablation(
    variants: Sequence[Mapping[str, Any]],
    out: Path,
    metric: str = "pass@1",
    reference: str | None = None,
    title: str = "",
    baseline: float | None = None,
) -> Path:
    """Horizontal bars, one per finished variant, coloured by group: ``metric`` with its
    95% CI; the reference (full method) hatched and its value drawn as a vertical line."""
    plt = _plt()
    rows = [v for v in variants if (v.get("metrics") or {}).get(metric)]
    fig, ax = plt.subplots(figsize=(8, max(2.4, 0.42 * len(rows) + 1.3)))
    names = [v["name"] for v in rows]
    estimates = [Estimate.from_dict(v["metrics"][metric]) for v in rows]
    vals = [e.value for e in estimates]
    errs: list[list[float]] = [[e.value - e.low for e in estimates], [e.high - e.value for e in estimates]]
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
        from matplotlib.artist import Artist
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles: list[Artist] = [Patch(color=gcolor[g], label=g or "-") for g in groups]
        if baseline is not None:
            handles.append(
                Line2D([0], [0], color="tab:red", linestyle=":", label=f"target before BTP ({baseline:.3f})")
            )
        ax.legend(
            handles=handles, fontsize=7, title="group", title_fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5)
        )
    ax.set_title(title or f"ablation: {metric} per variant", fontsize=10)
    return _save(plt, fig, out)


def plot_sweep_history(
    trials: Sequence[Mapping[str, Any]], out: Path, direction: str = "maximize", objective: str = "objective"
) -> Path:
    """Objective value per finished trial, pruned trials at their last intermediate value,
    and the best value so far."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    done = sorted(
        (t for t in trials if t.get("state") == "COMPLETE" and t.get("value") is not None), key=lambda t: t["number"]
    )
    pruned = [t for t in trials if t.get("state") == "PRUNED"]
    if done:
        ax.plot([t["number"] for t in done], [t["value"] for t in done], "o", color="tab:blue", label="complete trial")
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


def plot_before_after(
    rows: Sequence[tuple[str, Mapping[str, Any], Mapping[str, Any]]], out: Path, metric: str = "pass@1", title: str = ""
) -> Path:
    """Per run (label, before metrics, after metrics): before and after bars with CIs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 3.8))
    w = 0.38
    for j, (name, color) in enumerate((("before", "tab:gray"), ("after", "tab:blue"))):
        xs, ys, lo, hi = [], [], [], []
        for i, (_, before, after) in enumerate(rows):
            m = (before, after)[j]
            if not m or metric not in m:
                continue
            e = Estimate.from_dict(m[metric])
            xs.append(i + (j - 0.5) * w)
            ys.append(e.value)
            lo.append(e.value - e.low)
            hi.append(e.high - e.value)
        bars = ax.bar(
            xs, ys, width=w, yerr=[lo, hi], capsize=3, color=color, label=name, edgecolor="black", linewidth=0.5
        )
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=2)
    ax.set_xticks(range(len(rows)))
    crowded = len(rows) > 3
    ax.set_xticklabels(
        [r[0] for r in rows], fontsize=8, rotation=15 if crowded else 0, ha="right" if crowded else "center"
    )
    ax.set_ylim(0, 1.12)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel(f"{metric} (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.set_title(title or f"{metric} before and after", fontsize=10)
    return _save(plt, fig, out)
