"""PNG plots of a BTP run (matplotlib, Agg backend): P2Value histograms per iteration,
pass@k before/after with 95% CI error bars, sampling statistics over iterations, training
loss curves. ``plot_btp_run`` draws them all from the run's JSON (comparison.json and
iter_K/stats.json), so the loop and ``codedistill report`` make the same figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


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


def ci_bounds(m: Mapping[str, Any]) -> tuple[float, float]:
    """(low, high) of a metric or improvement object: ``ci_low``/``ci_high`` as
    codedistill.metrics writes them, or ``low``/``high``."""
    lo = m["ci_low"] if "ci_low" in m else m["low"]
    hi = m["ci_high"] if "ci_high" in m else m["high"]
    return float(lo), float(hi)


def _hist_bars(ax, hist: Mapping[str, Any], **style: Any) -> None:
    """A stored histogram ({"edges", "counts"}) as edge-aligned bars."""
    edges = hist["edges"]
    ax.bar(edges[:-1], hist["counts"], width=[b - a for a, b in zip(edges[:-1], edges[1:])],
           align="edge", edgecolor="black", **style)


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
            _hist_bars(ax, samp["p2value_drawn"]["histogram"], color="tab:orange", alpha=0.75,
                       label=f"drawn ({samp['draws']}, {samp['method']} alpha {samp['alpha']:g})")
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
            v = m[k]
            low, high = ci_bounds(v)
            xs.append(j + (i - (n - 1) / 2) * width)
            ys.append(v["value"])
            lo.append(v["value"] - low)
            hi.append(high - v["value"])
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
    groups = [("fully passing", b["share_fully_passing"], sm["share_fully_passing_drawn"]),
              ("zero-pass", b["share_zero_pass"], sm["share_zero_pass_drawn"]),
              ("mean P2Value", b["p2value"]["mean"] or 0.0, drawn_p2)]
    w = 0.38
    for j, (label, color) in enumerate((("buffer", "tab:gray"), ("drawn for fine-tuning", "tab:orange"))):
        xs = [i + (j - 0.5) * w for i, g in enumerate(groups) if g[1 + j] is not None]
        ys = [g[1 + j] for g in groups if g[1 + j] is not None]
        a1.bar(xs, ys, width=w, color=color, label=label, edgecolor="black", linewidth=0.5)
        for x, y in zip(xs, ys):
            a1.text(x, y + 0.02, f"{y:.2f}", ha="center", va="bottom", fontsize=8)
    a1.set_xticks(range(len(groups)))
    a1.set_xticklabels([g[0] for g in groups])
    a1.set_ylim(0, 1.3)
    a1.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    a1.set_ylabel("share of programs / P2Value")
    a1.set_title(f"iteration {st['iteration']}: buffer vs drawn", fontsize=10)
    a1.legend(fontsize=8, loc="upper center", ncols=2, frameon=False)
    counts = [("buffer", b["size"]), ("draws", sm["draws"]), ("unique\ndrawn", sm["unique_programs_drawn"]),
              ("effective\nsample size", sm["effective_sample_size"])]
    bars = a2.bar(range(len(counts)), [c for _, c in counts], color=["tab:gray", "tab:purple", "tab:orange", "tab:cyan"],
                  edgecolor="black", linewidth=0.5)
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
        rows += [(f"target after iteration {stage.rsplit('iter', 1)[1]}", m)
                 for stage, m in e.get("target_per_iteration", {}).items() if stage != "target_iter0"]
        if len(rows) == 1:
            rows.append(("target after", e["target_after"]))
        if "source" in e:
            rows.append(("source", e["source"]))
        made[f"pass_at_k_{ds}"] = plot_pass_at_k(
            rows, plot_dir / f"pass_at_k_{ds}.png",
            title=f"{ds} {(e.get('protocol') or {}).get('split', 'test')}, {e['n_problems']} problems: "
                  "pass@k with 95% bootstrap CI")
    if stats:
        made["p2value_hist"] = plot_p2value_histograms(stats, plot_dir / "p2value_hist.png")
        made["sampling_stats"] = plot_sampling_stats(stats, plot_dir / "sampling_stats.png")
        curves = [(s["iteration"], s["training"].get("losses") or []) for s in stats]
        if any(c for _, c in curves):
            made["loss_curve"] = plot_loss_curves(curves, plot_dir / "loss_curve.png")
    return made
