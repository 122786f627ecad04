"""report.md of a BTP run (written by the loop; ``codedistill report`` renders the fuller
Markdown + HTML report from the same files)."""

from __future__ import annotations

from typing import Any, Sequence

from codedistill.btp.plots import ci_bounds


def fmt_metric(m: dict[str, Any] | None, k: str) -> str:
    """``0.436 [0.356, 0.522]``: metric ``k`` of a pass@k report with its CI ("-" if absent)."""
    if not m or k not in m:
        return "-"
    v = m[k]
    lo, hi = ci_bounds(v)
    return f"{v['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def fmt_improvement(imp: dict[str, Any] | None) -> str:
    """``+0.182 [+0.106, +0.260]``: a paired-bootstrap difference with its CI ("-" if absent)."""
    if not imp:
        return "-"
    lo, hi = ci_bounds(imp)
    return f"{imp['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def report_markdown(plan: Any, comparison: dict[str, Any], stats: Sequence[dict[str, Any]],
                    elapsed: float | None = None) -> str:
    cfg = plan.cfg
    ks = [f"pass@{k}" for k in cfg.ks()]
    L = [f"# BTP: {plan.source_spec.alias} -> {plan.target_spec.alias} ({cfg.mode})", ""]
    if cfg.allow_overlap:
        n = len(plan.overlap)
        L += [f"**WARNING: --allow-overlap was given. {n} training problem(s) also appear in the "
              f"evaluation sets{': ' + ', '.join(plan.overlap[:10]) if n else ''}. Held-out numbers "
              "may be inflated.**", ""]
    if getattr(plan, "dropped", None):
        L += [f"Left out of training (also evaluation problems, --drop-overlap): {', '.join(plan.dropped)}.", ""]
    if getattr(plan, "near_duplicates", None):
        L += [f"Note: {len(plan.near_duplicates)} training problem(s) share their description (not their tests "
              f"or reference) with an evaluation problem: {', '.join('/'.join(x) for x in plan.near_duplicates[:10])}.", ""]
    L += [
        f"- training: {cfg.dataset} train split, {len(plan.train)} problems; "
        f"{cfg.generation} ({'num_beams %d' % cfg.num_beams if cfg.generation == 'beam' else 'n=%d, T=%g' % (cfg.num_samples, cfg.gen_temperature)})",
        f"- replay: P2Value = {cfg.p2_alpha:g}*P + {1 - cfg.p2_alpha:g}*pass_rate; sampling {cfg.sampling_method} "
        f"(alpha {cfg.sampling_alpha:g}){', IS weights beta %g' % cfg.is_beta if cfg.is_weights else ''}; "
        f"replay size {cfg.replay_size or 'buffer size'}",
        f"- fine-tuning: {'LoRA r=%d alpha=%d dropout=%g' % (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) if cfg.use_lora else 'full'}, "
        f"lr {cfg.learning_rate:g}, epochs {cfg.epochs}, batch {cfg.train_batch_size}, {cfg.n_iterations} iterations, seed {cfg.seed}",
        f"- evaluation: {cfg.eval_num_samples} samples per problem at T={cfg.eval_temperature:g}, top_p {cfg.eval_top_p:g}",
    ]
    if elapsed is not None:
        L.append(f"- wall time of this start: {elapsed:.1f} s")
    L.append("")
    from codedistill.report.protocol import btp_protocol, comparability

    for ds, e in comparison["datasets"].items():
        proto = btp_protocol({"config": cfg.model_dump()}, comparison, ds)
        L += [f"## {ds} {proto.split} split ({e['n_problems']} problems)", "",
              f"Protocol: {proto.describe()}.", "", f"{_sentence(comparability(proto).describe())}.", "",
              "| model | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
        L.append(f"| target before ({plan.target_spec.alias}) | " + " | ".join(fmt_metric(e["target_before"], k) for k in ks) + " |")
        for stage, m in e["target_per_iteration"].items():
            if stage != "target_iter0":
                L.append(f"| target after iteration {stage.rsplit('iter', 1)[1]} | " + " | ".join(fmt_metric(m, k) for k in ks) + " |")
        if "source" in e:
            L.append(f"| source ({plan.source_spec.alias}) | " + " | ".join(fmt_metric(e["source"], k) for k in ks) + " |")
        L += ["", "Improvement after - before (paired bootstrap over problems, 95% CI):", ""]
        for k, imp in e["improvement"].items():
            L.append(f"- {k}: {fmt_improvement(imp)}, "
                     f"p(no improvement) = {imp['p_value_no_improvement']:.3f}")
        L.append("")
    if stats:
        L += ["## Iterations", "",
              "| iter | buffer | new | mean P2Value | drawn | unique drawn | fully passing drawn | zero-pass drawn | ESS | loss first -> last |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for s in stats:
            b, sm, t = s["buffer"], s["sampling"], s["training"]
            fl = f"{t['first_loss']:.3f} -> {t['last_loss']:.3f}" if t.get("first_loss") is not None else "-"
            L.append(f"| {s['iteration']} | {b['size']} | {b['new_this_iteration']} | {b['p2value']['mean'] or 0:.3f} | "
                     f"{sm['draws']} | {sm['unique_programs_drawn']} | {sm['share_fully_passing_drawn']:.1%} | "
                     f"{sm['share_zero_pass_drawn']:.1%} | {sm['effective_sample_size']:.1f} | {fl} |")
        L.append("")
    L += ["Plots: `plots/pass_at_k_<dataset>.png`, `plots/p2value_hist.png`, `plots/sampling_stats.png`, "
          "`plots/loss_curve.png`. Checkpoints: `iter_K/adapter/` (LoRA) or `iter_K/model/`. "
          "Full report (Markdown + self-contained HTML): `codedistill report <this directory>`."]
    return "\n".join(L) + "\n"
