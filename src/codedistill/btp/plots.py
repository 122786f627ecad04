"""PNG plots of a BTP run (matplotlib, Agg backend): P2Value histograms per iteration,
pass@k before/after with 95% CI error bars, training loss curves."""

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
        ax.set_title(f"iteration {st['iteration']}")
        ax.set_xlabel("P2Value")
    axes[0][0].set_ylabel("programs")
    return _save(plt, fig, out)


def plot_pass_at_k(rows: Sequence[tuple[str, Mapping[str, Any]]], out: Path, title: str = "") -> Path:
    """Grouped bars: for each model/stage (label, metrics) its pass@k with CI error bars."""
    plt = _plt()
    ks = sorted({k for _, m in rows for k in m if k.startswith("pass@")}, key=lambda s: int(s[5:]))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) * max(1, len(ks)) / 2), 3.6))
    width = 0.8 / max(1, len(rows))
    for i, (label, m) in enumerate(rows):
        xs, ys, lo, hi = [], [], [], []
        for j, k in enumerate(ks):
            if k not in m:
                continue
            v = m[k]
            xs.append(j + i * width)
            ys.append(v["value"])
            lo.append(v["value"] - v["ci_low"])
            hi.append(v["ci_high"] - v["value"])
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(ks))])
    ax.set_xticklabels(ks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("pass@k (95% CI)")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(plt, fig, out)


def plot_loss_curves(curves: Sequence[tuple[int, Sequence[float]]], out: Path) -> Path:
    """Training loss per optimizer step, iterations one after another."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    offset = 0
    for it, losses in curves:
        xs = list(range(offset, offset + len(losses)))
        ax.plot(xs, list(losses), marker=".", label=f"iteration {it}")
        offset += len(losses)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("completion loss")
    ax.legend(fontsize=8)
    return _save(plt, fig, out)
