"""Report sections, one builder per kind of result directory.

Each builder reads a directory's JSON files (comparison.json and iter_K/stats.json of
codedistill.btp.loop, metrics.json of codedistill.baseline, ablation.json / sweep.json /
matrix.json of codedistill.experiments), draws its figures into ``plot_dir`` and returns blocks of a
:class:`~codedistill.report.doc.Document` plus one summary row for the cross-run table.
Numbers are printed with 3 decimals from the files as they are; nothing is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codedistill.errors import ConfigError
from codedistill.report.doc import Block, Bullets, Figure, Heading, Para, Table
from codedistill.report.files import iteration_stats, load_json, settings
from codedistill.report.format import fmt_diff, fmt_metric, fmt_num, fmt_param, fmt_pct
from codedistill.report.plots import (
    plot_ablation,
    plot_before_after,
    plot_btp_run,
    plot_importance,
    plot_pass_at_k,
    plot_sweep_history,
)
from codedistill.report.protocol import Protocol, Verdict, baseline_protocol, btp_protocol, comparability
from codedistill.results import Estimate

RESULT_FILES = {
    "ablation": "ablation.json",
    "sweep": "sweep.json",
    "matrix": "matrix.json",
    "btp": "comparison.json",
    "baseline": "metrics.json",
}


@dataclass
class Summary:
    """One row of the cross-run table."""

    name: str
    kind: str
    models: str
    dataset: str
    protocol: str
    comparable: str
    before: str = "-"
    after: str = "-"
    gain: str = "-"
    # HumanEval+ / MBPP+: the base numbers beside the plus ones above ("" elsewhere)
    base_before: str = ""
    base_after: str = ""
    base_gain: str = ""


@dataclass
class Section:
    blocks: list[Block] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)


def detect_kind(run_dir: Path) -> str:
    """ablation | sweep | matrix | btp | baseline | experiment (a folder of such runs)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir} is not a directory; pass a run directory (one with comparison.json, "
            "metrics.json, ablation.json, sweep.json or matrix.json)."
        )
    for kind, name in RESULT_FILES.items():
        if (run_dir / name).exists():
            if kind == "baseline":
                cfg = load_json(run_dir / "config.json") or {}
                if cfg.get("kind") not in (None, "baseline"):
                    continue
            return kind
    if child_runs(run_dir):
        return "experiment"
    cfg = load_json(run_dir / "config.json")
    if cfg:
        expected = RESULT_FILES.get(cfg.get("kind", ""), "its result file")
        raise ConfigError(
            f"{run_dir} holds an unfinished {cfg.get('kind', 'run')} (no {expected} yet): "
            "run the same command again to finish it, then report."
        )
    raise ConfigError(
        f"{run_dir} holds no result files (comparison.json, metrics.json, ablation.json, "
        "sweep.json or matrix.json); pass a run directory."
    )


def child_runs(run_dir: Path, depth: int = 2) -> list[Path]:
    """Result directories below ``run_dir`` (an experiment folder holding several runs)."""
    found: list[Path] = []
    if depth <= 0:
        return found
    for sub in sorted(p for p in Path(run_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any((sub / f).exists() for f in RESULT_FILES.values()):
            found.append(sub)
        elif sub.name not in ("plots", "eval", "generations", "report", "cache") and not sub.name.startswith("iter_"):
            found += child_runs(sub, depth - 1)
    return found


def _cell(report: Mapping[str, Any] | None, k: str) -> str:
    """Metric ``k`` of a pass@k report with its CI ("-" where the report or the metric is absent)."""
    return fmt_metric((report or {}).get(k))


def ks_of(*metrics: Mapping[str, Any] | None) -> list[str]:
    ks = {k for m in metrics if m for k in m if k.startswith("pass@")}
    return sorted(ks, key=lambda s: int(s[5:]))


def protocol_blocks(p: Protocol, v: Verdict) -> list[Block]:
    text = v.describe()
    return [
        Para(f"Protocol: {p.describe()}."),
        Para(text[0].upper() + text[1:] + ".", {"yes": "ok", "partly": "note", "no": "caution"}[v.level]),
    ]


def _provenance(config_json: Mapping[str, Any] | None) -> list[str]:
    prov = (config_json or {}).get("provenance") or {}
    out = []
    git = prov.get("git") or {}
    if git.get("revision"):
        out.append(f"code revision {git['revision'][:12]}{' (uncommitted changes)' if git.get('dirty') else ''}")
    if prov.get("time"):
        out.append(f"started {prov['time']}")
    pk = prov.get("packages") or {}
    shown = ("codedistill", "torch", "transformers", "peft", "vllm")
    vers = ", ".join(f"{k} {v}" for k, v in pk.items() if v and k in shown)
    if vers:
        out.append(vers)
    if prov.get("devices"):
        out.append("devices: " + ", ".join(map(str, prov["devices"])))
    return out


# ----------------------------------------------------------------------------- BTP


def btp_section(run_dir: Path, plot_dir: Path, name: str, level: int = 2) -> Section:
    run_dir = Path(run_dir)
    comp = load_json(run_dir / "comparison.json")
    config = load_json(run_dir / "config.json") or {}
    cfg = settings(config)
    stats = iteration_stats(run_dir, int(comp.get("n_iterations") or cfg.get("n_iterations") or 0))
    src = comp.get("source_model", cfg.get("source_model", "?"))
    tgt = comp.get("target_model", cfg.get("target_model", "?"))
    sec = Section()
    B = sec.blocks
    B.append(Heading(f"BTP: {src} -> {tgt} ({comp.get('mode', cfg.get('mode', '?'))}) — {name}", level))
    B.append(Para(f"Run directory: {run_dir}"))
    items = []
    if cfg:
        gen = (
            f"beam search, {cfg.get('num_beams')} beams"
            if cfg.get("generation") == "beam"
            else f"temperature sampling, n={cfg.get('num_samples')}, T={cfg.get('gen_temperature')}"
        )
        items.append(
            f"training problems: {comp.get('n_train_problems')} from the "
            f"{comp.get('train_dataset', cfg.get('dataset'))} train split; the source generates by {gen}"
        )
        p2a = cfg.get("p2_alpha")
        if p2a is not None:
            items.append(
                f"replay: P2Value = {p2a:g}*P + {1 - p2a:g}*pass_rate; sampling {cfg.get('sampling_method')} "
                f"(alpha {cfg.get('sampling_alpha')}); draws per iteration "
                f"{cfg.get('replay_size') or 'buffer size'}"
            )
        ft = f"LoRA r={cfg.get('lora_r')} alpha={cfg.get('lora_alpha')}" if cfg.get("use_lora") else "full fine-tuning"
        items.append(
            f"fine-tuning: {ft}, lr {cfg.get('learning_rate')}, {cfg.get('epochs')} epoch(s) per iteration, "
            f"batch {cfg.get('train_batch_size')}, {comp.get('n_iterations')} iteration(s), "
            f"seed {comp.get('seed', cfg.get('seed'))}"
        )
    items += _provenance(config)
    B.append(Bullets(items))
    if comp.get("allow_overlap"):
        ov = comp.get("overlapping_train_problems") or []
        B.append(
            Para(
                f"--allow-overlap was given: {len(ov)} training problem(s) are also evaluation problems "
                f"({', '.join(ov[:10])}). Held-out numbers may be inflated.",
                "warn",
            )
        )
    if comp.get("dropped_overlapping_train_problems"):
        B.append(
            Para(
                "Left out of training (also evaluation problems): "
                + ", ".join(comp["dropped_overlapping_train_problems"]),
                "note",
            )
        )
    if comp.get("near_duplicate_descriptions"):
        nd = comp["near_duplicate_descriptions"]
        B.append(
            Para(
                f"{len(nd)} training problem(s) share their description (not tests or reference) with an "
                f"evaluation problem: {', '.join('/'.join(x) for x in nd[:10])}.",
                "note",
            )
        )
    figs = plot_btp_run(plot_dir, comp, stats)
    for ds, e in comp["datasets"].items():
        proto = btp_protocol(config, comp, ds)
        verdict = comparability(proto)
        B.append(Heading(f"{ds}: held-out results ({e['n_problems']} problems)", level + 1))
        B += protocol_blocks(proto, verdict)
        ks = ks_of(e["target_before"], e["target_after"], e.get("source"))
        plus = "base" in e["target_before"]  # HumanEval+ / MBPP+: base and plus side by side
        cols = [f"{part} {k}" for k in ks for part in ("base", "plus")] if plus else ks

        def cells(m: Mapping[str, Any] | None) -> list[str]:
            if plus:
                return [_cell(r, k) for k in ks for r in ((m or {}).get("base"), m)]
            return [_cell(m, k) for k in ks]

        rows = [[f"target before ({tgt})"] + cells(e["target_before"])]
        per = e.get("target_per_iteration") or {"target_iter1": e["target_after"]}
        for stage, m in per.items():
            if stage != "target_iter0":
                rows.append([f"target after iteration {stage.rsplit('iter', 1)[1]}"] + cells(m))
        if e.get("source"):
            rows.append([f"source ({src})"] + cells(e["source"]))
        caption = "pass@k with 95% bootstrap CI over problems"
        if plus:
            caption += "; base: the original tests' inputs, plus: base and EvalPlus's extra inputs (as evalplus judges)"
        B.append(Table(["model"] + cols, rows, caption=caption, name=f"btp-passk-{ds}"))
        imp_rows = []
        parts = (
            [("base", e.get("improvement_base") or {}), ("plus", e.get("improvement") or {})]
            if plus
            else [("", e.get("improvement") or {})]
        )
        for part, imps in parts:
            for k, imp in imps.items():
                p = imp.get("p_value_no_improvement")
                imp_rows.append(
                    [
                        f"{part} {k}".strip(),
                        fmt_num(imp.get("before")),
                        fmt_num(imp.get("after")),
                        fmt_diff(imp),
                        fmt_num(p),
                        str(imp.get("n_problems", "-")),
                    ]
                )
        if imp_rows:
            B.append(
                Table(
                    ["metric", "before", "after", "after - before [95% CI]", "p(no improvement)", "problems"],
                    imp_rows,
                    caption="paired bootstrap over the same problems (last iteration vs the base target)",
                    name=f"btp-improvement-{ds}",
                )
            )
        if f"pass_at_k_{ds}" in figs:
            B.append(
                Figure(
                    figs[f"pass_at_k_{ds}"],
                    f"{ds}: pass@k of the target before and after each iteration, "
                    "and of the source; error bars are 95% bootstrap CIs",
                )
            )
        k1 = "pass@1" if "pass@1" in ks else (ks[0] if ks else None)
        if k1:
            imp = (e.get("improvement") or {}).get(k1)
            bimp = (e.get("improvement_base") or {}).get(k1)
            sec.summaries.append(
                Summary(
                    name=name,
                    kind="btp",
                    models=f"{src} -> {tgt}",
                    dataset=ds,
                    protocol=proto.short(),
                    comparable=verdict.level,
                    before=_cell(e["target_before"], k1),
                    after=_cell(e["target_after"], k1),
                    gain=fmt_diff(imp) if imp else "-",
                    **(
                        {
                            "base_before": _cell(e["target_before"].get("base"), k1),
                            "base_after": _cell(e["target_after"].get("base"), k1),
                            "base_gain": fmt_diff(bimp) if bimp else "-",
                        }
                        if plus
                        else {}
                    ),
                )
            )
    if stats:
        B.append(Heading("Iterations", level + 1))
        rows = []
        for s in stats:
            b, sm, t = s["buffer"], s["sampling"], s.get("training") or {}
            fl = f"{t['first_loss']:.3f} -> {t['last_loss']:.3f}" if t.get("first_loss") is not None else "-"
            rows.append(
                [
                    str(s["iteration"]),
                    str(b["size"]),
                    str(b["new_this_iteration"]),
                    fmt_num(b["p2value"].get("mean")),
                    str(sm["draws"]),
                    str(sm["unique_programs_drawn"]),
                    fmt_pct(sm["share_fully_passing_drawn"]),
                    fmt_pct(sm["share_zero_pass_drawn"]),
                    fmt_num(sm["effective_sample_size"], 1),
                    fl,
                ]
            )
        B.append(
            Table(
                [
                    "iteration",
                    "buffer",
                    "new",
                    "mean P2Value",
                    "drawn",
                    "unique drawn",
                    "fully passing drawn",
                    "zero-pass drawn",
                    "ESS",
                    "loss first -> last",
                ],
                rows,
                caption="replay buffer and prioritized sampling per iteration",
                name="btp-iterations",
            )
        )
        grows = []
        for s in stats:
            for role, g in (s.get("generation") or {}).items():
                grows.append(
                    [
                        str(s["iteration"]),
                        role,
                        str(g.get("model")),
                        str(g.get("problems", "-")),
                        str(g.get("candidates")),
                        str(g.get("generated_new", "-")),
                        fmt_pct(g.get("share_passing")),
                        fmt_num(g.get("mean_pass_rate")),
                        str(g.get("problems_solved")),
                        fmt_num(g.get("mean_seq_prob")),
                    ]
                )
        if grows:
            B.append(
                Table(
                    [
                        "iteration",
                        "role",
                        "model",
                        "problems",
                        "programs",
                        "generated by this run",
                        "fully passing",
                        "mean pass rate",
                        "problems solved",
                        "mean sequence prob.",
                    ],
                    grows,
                    caption="generation + testing phase on the training problems (programs generated "
                    "elsewhere were reused from a shared cache or an earlier iteration)",
                    name="btp-generation",
                )
            )
        if "p2value_hist" in figs:
            B.append(
                Figure(
                    figs["p2value_hist"],
                    "P2Value of the replay buffer (blue) and of the programs drawn "
                    "for fine-tuning (orange), per iteration; draws are with replacement, so a program "
                    "drawn twice counts twice",
                )
            )
        if "sampling_stats" in figs:
            B.append(
                Figure(
                    figs["sampling_stats"],
                    "sampling statistics per iteration: shares of fully passing and "
                    "zero-pass programs and mean P2Value in the buffer and among the draws for fine-tuning; "
                    "counts and effective sample size of the draws",
                )
            )
        if "loss_curve" in figs:
            B.append(Figure(figs["loss_curve"], "fine-tuning loss per optimizer step"))
    return sec


# ----------------------------------------------------------------------------- baseline


def baseline_section(run_dir: Path, plot_dir: Path, name: str, level: int = 2) -> Section:
    run_dir = Path(run_dir)
    metrics = load_json(run_dir / "metrics.json") or {}
    config = load_json(run_dir / "config.json") or {}
    cfg = settings(config)
    proto = baseline_protocol(config, metrics)
    verdict = comparability(proto)
    model = cfg.get("model", "?")
    sec = Section()
    B = sec.blocks
    B.append(Heading(f"Baseline: {model} on {proto.dataset} — {name}", level))
    B.append(Para(f"Run directory: {run_dir}"))
    B += protocol_blocks(proto, verdict)
    items = [f"seed {cfg.get('seed')}, max_new_tokens {(cfg.get('sampling') or {}).get('max_new_tokens')}"]
    B.append(Bullets(items + _provenance(config)))
    ks = ks_of(metrics)
    base = metrics.get("base")
    rows = []
    for k in ks:
        e = Estimate.from_dict(metrics[k])
        row = [k, f"{e.value:.3f}", f"[{e.low:.3f}, {e.high:.3f}]"]
        if base:  # HumanEval+ / MBPP+: base beside plus
            b = Estimate.from_dict(base[k])
            row[1:1] = [f"{b.value:.3f}", f"[{b.low:.3f}, {b.high:.3f}]"]
        rows.append(row)
    caption = (
        f"{metrics.get('n_problems')} problems, {metrics.get('num_samples')} samples per problem; "
        "percentile bootstrap over problems"
    )
    if base:
        caption += "; base: the original tests' inputs, plus: base and EvalPlus's extra inputs (as evalplus judges)"
    head = ["metric", "base", "base 95% CI", "plus", "plus 95% CI"] if base else ["metric", "value", "95% CI"]
    B.append(Table(head, rows, caption=caption, name="baseline-passk"))
    flagged = metrics.get("evalplus_flagged_tasks") or {}
    if flagged:
        B.append(
            Para(
                "EvalPlus tests that lost inputs on this machine: "
                + "; ".join(f"{t}: {', '.join(f)}" for t, f in flagged.items()),
                "note",
            )
        )
    if ks:
        fig = plot_pass_at_k(
            [(model, metrics)],
            Path(plot_dir) / "pass_at_k.png",
            title=f"{model} on {proto.dataset} {proto.split}: pass@k (95% CI)",
        )
        B.append(Figure(fig, f"{model}: pass@k with 95% bootstrap CI"))
        k1 = ks[0]
        sec.summaries.append(
            Summary(
                name=name,
                kind="baseline",
                models=model,
                dataset=proto.dataset,
                protocol=proto.short(),
                comparable=verdict.level,
                after=_cell(metrics, k1) + (f" ({k1})" if k1 != "pass@1" else ""),
                base_after=(_cell(base, k1) + (f" ({k1})" if k1 != "pass@1" else "")) if base else "",
            )
        )
    return sec


# ----------------------------------------------------------------------------- ablation


def _variant_protocol(root: Path, run_dir: str | None, dataset: str) -> tuple[Protocol, Verdict] | None:
    if not run_dir:
        return None
    d = root / run_dir
    if not d.exists() and Path(run_dir).exists():  # recorded relative to the working directory
        d = Path(run_dir)
    comp = load_json(d / "comparison.json")
    config = load_json(d / "config.json")
    if not comp and not config:
        return None
    names = list((comp or {}).get("datasets") or {})
    ds = dataset if dataset in names or not names else names[0]
    ds = ds or str(settings(config).get("dataset", "?"))
    p = btp_protocol(config, comp, ds)
    return p, comparability(p)


def ablation_evalplus_blocks(a: Mapping[str, Any], ref: str) -> list[Block]:
    """The variants' HumanEval+ / MBPP+ evaluations: base beside plus pass@k, and the paired
    pass@1 differences to the reference (nothing when the ablation has no such set)."""
    cells = [(v, ds, c) for v in a.get("variants") or [] for ds, c in (v.get("evalplus") or {}).items()]
    if not cells:
        return []
    before = a.get("evalplus_before") or {}
    ks = ks_of(*[c.get(part) for _, _, c in cells for part in ("base", "plus")])

    def row(label: str, ds: str, n: Any, c: Mapping[str, Any], diffs: list[str]) -> list[str]:
        return [label, ds, str(n), *(_cell(c.get(part), k) for k in ks for part in ("base", "plus")), *diffs]

    rows = [row("target before BTP", ds, "-", b, ["-", "-"]) for ds, b in before.items()]
    for v, ds, c in cells:
        d = c.get("diff") or {}
        diffs = [
            fmt_diff(d[part].get("pass@1")) if part in d else ("reference" if v.get("name") == ref else "-")
            for part in ("base", "plus")
        ]
        rows.append(row(str(v.get("name", "?")), ds, c.get("n_problems", "-"), c, diffs))
    head = ["variant", "dataset", "tasks", *(f"{part} {k}" for k in ks for part in ("base", "plus"))]
    return [
        Table(
            [*head, "diff base pass@1 [95% CI]", "diff plus pass@1 [95% CI]"],
            rows,
            caption="HumanEval+ / MBPP+ pass@k (95% bootstrap CIs) of each variant's final target: base = the "
            "original tests' inputs, plus = base and EvalPlus's extra inputs, judged as evalplus judges; "
            "diff = paired difference to the reference",
            name="ablation-evalplus",
        )
    ]


def ablation_section(run_dir: Path, plot_dir: Path, name: str, level: int = 2) -> Section:
    run_dir = Path(run_dir)
    a = load_json(run_dir / "ablation.json")
    variants = a.get("variants") or []
    ref = a.get("reference", "full")
    sec = Section()
    B = sec.blocks
    B.append(Heading(f"Ablation of {a.get('base_config', '?')} — {name}", level))
    B.append(
        Para(
            f"Directory: {run_dir}. Dataset {a.get('dataset')}, {a.get('n_eval_problems')} held-out problems, "
            f"{a.get('eval_num_samples')} samples per problem; reference variant: {ref}. Differences are paired "
            "bootstrap CIs over the same problems (variant - reference)."
        )
    )
    refv = next((v for v in variants if v.get("name") == ref), None)
    pv = _variant_protocol(run_dir, (refv or {}).get("run_dir"), a.get("dataset", ""))
    if pv:
        B += protocol_blocks(*pv)
    else:
        p = Protocol(
            dataset=str(a.get("dataset")),
            split=str(a.get("eval_split") or "test"),
            n_problems=a.get("n_eval_problems"),
            num_samples=int(a.get("eval_num_samples") or 1),
            temperature=float(a.get("eval_temperature", 0.0) or 0.0),
            preset=a.get("eval_protocol"),
        )
        B += protocol_blocks(p, comparability(p))
    ks = ks_of(*[v.get("metrics") for v in variants])
    dks = ks_of(*[v.get("diff") for v in variants])
    rows = []
    for v in variants:
        m, d = v.get("metrics") or {}, v.get("diff") or {}
        rows.append(
            [
                v.get("name", "?"),
                str(v.get("group", "")),
                *(_cell(m, k) for k in ks),
                *(("reference" if v.get("name") == ref else fmt_diff(d.get(k))) for k in dks),
                str(v.get("generated_new", "-")),
                str(v.get("status", "-")),
            ]
        )
    B.append(
        Table(
            ["variant", "group", *ks, *(f"diff {k} [95% CI]" for k in dks), "new programs", "status"],
            rows,
            caption="pass@k with 95% bootstrap CI per variant; diff = paired difference to the reference",
            name="ablation",
        )
    )
    B += ablation_evalplus_blocks(a, ref)
    points = [
        (label, a.get(key))
        for label, key in (("target before BTP", "target_before"), ("source", "source"))
        if a.get(key)
    ]
    if points:
        pks = ks_of(*[m for _, m in points])
        B.append(
            Table(
                ["reference point", *pks],
                [[label, *(_cell(m, k) for k in pks)] for label, m in points],
                caption="the same held-out problems without BTP (the base target) and the source",
                name="ablation-points",
            )
        )
    done = [v for v in variants if (v.get("metrics") or {}).get("pass@1")]
    if done:
        before = (a.get("target_before") or {}).get("pass@1")
        fig = plot_ablation(
            done,
            Path(plot_dir) / "ablation_pass1.png",
            "pass@1",
            ref,
            title=f"{a.get('dataset')}: pass@1 per variant (95% CI); dashed line = {ref}",
            baseline=before["value"] if before else None,
        )
        B.append(
            Figure(fig, "ablation: pass@1 per variant with 95% bootstrap CIs; the reference hatched, its value dashed")
        )
    over = [
        [
            v.get("name", "?"),
            str(v.get("description", "")),
            ", ".join(f"{k}={val}" for k, val in (v.get("overrides") or {}).items()) or "-",
        ]
        for v in variants
    ]
    B.append(Table(["variant", "what it changes", "overrides of the base config"], over, name="ablation-overrides"))
    if refv and (refv.get("metrics") or {}).get("pass@1"):
        sec.summaries.append(
            Summary(
                name=name,
                kind="ablation (reference)",
                models=str(a.get("base_config")),
                dataset=str(a.get("dataset")),
                protocol=pv[0].short() if pv else "-",
                comparable=pv[1].level if pv else "-",
                after=_cell(refv["metrics"], "pass@1"),
            )
        )
    return sec


# ----------------------------------------------------------------------------- sweep


def sweep_section(run_dir: Path, plot_dir: Path, name: str, level: int = 2) -> Section:
    run_dir = Path(run_dir)
    s = load_json(run_dir / "sweep.json")
    trials = s.get("trials") or []
    sec = Section()
    B = sec.blocks
    B.append(Heading(f"Hyperparameter search {s.get('study_name', '')} — {name}", level))
    states: dict[str, int] = {}
    for t in trials:
        states[t.get("state", "?")] = states.get(t.get("state", "?"), 0) + 1
    B.append(
        Bullets(
            [
                f"directory: {run_dir}",
                f"objective: {s.get('objective')} ({s.get('direction')}); the test split is used only for "
                "the best trial, once",
                f"storage: {s.get('storage')}",
                "trials: " + ", ".join(f"{n} {st.lower()}" for st, n in sorted(states.items())),
            ]
            + [f"search space: {k}: {v}" for k, v in (s.get("search_space") or {}).items()]
        )
    )
    B.append(
        Para(
            "The objective is measured on the validation split: it selects hyperparameters and is not a "
            "held-out result; the best trial's test-split numbers below are.",
            "note",
        )
    )
    params = sorted({p for t in trials for p in (t.get("params") or {})})
    rows = []
    for t in sorted(trials, key=lambda t: t.get("number", 0)):
        inter = t.get("intermediate") or {}
        rows.append(
            [
                str(t.get("number")),
                str(t.get("state")) + (" (interrupted)" if t.get("interrupted") else ""),
                fmt_num(t.get("value")),
                *(fmt_param((t.get("params") or {}).get(p, "-")) for p in params),
                ", ".join(f"{k}: {float(v):.3f}" for k, v in sorted(inter.items(), key=lambda kv: int(kv[0]))) or "-",
            ]
        )
    B.append(
        Table(
            ["trial", "state", "objective", *params, "per-iteration values"],
            rows,
            caption=f"all trials; objective = {s.get('objective')}",
            name="sweep-trials",
        )
    )
    best = s.get("best")
    if best:
        B.append(Heading("Best configuration", level + 1))
        B.append(
            Table(
                ["parameter", "value"],
                [[k, fmt_param(v)] for k, v in (best.get("params") or {}).items()],
                caption=f"trial {best.get('number')}, objective {fmt_num(best.get('value'))}; saved as best.yaml",
                name="sweep-best",
            )
        )
        tm = best.get("test_metrics")
        if tm:
            ks = ks_of(tm)
            B.append(
                Table(
                    ["model", *ks],
                    [[f"best trial {best.get('number')} (test split)", *(_cell(tm, k) for k in ks)]],
                    caption="the best trial evaluated once on the test split (95% bootstrap CI)",
                    name="sweep-best-test",
                )
            )
            pv = _variant_protocol(run_dir, best.get("test_run_dir"), "") or _variant_protocol(
                run_dir,
                best.get("run_dir")
                or next((t.get("run_dir") for t in trials if t.get("number") == best.get("number")), None),
                "",
            )
            if pv:
                p = pv[0]
                p.split = "test"
                p.n_problems = tm.get("n_problems", p.n_problems)
                B += protocol_blocks(p, comparability(p))
            sec.summaries.append(
                Summary(
                    name=name,
                    kind="sweep (best, test)",
                    models=f"trial {best.get('number')}",
                    dataset="-",
                    protocol=pv[0].short() if pv else "-",
                    comparable=comparability(pv[0]).level if pv else "-",
                    after=_cell(tm, "pass@1"),
                )
            )
    if trials:
        fig = plot_sweep_history(
            trials,
            Path(plot_dir) / "sweep_history.png",
            s.get("direction", "maximize"),
            str(s.get("objective", "objective")),
        )
        B.append(Figure(fig, "optimisation history: objective per trial and the best so far"))
    if s.get("importances"):
        fig = plot_importance(s["importances"], Path(plot_dir) / "sweep_importance.png")
        B.append(Figure(fig, "hyperparameter importance for the objective"))
    return sec


# ----------------------------------------------------------------------------- matrix


def matrix_section(run_dir: Path, plot_dir: Path, name: str, level: int = 2) -> Section:
    run_dir = Path(run_dir)
    mx = load_json(run_dir / "matrix.json")
    rows_in = mx.get("rows") or []
    sec = Section()
    B = sec.blocks
    B.append(Heading(f"Pairing matrix — {name}", level))
    B.append(
        Para(
            f"Directory: {run_dir}. Each row is one BTP run: the target's pass@1 before and after, and the "
            "paired difference (95% CI) over the same held-out problems."
        )
    )
    rows, plot_rows = [], []
    for r in rows_in:
        pv = _variant_protocol(run_dir, r.get("run_dir"), r.get("dataset", ""))
        rows.append(
            [
                str(r.get("config")),
                str(r.get("source")),
                str(r.get("target")),
                "yes" if r.get("same_family") else "no",
                str(r.get("dataset")),
                _one(r.get("before")),
                _one(r.get("after")),
                fmt_diff(_imp(r.get("gain"))),
                pv[1].level if pv else "-",
                str(r.get("status", "-")),
            ]
        )
        b, a = _as_metrics(r.get("before")), _as_metrics(r.get("after"))
        if b and a:
            plot_rows.append((f"{r.get('source')}\n-> {r.get('target')}", b, a))
        if r.get("after"):
            sec.summaries.append(
                Summary(
                    name=f"{name}/{r.get('config')}",
                    kind="matrix row",
                    models=f"{r.get('source')} -> {r.get('target')}",
                    dataset=str(r.get("dataset")),
                    protocol=pv[0].short() if pv else "-",
                    comparable=pv[1].level if pv else "-",
                    before=rows[-1][5],
                    after=rows[-1][6],
                    gain=rows[-1][7],
                )
            )
    B.append(
        Table(
            [
                "config",
                "source",
                "target",
                "same family",
                "dataset",
                "before pass@1",
                "after pass@1",
                "gain [95% CI]",
                "comparable",
                "status",
            ],
            rows,
            caption="pass@1 with 95% bootstrap CIs",
            name="matrix",
        )
    )
    plus_rows = []
    for r in rows_in:
        for ds, c in (r.get("evalplus") or {}).items():
            pv = _variant_protocol(run_dir, r.get("run_dir"), ds)
            b, p = c.get("base") or {}, c.get("plus") or {}
            plus_rows.append(
                [
                    str(r.get("config")),
                    ds,
                    pv[0].short() if pv else str(c.get("n_problems", "-")),
                    _one(b.get("before")),
                    _one(b.get("after")),
                    fmt_diff(_imp(b.get("gain"))),
                    _one(p.get("before")),
                    _one(p.get("after")),
                    fmt_diff(_imp(p.get("gain"))),
                ]
            )
    if plus_rows:
        B.append(
            Table(
                [
                    "config",
                    "dataset",
                    "protocol",
                    "base before",
                    "base after",
                    "base gain [95% CI]",
                    "plus before",
                    "plus after",
                    "plus gain [95% CI]",
                ],
                plus_rows,
                caption="HumanEval+ / MBPP+ pass@1 (95% bootstrap CIs): base = the original tests' inputs, "
                "plus = base and EvalPlus's extra inputs, judged as evalplus judges",
                name="matrix-evalplus",
            )
        )
    if plot_rows:
        fig = plot_before_after(
            plot_rows,
            Path(plot_dir) / "matrix_pass1.png",
            "pass@1",
            "pairings: target pass@1 before and after BTP (95% CI)",
        )
        B.append(Figure(fig, "pass@1 of each target before and after BTP"))
    return sec


def _as_metrics(m: Any) -> dict[str, Any] | None:
    """A matrix cell is an estimate ({value, ci_low, ci_high}) or a pass@k report ({"pass@1": estimate})."""
    if not m:
        return None
    if "pass@1" in m:
        return m
    if "value" in m:
        return {"pass@1": m}
    return None


def _one(m: Any) -> str:
    return _cell(_as_metrics(m), "pass@1")


def _imp(g: Any) -> Any:
    if g and "pass@1" in g and isinstance(g["pass@1"], Mapping):
        return g["pass@1"]
    return g


SECTION_BUILDERS: dict[str, Callable[..., Section]] = {
    "btp": btp_section,
    "baseline": baseline_section,
    "ablation": ablation_section,
    "sweep": sweep_section,
    "matrix": matrix_section,
}
