"""One experiment, whatever trains the target: the run directory, the sandbox pool, the
evaluations before and after each iteration, the DONE markers, and the comparison.

The training itself is a :class:`TrainingStep`: BTP's replay + fine-tune
(:class:`codedistill.btp.loop.ReplayFinetune`) or GRPO (``codedistill.experiments.grpo``).

Resume: an iteration with a DONE marker is never redone (its stats are read back and its
evaluation records reused); one without is trained again by the step, which reuses what
it finds in ``iter_K/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from codedistill.baseline import record_generation
from codedistill.btp.gencache import GenerationCache
from codedistill.btp.models import GeneratorCache
from codedistill.btp.phases.evaluate import Evaluation, build_comparison, evaluate
from codedistill.btp.plan import ResolvedInputs
from codedistill.btp.state import RunState
from codedistill.btp.tracking import log_iteration
from codedistill.evaluation import warm_targets
from codedistill.execution import Limits, SandboxPool
from codedistill.models.loading import quiet_transformers
from codedistill.runs import JsonlWriter, RunDir, write_json
from codedistill.ui import RunPlan

Log = Callable[[str], None]
#: called after iteration k's evaluation with {dataset: pass@k report}; raising stops the run
OnIteration = Callable[[int, dict[str, Any]], None]


class TrainingStep(Protocol):
    def train(self, run: RunState, k: int) -> dict[str, Any]:
        """Iteration ``k``: train the target from iteration ``k - 1``'s weights and save them
        in ``iter_K/`` (``adapter/`` or ``model/``); the iteration's statistics."""
        ...

    def comparison_fields(self, stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """What this kind of training adds to comparison.json."""
        ...

    def close(self) -> None:
        """Release what the step holds (files), also after a failure."""
        ...


@dataclass
class Outcome:
    comparison: dict[str, Any]  # comparison.json's content
    stats: list[dict[str, Any]]  # iter_K/stats.json of every iteration


def open_run_dir(inputs: ResolvedInputs, config: Mapping[str, Any], kind: str) -> bool:
    """Create (or resume: True) the run directory, refusing one made with other settings."""
    quiet_transformers()
    return RunDir(inputs.out).open(config, kind=kind)


def run_experiment(
    inputs: ResolvedInputs,
    step: TrainingStep,
    log: Log,
    estimate: RunPlan | None = None,
    on_iteration: OnIteration | None = None,
) -> Outcome:
    """Evaluate the target (and the source if asked), then per iteration train with ``step``
    and evaluate again; write comparison.json."""
    cfg = inputs.cfg
    run = RunState(
        inputs,
        GeneratorCache(inputs, log),
        SandboxPool(
            workers=cfg.workers,
            limits=Limits(timeout=cfg.timeout),
            warm_targets=warm_targets(p for ps in inputs.evals.values() for p in ps),
        ),
        log,
        estimate=estimate,
        cache=GenerationCache(cfg.generation_cache) if cfg.generation_cache else None,
    )
    try:
        evals = {"target_iter0": evaluate(run, lambda: run.models.target(0), inputs.target_spec, "target_iter0")}
        if cfg.eval_source:
            evals["source"] = evaluate(run, run.models.source, inputs.source_spec, "source")
        stats = [_iteration(run, step, k, evals, on_iteration) for k in range(1, cfg.n_iterations + 1)]
    finally:
        step.close()
        _finish_start(run)
    comparison = {**build_comparison(inputs, evals), **step.comparison_fields(stats)}
    write_json(inputs.out / "comparison.json", comparison)
    return Outcome(comparison, stats)


def _iteration(
    run: RunState, step: TrainingStep, k: int, evals: dict[str, Evaluation], on_iteration: OnIteration | None
) -> dict[str, Any]:
    """Iteration ``k`` trained (unless DONE) and evaluated; its stats."""
    cfg = run.inputs.cfg
    it_dir = run.out / f"iter_{k}"
    done = (it_dir / "DONE").exists()
    if done:
        stats = json.loads((it_dir / "stats.json").read_text())
    else:
        it_dir.mkdir(parents=True, exist_ok=True)
        stats = step.train(run, k)
    evals[f"target_iter{k}"] = evaluate(run, lambda: run.models.target(k), run.inputs.target_spec, f"target_iter{k}")
    metrics = {ds: r["metrics"] for ds, r in evals[f"target_iter{k}"].items()}
    if not done:
        stats["eval"] = metrics
        write_json(it_dir / "stats.json", stats)
        (it_dir / "DONE").write_text("done\n")
        if cfg.report_to:
            log_iteration(cfg.report_to, run.out, k, metrics)
    if on_iteration is not None:
        on_iteration(k, metrics)
    return stats


def _finish_start(run: RunState) -> None:
    """Close the pool and the generators (a vLLM server is stopped); record what this start
    generated (0 everywhere on a rerun of a finished run or a cached variant) and served."""
    run.pool.close()
    run.models.release()
    record_generation(run.out, run.models.usage, run.inputs.cfg.serving)
    with JsonlWriter(run.out / "generated.jsonl") as w:
        w.write({"generated": dict(run.generated), "total": int(sum(run.generated.values()))})
