"""Typer commands ``run``, ``matrix``, ``ablate``, ``sweep`` (registered by codedistill.cli)
and standalone apps for experiments/step3_ablation_experiment.py and step4_hparam_search.py."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from codedistill.experiments.claims import DEFAULT_LEASE, LEASE_HELP
from codedistill.ui import console, friendly_errors

O = typer.Option  # noqa: E741
SET_HELP = "Override one setting: --set key=value (YAML value; repeatable), e.g. --set sampling_alpha=3."


def _log(m: str) -> None:
    console.print(m, highlight=False, markup=False)


@friendly_errors
def run_command(
    config: Path = typer.Argument(..., help="Experiment YAML (configs/demo.yaml, configs/btp_*.yaml)."),
    set_: list[str] | None = O(None, "--set", help=SET_HELP),
    output_dir: Path | None = O(
        None,
        "--output-dir",
        help="Run directory (default: the config's output_dir, else results/run/<config name>). Rerun to resume.",
    ),
) -> None:
    """A whole experiment from a config: source and target evaluated (step 1), BTP, the target
    evaluated after each iteration, report.md and plots; resumes and skips what is done."""
    from codedistill.experiments.run import load_experiment, parse_sets, run_experiment, summary_lines

    cfg = load_experiment(config, parse_sets(set_), output_dir)
    comp = run_experiment(cfg, log=_log)
    for line in summary_lines(comp):
        typer.echo(line)
    typer.echo(f"run directory: {cfg.output_dir}")


@friendly_errors
def matrix_command(
    configs: list[Path] = typer.Argument(..., help="Experiment YAMLs, one run each."),
    output_dir: Path = O(Path("results/matrix"), "--output-dir", help="Where matrix.json/.md (and runs/) go."),
    set_: list[str] | None = O(None, "--set", help=SET_HELP + " Applies to every config."),
) -> None:
    """Several experiments and one cross-run table (source, target, family match, before, after, gain)."""
    from codedistill.experiments.matrix import run_matrix
    from codedistill.experiments.run import parse_sets

    run_matrix(configs, output_dir, parse_sets(set_), log=_log)
    typer.echo((output_dir / "matrix.md").read_text())


@friendly_errors
def ablate_command(
    config: Path = typer.Argument(..., help="The full method's config (the reference)."),
    variants: str = O(
        "all",
        "--variants",
        help="Comma-separated variant names, or all (every variant that applies). Unknown names list the valid ones.",
    ),
    output_dir: Path = O(
        Path("results/ablation"), "--output-dir", help="OUT: variants/<name>/, ablation.json/.md, plots/."
    ),
    set_: list[str] | None = O(None, "--set", help=SET_HELP + " Applies to every variant."),
    table_only: bool = O(
        False,
        "--table-only",
        help="Run nothing: tabulate the variants whose run "
        "directories are finished (e.g. while or after other workers run the rest).",
    ),
    worker: bool = O(
        False,
        "--worker",
        help="One of several workers sharing OUT (processes or machines): claim the next unfinished "
        "variant (a lock in OUT/claims/), run it, claim the next; the last one to finish writes the table.",
    ),
    lease: float = O(DEFAULT_LEASE, "--lease", min=1, help=LEASE_HELP),
) -> None:
    """Step 3: ablations of BTP's components, sharing generations; a table with paired CIs."""
    from codedistill.experiments.ablate import run_ablation
    from codedistill.experiments.run import parse_sets

    run_ablation(
        config, output_dir, variants, parse_sets(set_), log=_log, table_only=table_only, worker=worker, lease=lease
    )
    typer.echo((output_dir / "ablation.md").read_text())


@friendly_errors
def sweep_command(
    config: Path = typer.Argument(..., help="The config whose settings are searched around."),
    trials: int = O(20, "--trials", min=1, help="Trials in total (finished ones count; rerun to resume)."),
    output_dir: Path = O(
        Path("results/sweep"), "--output-dir", help="OUT: trials/<n>/, sweep.json/.md, best.yaml, plots/."
    ),
    storage: str | None = O(
        None,
        "--storage",
        help="Journal file path (default OUT/optuna_journal.log) or a database URL "
        "(postgresql://user:password@host/db) shared by workers on several machines (pip install "
        "'codedistill[cluster]'). Start any number of workers with the same --storage and --output-dir.",
    ),
    study_name: str | None = O(None, "--study-name", help="Default: btp-sweep-<config name>."),
    cache_dir: Path | None = O(
        None,
        "--cache-dir",
        help="Generation cache (default OUT/cache); point it at an ablation's OUT/cache to reuse its generations.",
    ),
    set_: list[str] | None = O(None, "--set", help=SET_HELP),
    evaluate_best: bool = O(
        True, "--evaluate-best/--no-evaluate-best", help="Evaluate the best trial on the test split."
    ),
    lease: float = O(DEFAULT_LEASE, "--lease", min=1, help=LEASE_HELP),
) -> None:
    """Step 4: Optuna (TPE) over sampling alpha, p2 alpha, replay size, lr, LoRA rank, epochs,
    beam width; objective: validation pass@1; the best trial evaluated once on test."""
    from codedistill.experiments.run import parse_sets
    from codedistill.experiments.sweep import run_sweep

    summary = run_sweep(
        config,
        output_dir,
        trials,
        storage=storage,
        overrides=parse_sets(set_),
        cache_dir=cache_dir,
        study_name=study_name,
        evaluate_best=evaluate_best,
        log=_log,
        lease=lease,
    )
    if summary is not None:
        typer.echo((output_dir / "sweep.md").read_text())


def _app(name: str, fn) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name=name)(fn)
    return app


def main_ablate(argv: list[str] | None = None) -> None:
    _app("ablate", ablate_command)(
        list(sys.argv[1:] if argv is None else argv), prog_name="step3_ablation_experiment.py"
    )


def main_sweep(argv: list[str] | None = None) -> None:
    _app("sweep", sweep_command)(list(sys.argv[1:] if argv is None else argv), prog_name="step4_hparam_search.py")
