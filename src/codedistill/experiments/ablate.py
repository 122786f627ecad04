"""``codedistill ablate CONFIG.yaml``: step 3, which of BTP's components matter.

Every variant (see :mod:`codedistill.experiments.variants`) is a run directory under
``OUT/variants/<name>/`` that shares ``OUT/cache/`` (the generation cache): the source's
beams and verdicts and the before/source evaluations are generated once, and a variant
that only changes replay or training generates nothing but its own after-evaluation.
Variants with identical resolved settings share one run. The table compares each
variant's final target with the full method's on the same problems and the same
evaluation seeds (paired bootstrap). Rerunning the command resumes.

Several workers (``--worker``, on one machine or many, one shared ``OUT``) share out the
variants: each claims the next unfinished one atomically (:mod:`codedistill.experiments.claims`),
runs it and claims the next; a dead worker's claim is taken over; the last variant's worker
writes the table, once.

The table is on the training dataset's held-out split; the run's HumanEval+ / MBPP+
evaluations (the paper preset, or ``eval_datasets``) follow in a second table, base beside
plus, each with its paired difference to the full method.

Output (SCHEMAS.md): ``ablation.json``, ``ablation.md``, ``plots/ablation_pass1.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from codedistill.btp.config import BTPConfig, build_config
from codedistill.btp.gencache import cache_key
from codedistill.btp.loop import run_btp
from codedistill.errors import ConfigError
from codedistill.experiments.claims import DEFAULT_LEASE, holder, owner_text, run_once, try_claim, wait_poll
from codedistill.experiments.grpo import run_grpo
from codedistill.experiments.run import ensure_models, generated_total, load_experiment
from codedistill.experiments.variants import select
from codedistill.metrics import counts_from_results, paired_bootstrap
from codedistill.report.format import fmt_diff, fmt_metric
from codedistill.report.plots import plot_ablation as draw
from codedistill.runs import read_jsonl, write_json, write_text

Log = Callable[[str], None]


def final_counts(
    run_dir: Path, comparison: Mapping[str, Any], ds: str, key: str = "passed"
) -> dict[str, tuple[int, int]]:
    """(n, c) per problem of a run's last evaluation of the target (``key``: ``passed``, or
    ``base_passed`` for the base verdicts of HumanEval+ / MBPP+)."""
    stage = f"target_iter{comparison['n_iterations']}"
    return dict(counts_from_results(read_jsonl(run_dir / "eval" / stage / ds / "results.jsonl"), key=key))


def evalplus_sets(comparison: Mapping[str, Any]) -> list[str]:
    """The run's held-out sets judged as EvalPlus judges (their reports carry ``base``)."""
    return [ds for ds, e in comparison["datasets"].items() if "base" in (e.get("target_after") or {})]


def _pass(report: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (report or {}).items() if k.startswith("pass@")}


def evalplus_entry(
    run_dir: Path,
    comparison: Mapping[str, Any],
    ref_dir: Path | None,
    ref_comparison: Mapping[str, Any] | None,
    ref: BTPConfig,
) -> dict[str, Any]:
    """Per HumanEval+ / MBPP+ set of a variant's run: its final target's pass@k, ``base``
    beside ``plus``, and (given the full method's run) the paired differences to it."""
    out: dict[str, Any] = {}
    for ds in evalplus_sets(comparison):
        after = comparison["datasets"][ds]["target_after"]
        cell: dict[str, Any] = {
            "n_problems": comparison["datasets"][ds].get("n_problems"),
            "base": _pass(after.get("base")),
            "plus": _pass(after),
            "diff": None,
        }
        if ref_dir is not None and ref_comparison is not None and ds in evalplus_sets(ref_comparison):
            cell["diff"] = {}
            for part, key in (("base", "base_passed"), ("plus", "passed")):
                mine = final_counts(run_dir, comparison, ds, key)
                theirs = final_counts(ref_dir, ref_comparison, ds, key)
                if mine and theirs:
                    cell["diff"][part] = {
                        f"pass@{k}": paired_bootstrap(theirs, mine, k=k, seed=ref.seed).to_dict() for k in ref.ks()
                    }
        out[ds] = cell
    return out


def plan_variants(
    config_path: str | Path, out: Path, names: str | None, overrides: Mapping[str, Any] | None = None
) -> tuple[BTPConfig, list[dict[str, Any]]]:
    """The reference config and one row per selected variant: its config (or why it is
    skipped) and the run directory it uses (shared when its settings equal an earlier one's)."""
    ref = load_experiment(
        config_path, {**(overrides or {}), "generation_cache": str(out / "cache")}, output_dir=out / "variants" / "full"
    )
    base = ref.model_dump()
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for v in select(names):
        row: dict[str, Any] = {
            "name": v.name,
            "group": v.group,
            "description": v.description,
            "overrides": dict(v.overrides),
            "kind": v.kind,
            "variant": v,
        }
        why = v.applies(ref)
        if why:
            row.update(status=f"skipped: {why}", cfg=None, run_name=None)
            rows.append(row)
            continue
        cfg = build_config({**base, **v.overrides, "output_dir": str(out / "variants" / v.name)}, {})
        key = v.kind + json.dumps(cfg.experiment_dict(), sort_keys=True, default=str)
        if key in seen:
            row.update(
                cfg=cfg,
                run_name=seen[key],
                status="pending",
                description=f"{v.description} (same settings as {seen[key]})",
            )
        else:
            seen[key] = v.name
            row.update(cfg=cfg, run_name=v.name, status="pending")
        rows.append(row)
    return ref, rows


def run_ablation(
    config_path: str | Path,
    output_dir: str | Path,
    variants: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    log: Log = print,
    table_only: bool = False,
    worker: bool = False,
    lease: float = DEFAULT_LEASE,
) -> dict[str, Any]:
    """Run (or resume) every selected variant and write the table. ``table_only``: run
    nothing, tabulate the variants whose run directories are finished (the others are
    listed as not run). ``worker``: one of several workers sharing ``output_dir``
    (:func:`run_worker`)."""
    if worker and table_only:
        raise ConfigError("--worker runs variants and --table-only runs none: pass one of them")
    out = Path(output_dir)
    ref, rows = plan_variants(config_path, out, variants, overrides)
    ensure_models(ref)
    if worker:
        return run_worker(out, config_path, ref, rows, lease, log)
    results: dict[str, dict[str, Any]] = {}  # run name -> comparison
    errors: dict[str, str] = {}
    t0 = time.time()
    for row in rows:
        if row["cfg"] is None or row["run_name"] in results or row["run_name"] in errors:
            continue
        name = row["run_name"]
        if table_only:
            comp_path = out / "variants" / name / "comparison.json"
            if comp_path.exists():
                results[name] = json.loads(comp_path.read_text())
            continue
        log(f"=== ablation variant {name}: {row['description']}")
        t = time.time()
        try:
            fn = run_grpo if row["kind"] == "grpo" else run_btp
            results[name] = fn(row["cfg"], log=log)
        except Exception as e:  # one variant's failure does not stop the others
            errors[name] = f"{type(e).__name__}: {e}"
            log(f"variant {name} failed: {errors[name]}")
        log(f"=== variant {name} finished in {time.time() - t:.0f} s")
        write_outputs(out, config_path, ref, rows, results, errors)
    summary = write_outputs(out, config_path, ref, rows, results, errors)
    log(f"ablation done in {time.time() - t0:.0f} s: {out / 'ablation.md'}")
    return summary


def run_worker(
    out: Path, config_path: str | Path, ref: BTPConfig, rows: list[dict[str, Any]], lease: float, log: Log
) -> dict[str, Any]:
    """Claim the next unfinished variant (``OUT/claims/variant-<name>.lock``), run it, claim the
    next; with none left to claim, wait for the variants other workers run (taking over the
    claim of one that dies: the variant resumes from its run directory). A variant is finished
    when its run directory holds comparison.json, failed when ``claims/variant-<name>.failed``
    holds its error (delete that file to retry it). The table is written once, by whichever
    worker sees the last variant finish (``claims/table-<hash>.done``)."""
    claims = out / "claims"
    jobs: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["cfg"] is not None and row["run_name"] not in jobs:
            jobs[row["run_name"]] = row

    def finished(name: str) -> bool:
        return (out / "variants" / name / "comparison.json").exists()

    def failure(name: str) -> str | None:
        p = claims / f"variant-{name}.failed"
        return p.read_text(encoding="utf-8").strip() if p.exists() else None

    waiting: list[str] = []
    ran: list[str] = []
    while True:
        todo = [n for n in jobs if not finished(n) and failure(n) is None]
        if not todo:
            break
        claim = None
        for name in todo:
            claim = try_claim(claims, f"variant-{name}", lease, log)
            if claim is not None:
                break
        if claim is None:
            held = [f"{n} ({holder(claims, f'variant-{n}') or '?'})" for n in todo]
            if held != waiting:
                log(f"every unfinished variant is claimed: waiting for {', '.join(held)}")
                waiting = held
            time.sleep(wait_poll(lease))
            continue
        with claim:
            if finished(name) or failure(name) is not None:
                continue  # finished by another worker between the look and the claim
            row = jobs[name]
            log(
                f"=== ablation variant {name} (worker {owner_text(claim.rec)}"
                + (f", taken over from {claim.taken_over}" if claim.taken_over else "")
                + f"): {row['description']}"
            )
            t = time.time()
            ran.append(name)
            try:
                fn = run_grpo if row["kind"] == "grpo" else run_btp
                fn(row["cfg"], log=log)
            except Exception as e:  # one variant's failure does not stop the others
                write_text(claims / f"variant-{name}.failed", f"{type(e).__name__}: {e}\n")
                log(f"variant {name} failed: {type(e).__name__}: {e} (delete claims/variant-{name}.failed to retry)")
            log(f"=== variant {name} finished in {time.time() - t:.0f} s")

    results = {n: json.loads((out / "variants" / n / "comparison.json").read_text()) for n in jobs if finished(n)}
    errors = {n: err for n in jobs if not finished(n) and (err := failure(n)) is not None}
    state = sorted((n, "done" if n in results else errors[n]) for n in jobs)
    job = "table-" + cache_key({"base_config": str(config_path), "variants": [r["name"] for r in rows], "state": state})
    if not run_once(claims, job, lambda: write_outputs(out, config_path, ref, rows, results, errors), lease, log):
        by = json.loads((claims / f"{job}.done").read_text(encoding="utf-8")).get("by")
        log(
            f"every variant is finished and the table was written by {by}"
            if ran
            else f"every variant is finished and the table written by {by} (claims/{job}.done): nothing to run"
        )
    return json.loads((out / "ablation.json").read_text(encoding="utf-8"))


def write_outputs(
    out: Path,
    config_path: str | Path,
    ref: BTPConfig,
    rows: list[dict[str, Any]],
    results: Mapping[str, Any],
    errors: Mapping[str, str],
) -> dict[str, Any]:
    ds = ref.dataset
    ref_comp = results.get("full")
    ref_counts = final_counts(out / "variants" / "full", ref_comp, ds) if ref_comp else None
    table = []
    for row in rows:
        name = row["run_name"]
        entry: dict[str, Any] = {k: row[k] for k in ("name", "group", "description", "overrides")}
        entry["run_dir"] = f"variants/{name}" if name else None
        entry["metrics"], entry["diff"], entry["generated_new"], entry["evalplus"] = {}, None, 0, {}
        if row["cfg"] is None:
            entry["status"] = row["status"]
        elif name in errors:
            entry["status"] = f"failed: {errors[name]}"
        elif name not in results:
            entry["status"] = "not run"
        else:
            comp = results[name]
            e = comp["datasets"][ds]
            entry["status"] = "done"
            entry["metrics"] = {k: v for k, v in e["target_after"].items() if k.startswith("pass@")}
            run_dir = out / "variants" / name
            entry["generated_new"] = generated_total(run_dir) if name == row["name"] else 0
            last = read_jsonl(run_dir / "generated.jsonl")
            entry["generated_new_last_start"] = int(last[-1]["total"]) if last and name == row["name"] else 0
            if row["name"] != "full" and ref_counts is not None:
                counts = final_counts(run_dir, comp, ds)
                entry["diff"] = {
                    f"pass@{k}": paired_bootstrap(ref_counts, counts, k=k, seed=ref.seed).to_dict() for k in ref.ks()
                }
            is_ref = row["name"] == "full"
            ref_dir = out / "variants" / "full" if ref_comp and not is_ref else None
            entry["evalplus"] = evalplus_entry(run_dir, comp, ref_dir, None if is_ref else ref_comp, ref)
        table.append(entry)
    before = source = None
    evalplus_before: dict[str, Any] = {}
    if ref_comp:
        e = ref_comp["datasets"][ds]
        before = {k: v for k, v in e["target_before"].items() if k.startswith("pass@")}
        source = {k: v for k, v in e.get("source", {}).items() if k.startswith("pass@")} or None
        for pds in evalplus_sets(ref_comp):
            b = ref_comp["datasets"][pds]["target_before"]
            evalplus_before[pds] = {"base": _pass(b.get("base")), "plus": _pass(b)}
    summary = {
        "kind": "ablation",
        "base_config": str(config_path),
        "dataset": ds,
        "n_eval_problems": ref_comp["datasets"][ds]["n_problems"] if ref_comp else None,
        "eval_num_samples": ref.eval_num_samples,
        "eval_temperature": ref.eval_temperature,
        "eval_protocol": ref.eval_protocol,
        "eval_split": ref.eval_split,
        "reference": "full",
        "target_before": before,
        "source": source,
        "evalplus_before": evalplus_before,
        "variants": table,
    }
    write_json(out / "ablation.json", summary)
    write_text(out / "ablation.md", ablation_markdown(summary, ref))
    try:
        plot_ablation(summary, out / "plots" / "ablation_pass1.png")
    except Exception:  # noqa: BLE001 - a plot never fails the ablation
        pass
    return summary


def ablation_markdown(s: Mapping[str, Any], ref: BTPConfig) -> str:
    ks = [f"pass@{k}" for k in ref.ks()]
    lines = [
        f"# Ablation of {s['base_config']}",
        "",
        f"- target {ref.target_model}, source {ref.source_model}, trained on {ref.dataset} "
        f"({ref.max_problems or 'all'} problems), evaluated on {s['n_eval_problems']} held-out problems "
        f"({s['eval_split']} split), {s['eval_num_samples']} samples at T={s['eval_temperature']:g} "
        f"(protocol {s['eval_protocol']}); 95% bootstrap CIs over problems.",
        "- diff: the variant minus the full method on the same problems and evaluation seeds (paired bootstrap).",
        "",
    ]
    if s.get("target_before"):
        lines.append(
            "- target before training: " + ", ".join(f"{k} {fmt_metric(s['target_before'].get(k))}" for k in ks)
        )
    if s.get("source"):
        lines.append("- source (teacher): " + ", ".join(f"{k} {fmt_metric(s['source'].get(k))}" for k in ks))
    lines += [
        "",
        "| variant | group | " + " | ".join(ks) + " | diff pass@1 vs full | generated | status |",
        "|---|---|" + "---|" * len(ks) + "---|---|---|",
    ]
    for v in s["variants"]:
        m = v["metrics"]
        d = (v["diff"] or {}).get("pass@1")
        lines.append(
            f"| {v['name']} | {v['group']} | "
            + " | ".join(fmt_metric(m.get(k)) for k in ks)
            + f" | {fmt_diff(d) if d else '-'} | {v['generated_new']} | {v['status']} |"
        )
    lines += evalplus_markdown(s, ks)
    lines += ["", "Variants:", ""] + [f"- **{v['name']}**: {v['description']}" for v in s["variants"]]
    return "\n".join(lines) + "\n"


def evalplus_markdown(s: Mapping[str, Any], ks: list[str]) -> list[str]:
    """The HumanEval+ / MBPP+ table: per variant and set, base beside plus pass@k and the
    paired pass@1 differences to the full method (none when the run has no such set)."""
    cells = [(v, ds, c) for v in s["variants"] for ds, c in (v.get("evalplus") or {}).items()]
    if not cells:
        return []
    lines = [
        "",
        "HumanEval+ / MBPP+ (EvalPlus): pass@k of each variant's final target, base (the original tests' "
        "inputs) beside plus (base and EvalPlus's extra inputs); diff: paired bootstrap vs the full method.",
        "",
        "| variant | dataset | tasks | "
        + " | ".join(f"{part} {k}" for k in ks for part in ("base", "plus"))
        + " | diff base pass@1 | diff plus pass@1 |",
        "|---|---|---|" + "---|" * (2 * len(ks)) + "---|---|",
    ]
    for ds, b in (s.get("evalplus_before") or {}).items():
        lines.append(
            f"| target before training | {ds} | - | "
            + " | ".join(fmt_metric(b[part].get(k)) for k in ks for part in ("base", "plus"))
            + " | - | - |"
        )
    for v, ds, c in cells:
        d = c.get("diff") or {}
        diffs = [
            ("reference" if v["name"] == s.get("reference", "full") else "-")
            if part not in d
            else fmt_diff(d[part].get("pass@1"))
            for part in ("base", "plus")
        ]
        lines.append(
            f"| {v['name']} | {ds} | {c.get('n_problems', '-')} | "
            + " | ".join(fmt_metric(c[part].get(k)) for k in ks for part in ("base", "plus"))
            + f" | {diffs[0]} | {diffs[1]} |"
        )
    return lines


def plot_ablation(s: Mapping[str, Any], path: Path) -> None:
    """The bar plot of the finished variants (drawn by the report's plot_ablation)."""
    done = [v for v in s["variants"] if v["status"] == "done" and "pass@1" in v["metrics"]]
    if not done:
        return
    before = (s.get("target_before") or {}).get("pass@1")
    draw(
        done,
        path,
        metric="pass@1",
        reference=s.get("reference", "full"),
        title=f"Ablation: {Path(s['base_config']).name} on {s['dataset']}",
        baseline=before["value"] if before else None,
    )
