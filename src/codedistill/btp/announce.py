"""What a BTP run will do, said at its start phase by phase (problems x programs per
problem, programs already in the run directory) and recorded in ``plan.json``; the
returned ``ui.RunPlan`` adds an estimate of the time after the first chunk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from codedistill.btp.models import generating_roles
from codedistill.btp.phases.generate import generation_tag
from codedistill.btp.plan import ResolvedInputs
from codedistill.runs import read_jsonl
from codedistill.ui import RunPlan

Log = Callable[[str], None]


def announce_plan(inputs: ResolvedInputs, checked: dict[str, Any], log: Log) -> RunPlan:
    cfg = inputs.cfg
    per, how = programs_per_problem(inputs)
    phases = _phases(inputs, per)
    run_plan = RunPlan(
        inputs.out / "plan.json",
        phases,
        extra={"model_check": checked},
        log=log,
        note="model loading and fine-tuning not included",
    )
    n_eval = {d: len(ps) for d, ps in inputs.evals.items()}
    ev_programs = sum(n_eval.values()) * cfg.eval_num_samples
    ev_sets = ", ".join(f"{d} {n}" for d, n in n_eval.items())
    gen_programs = sum(
        p["programs"] for p in phases if " fine-tuning" not in p["phase"] and not p["phase"].startswith("eval")
    )
    done = sum(int(p.get("done_programs", 0)) for p in phases)
    n_stages = sum(p["phase"].startswith("eval") for p in phases)
    run_plan.announce(
        f"plan: {cfg.mode} {inputs.source_spec.alias} -> {inputs.target_spec.alias}, {cfg.n_iterations} iteration(s) "
        f"on {len(inputs.train)} {cfg.dataset} train problems",
        f"  {cfg.generation} phase: {how} per problem = {gen_programs} programs, each tested",
        f"  evaluations: {n_stages} x ({ev_sets} problems x {cfg.eval_num_samples} samples = {ev_programs} programs)"
        f" = {n_stages * ev_programs} programs",
        *(f"  held out: {line}" for line in inputs.kept_lines()),
        f"  fine-tuning: {cfg.n_iterations} x {cfg.epochs} epoch(s), {'LoRA' if cfg.use_lora else 'full'}, on "
        + (f"{cfg.replay_size} drawn programs" if cfg.replay_size else "as many drawn programs as the buffer holds"),
        f"  in all {run_plan.todo} programs to generate and test"
        + (f" ({done} done before)" if done else "")
        + "; an estimate of the time follows the first chunk",
    )
    return run_plan


def programs_per_problem(inputs: ResolvedInputs) -> tuple[int, str]:
    """Programs the generation phase makes per problem, and how, in words."""
    cfg = inputs.cfg
    if cfg.generation == "egcfg":  # one program per EG-CFG agent that ran (fewer after an early stop)
        per = len(cfg.egcfg.agents())
        return per, f"up to {per} EG-CFG agents' programs"
    if cfg.generation == "beam":
        return cfg.num_beams, f"{cfg.num_beams} beams"
    return cfg.num_samples, f"{cfg.num_samples} samples"


def _rows(path: Path) -> int:
    return len(read_jsonl(path)) if path.exists() else 0


def _eval_phase(inputs: ResolvedInputs, stage: str, model: str) -> dict[str, Any]:
    cfg = inputs.cfg
    n_eval = {d: len(ps) for d, ps in inputs.evals.items()}
    done = sum(_rows(inputs.out / "eval" / stage / d / "results.jsonl") for d in inputs.evals)
    return {
        "phase": f"eval {stage}",
        "model": model,
        "problems": n_eval,
        "samples_per_problem": cfg.eval_num_samples,
        "programs": sum(n_eval.values()) * cfg.eval_num_samples,
        "done_programs": done,
    }


def _phases(inputs: ResolvedInputs, per: int) -> list[dict[str, Any]]:
    cfg = inputs.cfg
    target = inputs.target_spec.alias
    phases = [_eval_phase(inputs, "target_iter0", target)]
    if cfg.eval_source:
        phases.append(_eval_phase(inputs, "source", inputs.source_spec.alias))
    seen_source: set[str] = set()
    for k in range(1, cfg.n_iterations + 1):
        probs = inputs.iteration_problems(k)
        for role in generating_roles(cfg.mode):
            spec = inputs.source_spec if role == "source" else inputs.target_spec
            tag = generation_tag(role, cfg.generation, k)
            ids = [p.task_id for p in probs]
            if tag == "beam":  # the source's beams: computed once per problem
                ids = [i for i in ids if i not in seen_source]
                seen_source.update(ids)
            done = (
                _rows(inputs.out / "generations" / f"{role}_{tag}.verdicts.jsonl") * per
                if k == 1 or tag != "beam"
                else 0
            )
            phases.append(
                {
                    "phase": f"iter {k} {role} {cfg.generation}",
                    "model": spec.alias,
                    "problems": len(ids),
                    "programs_per_problem": per,
                    "programs": len(ids) * per,
                    "done_programs": min(done, len(ids) * per),
                }
            )
        phases.append(
            {
                "phase": f"iter {k} fine-tuning",
                "model": target,
                "programs": 0,
                "epochs": cfg.epochs,
                "draws": cfg.replay_size or "buffer size",
                "method": "LoRA" if cfg.use_lora else "full",
            }
        )
        phases.append(_eval_phase(inputs, f"target_iter{k}", f"{target}@iter{k}"))
    return phases
