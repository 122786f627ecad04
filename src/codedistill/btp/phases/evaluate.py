"""Held-out evaluation of a model at one stage of the run (``target_iter0``, ``source``,
``target_iter1``, ...) into ``eval/<stage>/<dataset>/``, and the before/after comparison."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from codedistill.baseline import check_prompts_fit, evaluate_generator, make_sampler
from codedistill.btp.gencache import ids_hash, model_id
from codedistill.btp.plan import ResolvedInputs
from codedistill.btp.state import RunState
from codedistill.config import SamplingConfig
from codedistill.data.problem import Problem
from codedistill.evaluation import score
from codedistill.generation import computed_since, requests_sent
from codedistill.metrics import counts_from_results, has_base, paired_bootstrap
from codedistill.prompts import PromptStyle
from codedistill.runs import derive_seed

#: per dataset {"counts": {task_id: (n, c)}, "metrics": pass@k report}; HumanEval+ / MBPP+
#: add "base_counts" (the base inputs' verdicts; "counts" are plus, as ``passed``)
Evaluation = dict[str, dict[str, Any]]

_FILES = ("samples.jsonl", "results.jsonl")


def eval_cache_parts(inputs: ResolvedInputs, spec: Any, ds: str) -> dict[str, Any]:
    """Everything that determines an evaluation's samples and verdicts (its cache key)."""
    cfg = inputs.cfg
    return {
        "model": model_id(spec),
        "style": PromptStyle.of(spec).style,
        "dataset": ds,
        "split": inputs.eval_splits.get(ds, cfg.eval_split),
        "shots": inputs.eval_shots.get(ds, 0),
        "problems": ids_hash(inputs.evals[ds]),
        "n_problems": len(inputs.evals[ds]),
        "num_samples": cfg.eval_num_samples,
        "temperature": cfg.eval_temperature,
        "top_p": cfg.eval_top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
        "chunk_size": cfg.chunk_size,
        "timeout": cfg.timeout,
    }


def evaluate(run: RunState, load: Callable[[], Any], spec: Any, stage: str) -> Evaluation:
    """n samples per held-out problem, tested; per dataset {"counts", "metrics"}.

    The same resumable evaluation as step 1 (``baseline.evaluate_generator``). ``load()``
    gives the generator, loaded only when something is left to sample. The sampling seed
    of a chunk depends on (seed, dataset, first task_id) only, the same for every stage:
    before/after comparisons use common random numbers. An unchanged model's evaluation
    (the base target, the source) is shared through the generation cache.
    """
    cfg = run.inputs.cfg
    sampler = _StageSampler(run, load, spec, stage)
    cacheable = run.cache is not None and stage in ("target_iter0", "source")
    res: Evaluation = {}
    for ds, problems in run.inputs.evals.items():
        ev_dir = run.out / "eval" / stage / ds
        parts = eval_cache_parts(run.inputs, spec, ds) if cacheable else None
        if parts is not None and run.cache is not None and not (ev_dir / "results.jsonl").exists():
            if run.cache.get_files("eval", parts, ev_dir, _FILES):
                run.log(f"eval {stage} on {ds}: samples and verdicts from the generation cache")
        sampler.pending = problems  # checked against a served model's context on the first chunk
        rows, _ = evaluate_generator(
            sampler.generate,
            problems,
            sampler.style,
            getattr(spec, "alias", stage),
            cfg.eval_num_samples,
            out_dir=ev_dir,
            chunk_size=cfg.chunk_size,
            seed=derive_seed(cfg.seed, "eval", ds),
            timeout=cfg.timeout,
            workers=cfg.workers,
            pool=run.pool,
            desc=f"eval {stage} on {ds}",
            on_chunk=sampler.chunk_done,
        )
        if parts is not None and run.cache is not None and not run.cache.has("eval", parts):
            run.cache.put_files("eval", parts, ev_dir, _FILES)
        res[ds] = {"counts": dict(counts_from_results(rows)), "metrics": score(rows, ks=cfg.ks(), seed=cfg.seed)}
        if has_base(rows):
            res[ds]["base_counts"] = dict(counts_from_results(rows, "base_passed"))
    return res


class _StageSampler:
    """Samples one stage's programs, counting them and leaving model loading out of the time estimate."""

    def __init__(self, run: RunState, load: Callable[[], Any], spec: Any, stage: str):
        cfg = run.inputs.cfg
        self.run, self.load = run, load
        self.style = PromptStyle.of(spec)
        self.sampling = SamplingConfig(
            num_samples=cfg.eval_num_samples,
            temperature=cfg.eval_temperature,
            top_p=cfg.eval_top_p,
            max_new_tokens=cfg.max_new_tokens,
        )
        self.counter = f"eval/{stage}"
        run.generated.setdefault(self.counter, 0)
        self.load_s = 0.0  # loading the model in the last chunk
        self.computed = True  # whether the last chunk computed (not all from the response cache)
        self.pending: list[Problem] = []  # the data set's problems, until checked against the context

    def generate(self, chunk: list[Problem], chunk_seed: int) -> list[list[Any]]:
        t_load = time.perf_counter()
        gen = self.load()
        self.load_s = time.perf_counter() - t_load
        if self.pending:
            check_prompts_fit(gen, self.pending, self.style, self.sampling.max_new_tokens)
            self.pending = []
        before = requests_sent(gen)
        cands = make_sampler(gen, self.style, self.sampling, gen.tokenizer)(chunk, chunk_seed)
        self.computed = computed_since(gen, before)
        self.run.generated[self.counter] += sum(len(cs) for cs in cands)
        return cands

    def chunk_done(self, programs: int, seconds: float) -> None:
        self.run.chunk(programs, seconds - self.load_s, self.computed)


def protocol_record(inputs: ResolvedInputs, ds: str) -> dict[str, Any]:
    """How the numbers of one evaluation set were measured (report/protocol.py reads it)."""
    cfg = inputs.cfg
    rec: dict[str, Any] = {
        "preset": cfg.eval_protocol,
        "shots": inputs.eval_shots.get(ds, 0),
        "temperature": cfg.eval_temperature,
        "top_p": cfg.eval_top_p,
        "num_samples": cfg.eval_num_samples,
        "split": inputs.eval_splits.get(ds, cfg.eval_split),
        "n_problems": len(inputs.evals[ds]),
        "method": "plain",
    }
    excluded = inputs.eval_excluded.get(ds)
    if excluded:  # the leakage guard's work: how many were kept, and why the others were not
        rec["excluded"] = [
            {"reason": x["reason"], "n": len(x["task_ids"]), "task_ids": x["task_ids"]} for x in excluded
        ]
        rec["n_eligible"] = inputs.eval_eligible[ds]
    return rec


def build_comparison(inputs: ResolvedInputs, evals: dict[str, Evaluation]) -> dict[str, Any]:
    """comparison.json: the run's settings and, per dataset, before vs after with paired CIs."""
    cfg = inputs.cfg
    out: dict[str, Any] = {
        "source_model": inputs.source_spec.alias,
        "target_model": inputs.target_spec.alias,
        "mode": cfg.mode,
        "train_dataset": cfg.dataset,
        "n_train_problems": len(inputs.train),
        "n_iterations": cfg.n_iterations,
        "seed": cfg.seed,
        "allow_overlap": cfg.allow_overlap,
        "overlapping_train_problems": inputs.overlap,
        "near_duplicate_descriptions": inputs.near_duplicates,
        "dropped_overlapping_train_problems": inputs.dropped,
        "eval_num_samples": cfg.eval_num_samples,
        "eval_temperature": cfg.eval_temperature,
        "eval_protocol": cfg.eval_protocol,
        "eval_split": cfg.eval_split,
        "skipped_eval_datasets": inputs.skipped_evals,
        "iteration_problems": cfg.iteration_problems,
        "iteration_problem_counts": [len(inputs.iteration_problems(k)) for k in range(1, cfg.n_iterations + 1)],
        "datasets": {ds: _dataset_comparison(inputs, evals, ds) for ds in inputs.evals},
    }
    return out


def _dataset_comparison(inputs: ResolvedInputs, evals: dict[str, Evaluation], ds: str) -> dict[str, Any]:
    cfg = inputs.cfg
    before = evals["target_iter0"][ds]
    after = evals[f"target_iter{cfg.n_iterations}"][ds]
    entry: dict[str, Any] = {
        "n_problems": len(inputs.evals[ds]),
        "protocol": protocol_record(inputs, ds),
        "target_before": before["metrics"],
        "target_after": after["metrics"],
        "target_per_iteration": {k: v[ds]["metrics"] for k, v in evals.items() if k.startswith("target_iter")},
        "improvement": {
            f"pass@{k}": paired_bootstrap(before["counts"], after["counts"], k=k, seed=cfg.seed).to_dict()
            for k in cfg.ks()
        },
    }
    if "base_counts" in before and "base_counts" in after:  # HumanEval+ / MBPP+: base beside plus
        entry["improvement_base"] = {
            f"pass@{k}": paired_bootstrap(before["base_counts"], after["base_counts"], k=k, seed=cfg.seed).to_dict()
            for k in cfg.ks()
        }
    if "source" in evals:
        entry["source"] = evals["source"][ds]["metrics"]
    return entry
