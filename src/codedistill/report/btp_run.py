"""report.md and plots/ of a finished BTP run, from its run directory.

Reads config.json, comparison.json and iter_K/stats.json (and generation.json when the run
used served models); ``codedistill report`` renders the fuller Markdown + HTML report from
the same files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from codedistill.errors import ConfigError
from codedistill.report.files import iteration_stats, load_json, settings
from codedistill.report.format import fmt_diff, fmt_metric
from codedistill.report.plots import plot_btp_run
from codedistill.report.protocol import btp_protocol, comparability
from codedistill.report.served import served_generation_lines
from codedistill.results import PairedDifference

PLOTS_LINE = (
    "Plots: `plots/pass_at_k_<dataset>.png`, `plots/p2value_hist.png`, `plots/sampling_stats.png`, "
    "`plots/loss_curve.png`. Checkpoints: `iter_K/adapter/` (LoRA) or `iter_K/model/`. "
    "Full report (Markdown + self-contained HTML): `codedistill report <this directory>`."
)


def write_run_report(run_dir: str | Path, elapsed: float | None = None) -> Path:
    """Draw plots/ and write report.md of a finished BTP run; ``elapsed``: the wall time of
    the start that finished it, in seconds. Returns the path of report.md."""
    run_dir = Path(run_dir)
    config, comparison = load_json(run_dir / "config.json"), load_json(run_dir / "comparison.json")
    if not config or not comparison:
        raise ConfigError(
            f"{run_dir} is not a finished BTP run (config.json and comparison.json are needed); "
            "run it to the end first."
        )
    stats = iteration_stats(run_dir, int(comparison["n_iterations"]))
    plot_btp_run(run_dir / "plots", comparison, stats)
    text = run_markdown(config, comparison, stats, elapsed).rstrip("\n")
    fallback = settings(config).get("beam_search_fallback")
    if fallback:
        text += f"\n\n**Beam search fallback:** {fallback}."
    text += "\n".join(served_generation_lines(run_dir))
    path = run_dir / "report.md"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def run_markdown(
    config: Mapping[str, Any],
    comparison: Mapping[str, Any],
    stats: Sequence[Mapping[str, Any]],
    elapsed: float | None = None,
) -> str:
    """The Markdown of report.md (config.json and comparison.json as parsed, stats per iteration)."""
    c = comparison
    lines = [f"# BTP: {c['source_model']} -> {c['target_model']} ({c['mode']})", ""]
    lines += _overlap_lines(c)
    lines += _settings_lines(settings(config), c, elapsed)
    for ds, entry in c["datasets"].items():
        lines += _dataset_lines(config, c, ds, entry)
    if stats:
        lines += _iteration_lines(stats)
    lines.append(PLOTS_LINE)
    return "\n".join(lines) + "\n"


def _overlap_lines(c: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if c["allow_overlap"]:
        overlap = c["overlapping_train_problems"]
        n = len(overlap)
        lines += [
            f"**WARNING: --allow-overlap was given. {n} training problem(s) also appear in the "
            f"evaluation sets{': ' + ', '.join(overlap[:10]) if n else ''}. Held-out numbers "
            "may be inflated.**",
            "",
        ]
    if c.get("dropped_overlapping_train_problems"):
        lines += [
            "Left out of training (also evaluation problems, --drop-overlap): "
            f"{', '.join(c['dropped_overlapping_train_problems'])}.",
            "",
        ]
    near = c.get("near_duplicate_descriptions")
    if near:
        lines += [
            f"Note: {len(near)} training problem(s) share their description (not their tests or reference) "
            f"with an evaluation problem: {', '.join('/'.join(x) for x in near[:10])}.",
            "",
        ]
    return lines


def _settings_lines(cfg: Mapping[str, Any], c: Mapping[str, Any], elapsed: float | None) -> list[str]:
    generation = (
        f"num_beams {cfg['num_beams']:d}"
        if cfg["generation"] == "beam"
        else f"n={cfg['num_samples']:d}, T={cfg['gen_temperature']:g}"
    )
    weights = f", IS weights beta {cfg['is_beta']:g}" if cfg["is_weights"] else ""
    tuning = (
        f"LoRA r={cfg['lora_r']:d} alpha={cfg['lora_alpha']:d} dropout={cfg['lora_dropout']:g}"
        if cfg["use_lora"]
        else "full"
    )
    lines = [
        f"- training: {cfg['dataset']} train split, {c['n_train_problems']} problems; "
        f"{cfg['generation']} ({generation})",
        f"- replay: P2Value = {cfg['p2_alpha']:g}*P + {1 - cfg['p2_alpha']:g}*pass_rate; sampling "
        f"{cfg['sampling_method']} (alpha {cfg['sampling_alpha']:g}){weights}; "
        f"replay size {cfg['replay_size'] or 'buffer size'}",
        f"- fine-tuning: {tuning}, lr {cfg['learning_rate']:g}, epochs {cfg['epochs']}, "
        f"batch {cfg['train_batch_size']}, {cfg['n_iterations']} iterations, seed {cfg['seed']}",
        "- evaluation: "
        + (
            f"greedy, {cfg['eval_num_samples']} sample(s) per problem"
            if cfg["eval_temperature"] == 0
            else f"{cfg['eval_num_samples']} samples per problem at T={cfg['eval_temperature']:g}, "
            f"top_p {cfg['eval_top_p']:g}"
        ),
    ]
    if elapsed is not None:
        lines.append(f"- wall time of this start: {elapsed:.1f} s")
    return lines + [""]


def _dataset_lines(config: Mapping[str, Any], c: Mapping[str, Any], ds: str, e: Mapping[str, Any]) -> list[str]:
    ks = list(e["improvement"])
    proto = btp_protocol(config, c, ds)
    verdict = comparability(proto).describe()
    plus = "base" in e["target_before"]  # HumanEval+ / MBPP+: base and plus side by side
    cols = [f"{part} {k}" for k in ks for part in ("base", "plus")] if plus else ks
    lines = [
        f"## {ds} {proto.split} split ({e['n_problems']} problems)",
        "",
        f"Protocol: {proto.describe()}.",
        "",
        f"{verdict[:1].upper() + verdict[1:]}.",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]

    def row(label: str, report: Mapping[str, Any]) -> str:
        if plus:
            cells = [fmt_metric(r.get(k)) for k in ks for r in (report.get("base") or {}, report)]
        else:
            cells = [fmt_metric(report.get(k)) for k in ks]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines.append(row(f"target before ({c['target_model']})", e["target_before"]))
    for stage, m in e["target_per_iteration"].items():
        if stage != "target_iter0":
            lines.append(row(f"target after iteration {stage.rsplit('iter', 1)[1]}", m))
    if "source" in e:
        lines.append(row(f"source ({c['source_model']})", e["source"]))
    if plus:
        lines += ["", "base: the original tests' inputs; plus: base and EvalPlus's extra inputs (judged as evalplus)."]
    lines += ["", "Improvement after - before (paired bootstrap over problems, 95% CI):", ""]
    for k, imp in e["improvement"].items():
        p = PairedDifference.from_dict(imp).p_value_no_improvement
        base = (e.get("improvement_base") or {}).get(k)
        if base:
            pb = PairedDifference.from_dict(base).p_value_no_improvement
            lines.append(
                f"- {k}: base {fmt_diff(base)}, p(no improvement) = {pb:.3f}; "
                f"plus {fmt_diff(imp)}, p(no improvement) = {p:.3f}"
            )
        else:
            lines.append(f"- {k}: {fmt_diff(imp)}, p(no improvement) = {p:.3f}")
    return lines + [""]


def _iteration_lines(stats: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "## Iterations",
        "",
        "| iter | buffer | new | mean P2Value | drawn | unique drawn | fully passing drawn | zero-pass drawn "
        "| ESS | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stats:
        b, sm, t = s["buffer"], s["sampling"], s["training"]
        loss = f"{t['first_loss']:.3f} -> {t['last_loss']:.3f}" if t.get("first_loss") is not None else "-"
        lines.append(
            f"| {s['iteration']} | {b['size']} | {b['new_this_iteration']} | "
            f"{b['p2value']['mean'] or 0:.3f} | {sm['draws']} | {sm['unique_programs_drawn']} | "
            f"{sm['share_fully_passing_drawn']:.1%} | {sm['share_zero_pass_drawn']:.1%} | "
            f"{sm['effective_sample_size']:.1f} | {loss} |"
        )
    return lines + [""]
