"""``codedistill matrix CONFIG... --output-dir OUT``: several experiments, one table.

Each config runs as its own run directory (the config's ``output_dir`` if it sets one,
else ``OUT/runs/<config stem>``; rerunning resumes each) and contributes one row: source,
target, whether they are of the same model family, the target's pass@1 before and after
BTP on the training dataset's held-out split, and the paired gain with its 95% CI; the
run's HumanEval+ / MBPP+ evaluations follow in a second table, base and plus side by side. A
config that fails (an API model with no backend here, no GPU, ...) keeps its row with the
error as its status, and the others still run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from codedistill.btp.config import load_config_file
from codedistill.experiments.run import load_experiment, run_experiment
from codedistill.models.registry import resolve_model
from codedistill.report.format import fmt_diff, fmt_metric
from codedistill.runs import write_json

Log = Callable[[str], None]


def run_matrix(
    configs: Sequence[str | Path], output_dir: str | Path, overrides: Mapping[str, Any] | None = None, log: Log = print
) -> dict[str, Any]:
    out = Path(output_dir)
    rows: list[dict[str, Any]] = []
    for path in configs:
        row: dict[str, Any] = {
            "config": str(path),
            "run_dir": None,
            "source": None,
            "target": None,
            "same_family": None,
            "dataset": None,
            "before": None,
            "after": None,
            "gain": None,
            "status": "pending",
        }
        try:
            raw = load_config_file(path)
            odir = (
                None if raw.get("output_dir") or (overrides or {}).get("output_dir") else out / "runs" / Path(path).stem
            )
            cfg = load_experiment(path, overrides, output_dir=odir)
            src = resolve_model(cfg.source_model, cfg.source_variant)
            tgt = resolve_model(cfg.target_model, cfg.target_variant)
            row.update(
                run_dir=str(cfg.output_dir),
                source=src.alias,
                target=tgt.alias,
                same_family=src.family == tgt.family,
                dataset=cfg.dataset,
            )
            log(f"=== matrix: {path} ({src.alias} -> {tgt.alias})")
            comp = run_experiment(cfg, log=log)
            e = comp["datasets"][cfg.dataset]
            row.update(
                before=e["target_before"]["pass@1"],
                after=e["target_after"]["pass@1"],
                gain=e["improvement"]["pass@1"],
                status="done",
                eval_protocol=cfg.eval_protocol,
                evalplus=evalplus_cells(comp),
            )
        except Exception as e:  # noqa: BLE001 - one failing pairing does not stop the matrix
            row["status"] = f"failed: {type(e).__name__}: {e}"
            log(f"{path}: {row['status']}")
        rows.append(row)
        write_outputs(out, rows)
    return write_outputs(out, rows)


def evalplus_cells(comparison: Mapping[str, Any]) -> dict[str, Any]:
    """Per HumanEval+ / MBPP+ set of a run: pass@1 before, after and the paired gain, for
    ``base`` and ``plus``, and how many tasks it kept."""
    out: dict[str, Any] = {}
    for ds, e in comparison["datasets"].items():
        if "improvement_base" not in e or "pass@1" not in e["improvement"]:
            continue
        before, after = e["target_before"], e["target_after"]
        out[ds] = {
            "n_problems": e["n_problems"],
            "base": {
                "before": before["base"]["pass@1"],
                "after": after["base"]["pass@1"],
                "gain": e["improvement_base"]["pass@1"],
            },
            "plus": {"before": before["pass@1"], "after": after["pass@1"], "gain": e["improvement"]["pass@1"]},
        }
    return out


def write_outputs(out: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {"kind": "matrix", "rows": rows}
    write_json(out / "matrix.json", summary)
    lines = [
        "# BTP across pairings",
        "",
        "pass@1 of the target on the training dataset's held-out split, before and after BTP "
        "(95% bootstrap CI); gain: paired bootstrap over the same problems.",
        "",
        "| config | source | target | same family | dataset | before | after | gain | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fam = "-" if r["same_family"] is None else ("yes" if r["same_family"] else "no")
        lines.append(
            f"| {Path(r['config']).name} | {r['source'] or '-'} | {r['target'] or '-'} | {fam} | "
            f"{r['dataset'] or '-'} | {fmt_metric(r['before'])} | {fmt_metric(r['after'])} | "
            f"{fmt_diff(r['gain'])} | {r['status']} |"
        )
    plus_rows = [(r, ds, c) for r in rows for ds, c in (r.get("evalplus") or {}).items()]
    if plus_rows:
        lines += [
            "",
            "HumanEval+ / MBPP+ (EvalPlus): pass@1 before and after BTP, base (the original tests' inputs) "
            "beside plus (base and EvalPlus's extra inputs); gain: paired bootstrap.",
            "",
            "| config | dataset | tasks | base before | base after | base gain "
            "| plus before | plus after | plus gain |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r, ds, c in plus_rows:
            b, p = c["base"], c["plus"]
            lines.append(
                f"| {Path(r['config']).name} | {ds} | {c['n_problems']} | {fmt_metric(b['before'])} | "
                f"{fmt_metric(b['after'])} | {fmt_diff(b['gain'])} | {fmt_metric(p['before'])} | "
                f"{fmt_metric(p['after'])} | {fmt_diff(p['gain'])} |"
            )
    (out / "matrix.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "matrix.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary
