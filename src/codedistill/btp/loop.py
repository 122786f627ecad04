"""The BTP loop: Beam search -> Testing -> Prioritized replay -> fine-tune, iterated.

Run directory layout::

    config.json, starts.jsonl          (codedistill.runs.RunDir)
    generations/<role>_<tag>.jsonl     one record per problem: candidates (+ seq_prob)
    generations/<role>_<tag>.verdicts.jsonl   one record per problem: verdicts
    replay_buffer.jsonl                every tested program, deduplicated per problem
    eval/<stage>/<dataset>.jsonl       per problem: n samples + verdicts (stage: target_iter0,
                                       source, target_iter1, ...)
    iter_K/draw.json, iter_K/train_log.jsonl, iter_K/adapter/ (or model/), iter_K/merged/
    iter_K/stats.json, iter_K/DONE
    comparison.json, report.md, plots/*.png

Resume: every JSONL is append-only (flush + fsync per record) and read back on restart;
work is done in fixed chunks of problems whose seeds depend only on (seed, phase,
iteration, first task_id of the chunk), so a chunk redone after a kill gives the same
result. An iteration with a DONE marker is never redone; one without is redone from its
first unfinished phase (generation, testing and evaluation records are reused,
training is rerun from the previous iteration's saved adapter with the same seed).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from codedistill.evaluation import execute
from codedistill.metrics import pass_at_k_report
from codedistill.report import write_run_report
from codedistill.btp.config import BTPConfig
from codedistill.runs import JsonlWriter, chunks, derive_seed, read_jsonl, write_json
from codedistill.btp.replay import ReplayBuffer, ReplayEntry
from codedistill.btp.samplers import draw
from codedistill.btp.stats import buffer_stats, sampling_stats
from codedistill.btp.trainer import TrainExample, TrainSettings
from codedistill.data.problem import Problem
from codedistill.errors import ConfigError
from codedistill.ui import Tracker, progress_tasks

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- setup


class Plan:
    """Everything resolved and checked before any expensive work."""

    def __init__(self, cfg: BTPConfig):
        from codedistill.data import load_problems
        from codedistill.models.registry import resolve_model

        self.cfg = cfg
        self.source_spec = resolve_model(cfg.source_model, cfg.source_variant)
        self.target_spec = resolve_model(cfg.target_model, cfg.target_variant)
        uses_source = cfg.mode in ("finetune", "mixed") or cfg.eval_source
        if self.target_spec.backend == "openai":
            raise ConfigError(f"{self.target_spec.alias} cannot be fine-tuned: it is an API model. Pick a "
                              "target whose weights are here (e.g. DeepSeek-Coder-1.3B).")
        # generation backends per role (codedistill.generation.make_generator)
        self.source_backend = cfg.role_backend("source", self.source_spec) if uses_source else "hf"
        self.target_backend = cfg.role_backend("target", self.target_spec)
        from codedistill.generation import beam_fallback_note

        from codedistill.generation import check_served

        if uses_source:
            check_served(self.source_spec, self.source_backend, cfg.serving)
        check_served(self.target_spec, self.target_backend, cfg.serving)
        self.beam_fallback = None
        if cfg.generation == "beam" and cfg.mode in ("finetune", "mixed"):
            self.beam_fallback = beam_fallback_note(self.source_spec.alias, self.source_backend, cfg.serving,
                                                    cfg.num_beams)
        self.train = load_problems(cfg.dataset, "train", data_path=cfg.data_path, max_problems=cfg.max_problems)
        if not self.train:
            raise ConfigError(f"no training problems in {cfg.dataset}")
        eval_sets = [cfg.dataset] + [d for d in cfg.eval_datasets if d != cfg.dataset]
        self.evals: dict[str, list[Problem]] = {}
        self.eval_shots: dict[str, int] = {}
        self.skipped_evals: list[str] = []  # extra sets without the chosen split (HumanEval: test only)
        for d in eval_sets:
            path = cfg.data_path if d == cfg.dataset else None
            if cfg.eval_split == "validation" and d == "humaneval":
                self.skipped_evals.append(d)
                continue
            # the paper protocol: MBPP 3-shot (tasks 2-4), HumanEval and synth 0-shot
            shots = 3 if cfg.eval_protocol == "paper" and d in ("mbpp", "mbpp-sanitized") else 0
            self.eval_shots[d] = shots
            self.evals[d] = load_problems(d, cfg.eval_split, data_path=path, max_problems=cfg.eval_max_problems,
                                          shots=shots)
        all_eval = [p for ps in self.evals.values() for p in ps]
        self.overlap = find_overlap(self.train, all_eval)
        self.near_duplicates = find_near_duplicates(self.train, all_eval)
        self.dropped: list[str] = []
        if self.overlap and cfg.drop_overlap:
            self.dropped = list(self.overlap)
            self.train = [p for p in self.train if p.task_id not in set(self.dropped)]
            self.overlap = []
            if not self.train:
                raise ConfigError("every training problem overlaps the evaluation sets")
        if self.overlap and not cfg.allow_overlap:
            raise ConfigError(
                f"{len(self.overlap)} training problem(s) also appear in the evaluation sets "
                f"({', '.join(self.overlap[:5])}); refusing to train on test problems. Pass "
                "--drop-overlap to leave them out of training, or --allow-overlap to train on them "
                "anyway (the report will say so in bold)."
            )
        self.out = Path(cfg.output_dir) if cfg.output_dir else cfg.default_output_dir()
        # programs generated by this start, per phase (0 where the run dir or the cache had them)
        self.generated: dict[str, int] = {}
        self.cache = None
        if cfg.generation_cache:
            from codedistill.btp.gencache import GenerationCache

            self.cache = GenerationCache(cfg.generation_cache)

    def iteration_problems(self, k: int) -> list[Problem]:
        """The training problems iteration ``k`` generates on (see BTPConfig.iteration_problems)."""
        if self.cfg.iteration_problems == "all" or self.cfg.n_iterations == 1:
            return list(self.train)
        return iteration_slices(self.train, self.cfg.n_iterations)[k - 1]


def iteration_slices(problems: Sequence[Problem], n: int) -> list[list[Problem]]:
    """``n`` consecutive, disjoint, near-equal slices (sizes differ by at most one)."""
    if n > len(problems):
        raise ConfigError(f"iteration_problems=slices needs at least n_iterations ({n}) training problems, "
                          f"got {len(problems)}")
    q, r = divmod(len(problems), n)
    out, i = [], 0
    for j in range(n):
        m = q + (1 if j < r else 0)
        out.append(list(problems[i:i + m]))
        i += m
    return out


def model_id(spec: Any) -> str:
    """What identifies a model's weights for the generation cache (a tiny model: its spec
    hash and the hash of its weights file, wherever it lies; shipped directories carry no hash)."""
    from codedistill.models.registry import local_path

    if getattr(spec, "tiny", False):
        from codedistill.models.tiny import weights_id

        return f"{spec.alias}@{weights_id(local_path(spec))}"
    return f"{spec.alias}@{local_path(spec)}"


def _ids_hash(problems: Sequence[Problem]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(p.task_id for p in problems).encode()).hexdigest()[:16]


def gen_cache_parts(plan: Plan, spec: Any, role: str, tag: str, problems: Sequence[Problem]) -> dict[str, Any]:
    cfg = plan.cfg
    parts: dict[str, Any] = {
        "model": model_id(spec), "style": _style(spec).style, "role": role, "generation": cfg.generation,
        "max_new_tokens": cfg.max_new_tokens, "dataset": cfg.dataset, "data_path": cfg.data_path,
        "problems": _ids_hash(problems), "n_problems": len(problems), "chunk_size": cfg.chunk_size,
        "timeout": cfg.timeout,
    }
    if cfg.generation == "beam":
        parts.update(num_beams=cfg.num_beams, length_penalty=cfg.length_penalty)
    else:
        parts.update(num_samples=cfg.num_samples, temperature=cfg.gen_temperature, top_p=cfg.gen_top_p,
                     seed=cfg.seed, tag=tag)
    if cfg.generation == "egcfg":
        parts["egcfg"] = cfg.egcfg
    return parts


def eval_cache_parts(plan: Plan, spec: Any, ds: str) -> dict[str, Any]:
    cfg = plan.cfg
    return {
        "model": model_id(spec), "style": _style(spec).style, "dataset": ds, "split": cfg.eval_split,
        "shots": plan.eval_shots.get(ds, 0), "problems": _ids_hash(plan.evals[ds]),
        "n_problems": len(plan.evals[ds]), "num_samples": cfg.eval_num_samples,
        "temperature": cfg.eval_temperature, "top_p": cfg.eval_top_p, "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed, "chunk_size": cfg.chunk_size, "timeout": cfg.timeout,
    }


def _norm_text(s: str, lower: bool = False) -> str:
    return " ".join((s.lower() if lower else s).split())


def find_overlap(train: Sequence[Problem], evals: Sequence[Problem]) -> list[str]:
    """Training task_ids that *are* evaluation problems: same task_id, same prompt
    (description + tests), or same reference solution."""
    ids = {p.task_id for p in evals}
    prompts = {_norm_text(p.prompt) for p in evals}
    refs = {_norm_text(p.reference) for p in evals if p.reference.strip()}
    return [p.task_id for p in train
            if p.task_id in ids or _norm_text(p.prompt) in prompts
            or (p.reference.strip() and _norm_text(p.reference) in refs)]


def find_near_duplicates(train: Sequence[Problem], evals: Sequence[Problem]) -> list[list[str]]:
    """[train id, eval id] pairs with the same description but different tests and
    reference (MBPP has four such pairs across its standard train/test split). Not
    refused (they are different problems) but listed in comparison.json and the report."""
    descs: dict[str, str] = {}
    for p in evals:
        if p.description.strip():
            descs.setdefault(_norm_text(p.description, lower=True), p.task_id)
    return [[p.task_id, descs[_norm_text(p.description, lower=True)]] for p in train
            if p.description.strip() and _norm_text(p.description, lower=True) in descs]


# ----------------------------------------------------------------------------- models


class Models:
    """Lazy loading of the source and (current) target generators; one at a time in memory."""

    def __init__(self, plan: Plan, log: Log):
        self.plan = plan
        self.log = log
        self._cache: dict[str, Any] = {}
        self.usage: dict[str, dict[str, Any]] = {}  # served generators' counters, by name

    def _make(self, role: str, spec: Any, name: str, model_path: str | None = None,
              adapter: str | None = None) -> Any:
        from codedistill.generation import make_generator

        cfg = self.plan.cfg
        backend = self.plan.source_backend if role == "source" else self.plan.target_backend
        teaches = (role == "source" and cfg.mode in ("finetune", "mixed")) or (role == "target" and cfg.mode != "finetune")
        return make_generator(
            spec, backend, cfg.serving, name=name, model_path=model_path, adapter=adapter,
            cache_path=str(self.plan.out / "generation_cache.sqlite"), device=cfg.device, dtype=_dtype(cfg, spec),
            batch_size=cfg.gen_batch_size, require_logprobs=teaches,
            log_path=str(self.plan.out / "logs" / f"vllm_{name.replace('/', '_')}.log"))

    def _drop(self) -> None:
        from codedistill.generation import close_generator, generator_usage, merge_usage

        for gen in self._cache.values():  # a vLLM server is stopped here: the GPU is free again
            u = generator_usage(gen)
            if u is not None:
                name = getattr(gen, "name", "model")
                self.usage[name] = merge_usage(self.usage.get(name), u)
            close_generator(gen)
        self._cache.clear()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    def source(self) -> Any:
        if "source" not in self._cache:
            self._drop()
            cfg = self.plan.cfg
            self.log(f"loading source {cfg.source_model} ({self.plan.source_backend})")
            gen = self._make("source", self.plan.source_spec, self.plan.source_spec.alias)
            self._cache["source"] = gen
        return self._cache["source"]

    def target(self, iteration: int) -> Any:
        """The target after ``iteration`` fine-tuning iterations (0 = the base model),
        loaded from disk (adapter merged in memory for generation)."""
        key = f"target{iteration}"
        if key not in self._cache:
            self._drop()
            cfg = self.plan.cfg
            spec = self.plan.target_spec
            from codedistill.generation.hf import HFGenerator

            it_dir = self.plan.out / f"iter_{iteration}"
            if iteration == 0:
                gen = self._make("target", spec, spec.alias)
            elif self.plan.target_backend != "hf":  # vLLM serves base + LoRA adapter (not merged)
                gen = self._make("target", spec, f"{spec.alias}@iter{iteration}",
                                 model_path=None if cfg.use_lora else str(it_dir / "model"),
                                 adapter=str(it_dir / "adapter") if cfg.use_lora else None)
            else:
                from codedistill.btp.trainer import load_model, load_tokenizer

                it_dir = self.plan.out / f"iter_{iteration}"
                device = cfg.device or _default_device()
                if cfg.use_lora:
                    from peft import PeftModel

                    base = load_model(target_path(self.plan), device, _dtype(cfg, spec))
                    model = PeftModel.from_pretrained(base, str(it_dir / "adapter")).merge_and_unload()
                    tok = load_tokenizer(it_dir / "adapter")
                else:
                    model = load_model(it_dir / "model", device, _dtype(cfg, spec))
                    tok = load_tokenizer(it_dir / "model")
                model.eval()
                gen = HFGenerator(model, tok, name=f"{spec.alias}@iter{iteration}", batch_size=cfg.gen_batch_size,
                                  add_special_tokens=spec.prompt_style == "base")
            self._cache[key] = gen
        return self._cache[key]


def _default_device() -> str:
    from codedistill.btp.trainer import default_device

    return default_device()


def _dtype(cfg: BTPConfig, spec: Any) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return spec.dtype if spec.dtype not in (None, "auto") else "auto"


def target_path(plan: Plan) -> str:
    from codedistill.models.registry import local_path

    return local_path(plan.target_spec)


# ----------------------------------------------------------------------------- phases


def _style(spec: Any) -> Any:
    from codedistill.prompts import PromptStyle

    return PromptStyle.of(spec)


def generate_and_test(
    plan: Plan, gen_fn: Callable[[], Any], spec: Any, role: str, tag: str, iteration: int,
    pool: Any, log: Log, problems: Sequence[Problem] | None = None, cacheable: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Beam phase + testing phase for one generator over the training problems.

    Returns {task_id: [candidate dicts with verdict fields]} in problem order; records are
    appended per chunk (generation) and per chunk (verdicts), and reused on restart.
    """
    from codedistill.prompts import render_prompt, stops_for, to_program

    cfg = plan.cfg
    gdir = plan.out / "generations"
    gpath = gdir / f"{role}_{tag}.jsonl"
    vpath = gdir / f"{role}_{tag}.verdicts.jsonl"
    gens = {r["task_id"]: r for r in read_jsonl(gpath)}
    verd = {r["task_id"]: r for r in read_jsonl(vpath)}
    style = _style(spec)
    problems = list(plan.train if problems is None else problems)
    counter = f"{role}_{tag}"
    plan.generated.setdefault(counter, 0)
    parts = gen_cache_parts(plan, spec, role, tag, problems) if (plan.cache and cacheable) else None
    # progress: the beam (or sampling) phase in problems, the testing phase in programs;
    # each phase's wall time is the time spent in it (they alternate chunk by chunk)
    gbar = Tracker(f"[iter {iteration}] {role} {'beam search' if cfg.generation == 'beam' else 'sampling'}", 0,
                   "problems")
    tbar = Tracker(f"[iter {iteration}] testing {role}'s programs", 0, "programs")
    n_cands = n_passed = 0
    run_plan = getattr(plan, "run_plan", None)
    with JsonlWriter(gpath) as gw, JsonlWriter(vpath) as vw, progress_tasks(gbar, tbar):
        if parts is not None and any(p.task_id not in verd for p in problems):
            cg = plan.cache.get_rows("gen", parts, "generations")
            cv = plan.cache.get_rows("gen", parts, "verdicts")
            if cg is not None and cv is not None:
                cg_by = {r["task_id"]: r for r in cg}
                cv_by = {r["task_id"]: r for r in cv}
                for p in problems:
                    if p.task_id not in gens and p.task_id in cg_by:
                        gw.write(cg_by[p.task_id])
                        gens[p.task_id] = cg_by[p.task_id]
                    if p.task_id not in verd and p.task_id in cv_by:
                        vw.write(cv_by[p.task_id])
                        verd[p.task_id] = cv_by[p.task_id]
                log(f"[iter {iteration}] {role}: {cfg.generation} generations and verdicts of "
                    f"{len(problems)} problems from the generation cache")
        todo_chunks = [c for c in chunks(problems, cfg.chunk_size) if any(p.task_id not in verd for p in c)]
        if todo_chunks:
            log(f"[iter {iteration}] {role}: {cfg.generation} on {sum(len(c) for c in todo_chunks)} problems"
                f" ({len(problems) - sum(len(c) for c in todo_chunks)} done before)")
        per = cfg.num_beams if cfg.generation == "beam" else cfg.num_samples
        gbar.set_total(sum(p.task_id not in gens for c in todo_chunks for p in c))
        tbar.set_total(sum(len(gens[p.task_id]["candidates"]) if p.task_id in gens else per
                           for c in todo_chunks for p in c if p.task_id not in verd))
        for chunk in todo_chunks:
            t_chunk, load_s = time.perf_counter(), 0.0
            missing = [p for p in chunk if p.task_id not in gens]
            if missing:
                gen = gen_fn()
                load_s = time.perf_counter() - t_chunk  # loading the model (first chunk) is not the phase
                prompts = [render_prompt(p, style, gen.tokenizer) for p in chunk]
                stop = stops_for(chunk[0], style)
                if cfg.generation == "beam":
                    cands = gen.beam_search(prompts, num_beams=cfg.num_beams, num_return_sequences=cfg.num_beams,
                                            max_new_tokens=cfg.max_new_tokens, stop=stop,
                                            length_penalty=cfg.length_penalty)
                elif cfg.generation == "egcfg":  # every EG-CFG agent's final program (egcfg/runner.py)
                    from codedistill.egcfg.runner import egcfg_agent_candidates

                    cands = egcfg_agent_candidates(gen, style, list(chunk), stop, cfg.egcfg, pool,
                                                   seed=derive_seed(cfg.seed, "gen", role, tag, chunk[0].task_id),
                                                   max_new_tokens=cfg.max_new_tokens,
                                                   log_path=gdir / f"{role}_{tag}.egcfg_log.jsonl")
                else:
                    cands = gen.sample(prompts, n=cfg.num_samples, temperature=cfg.gen_temperature,
                                       top_p=cfg.gen_top_p, max_new_tokens=cfg.max_new_tokens, stop=stop,
                                       seed=derive_seed(cfg.seed, "gen", role, tag, chunk[0].task_id))
                for p, cs in zip(chunk, cands):
                    if p.task_id in gens:
                        continue
                    plan.generated[counter] += len(cs)
                    rows = []
                    for i, c in enumerate(cs):
                        completion, program = to_program(p, style, c.text)
                        rows.append({"index": i, "completion": completion, "program": program,
                                     "logprob": c.logprob, "num_tokens": c.num_tokens,
                                     "seq_prob": c.seq_prob, "finish_reason": c.finish_reason})
                    rec = {"task_id": p.task_id, "role": role, "model": getattr(gen, "name", role),
                           "iteration": iteration, "candidates": rows}
                    gw.write(rec)
                    gens[p.task_id] = rec
                    n_cands += len(rows)
                gbar.add_time(time.perf_counter() - t_chunk - load_s)
                gbar.advance(len(missing))
                gbar.note = f"{n_cands} candidates"
            # testing phase for this chunk
            need = [p for p in chunk if p.task_id not in verd]
            pairs = [(c["program"], p) for p in need for c in gens[p.task_id]["candidates"]]
            t_test = time.perf_counter()
            vs = execute(pairs, workers=cfg.workers, timeout=cfg.timeout, pool=pool)
            tbar.add_time(time.perf_counter() - t_test)
            tbar.advance(len(pairs))
            n_passed += sum(bool(v["passed"]) for v in vs)
            tbar.note = f"{n_passed} passed"
            if run_plan is not None and missing:
                run_plan.first_chunk(len(pairs), time.perf_counter() - t_chunk - load_s)
            k = 0
            for p in need:
                nc = len(gens[p.task_id]["candidates"])
                rec = {"task_id": p.task_id, "verdicts": vs[k:k + nc]}
                k += nc
                vw.write(rec)
                verd[p.task_id] = rec
    out: dict[str, list[dict[str, Any]]] = {}
    for p in problems:
        cs = gens[p.task_id]["candidates"]
        vs = verd[p.task_id]["verdicts"]
        out[p.task_id] = [{**c, **v, "model": gens[p.task_id]["model"]} for c, v in zip(cs, vs)]
    if parts is not None and not plan.cache.has("gen", parts):
        plan.cache.put_rows("gen", parts, {"generations": [gens[p.task_id] for p in problems],
                                           "verdicts": [verd[p.task_id] for p in problems]})
    return out


def evaluate(
    plan: Plan, gen_fn: Callable[[], Any], spec: Any, stage: str, pool: Any, log: Log,
) -> dict[str, dict[str, Any]]:
    """n samples per held-out problem, tested; per dataset {"counts": {task: (n, c)}, "metrics"}.

    The same resumable evaluation as step 1 (``baseline.evaluate_generator``) into
    ``eval/<stage>/<dataset>/``. The sampling seed of a chunk depends on (seed, dataset,
    first task_id) only, the same for every stage: before/after comparisons use common
    random numbers.
    """
    from codedistill.baseline import evaluate_generator, make_sampler
    from codedistill.config import SamplingConfig
    from codedistill.metrics import counts_from_results

    cfg = plan.cfg
    style = _style(spec)
    sampling = SamplingConfig(num_samples=cfg.eval_num_samples, temperature=cfg.eval_temperature,
                              top_p=cfg.eval_top_p, max_new_tokens=cfg.max_new_tokens)

    counter = f"eval/{stage}"
    plan.generated.setdefault(counter, 0)

    def generate(chunk: list[Problem], chunk_seed: int) -> list[list[Any]]:
        t_load = time.perf_counter()
        gen = gen_fn()  # loaded only when something is left to sample
        load_s[0] += time.perf_counter() - t_load
        cands = make_sampler(gen, style, sampling, gen.tokenizer)(chunk, chunk_seed)
        plan.generated[counter] += sum(len(cs) for cs in cands)
        return cands

    # an unchanged model's evaluation (base target, source) is shared through the cache
    cacheable = plan.cache is not None and stage in ("target_iter0", "source")
    names = ("samples.jsonl", "results.jsonl")
    load_s = [0.0]  # model loading, left out of the run's time estimate
    run_plan = getattr(plan, "run_plan", None)

    def first_chunk(programs: int, seconds: float) -> None:
        if run_plan is not None:
            run_plan.first_chunk(programs, seconds - load_s[0])

    res: dict[str, dict[str, Any]] = {}
    for ds, problems in plan.evals.items():
        ev_dir = plan.out / "eval" / stage / ds
        parts = eval_cache_parts(plan, spec, ds) if cacheable else None
        if parts is not None and not (ev_dir / "results.jsonl").exists():
            if plan.cache.get_files("eval", parts, ev_dir, names):
                log(f"eval {stage} on {ds}: samples and verdicts from the generation cache")
        rows, metrics = evaluate_generator(
            generate, problems, style, getattr(spec, "alias", stage), cfg.eval_num_samples,
            out_dir=plan.out / "eval" / stage / ds, chunk_size=cfg.chunk_size,
            seed=derive_seed(cfg.seed, "eval", ds), timeout=cfg.timeout, workers=cfg.workers,
            pool=pool, desc=f"eval {stage} on {ds}", on_first_chunk=first_chunk,
        )
        if parts is not None and not plan.cache.has("eval", parts):
            plan.cache.put_files("eval", parts, ev_dir, names)
        counts = counts_from_results(rows)
        metrics = pass_at_k_report(counts, ks=cfg.ks(), seed=cfg.seed)
        res[ds] = {"counts": dict(counts), "metrics": metrics}
    return res


def training_completion(problem: Problem, completion: str, style: Any) -> str:
    """What the target is trained to write after its prompt.

    Base prompts (MBPP/synth ``[BEGIN]`` format): the completion followed by the
    benchmark's end marker (``[DONE]``), exactly what a base model is stopped at.
    Chat prompts: the program in one fenced block (what the code extractor reads).
    """
    if style.style == "chat":
        return "```python\n" + problem.program(completion).strip() + "\n```"
    from codedistill.data import stop_strings

    stops = stop_strings(problem.dataset or "mbpp")
    end = stops[0] if stops and stops[0].strip().startswith("[") else ""
    return completion + end


def train_iteration(plan: Plan, iteration: int, examples: list[TrainExample], log: Log) -> dict[str, Any]:
    """Fine-tune from the previous iteration's checkpoint (or the base) and save."""
    from codedistill.btp.trainer import load_tokenizer, merge_and_save, prepare_model, save_trained, train

    cfg = plan.cfg
    spec = plan.target_spec
    it_dir = plan.out / f"iter_{iteration}"
    prev = None
    if iteration > 1:
        prev = plan.out / f"iter_{iteration - 1}" / ("adapter" if cfg.use_lora else "model")
    settings = train_settings(plan)
    if cfg.report_to:
        settings.logging_dir = str(it_dir / "trainer")  # the trackers write here
    device = cfg.device or _default_device()
    base = target_path(plan)
    tok = load_tokenizer(base)
    seed = derive_seed(cfg.seed, "train", iteration)
    t0 = time.time()
    log(f"[iter {iteration}] fine-tuning {spec.alias} on {len(examples)} examples "
        f"({'LoRA r=%d' % settings.lora_r if cfg.use_lora else 'full'}"
        f"{', %d processes' % cfg.num_processes if cfg.num_processes > 1 else ''})")
    if cfg.num_processes > 1 or cfg.accelerate_config:
        from codedistill.training.launch import run_launched, write_job

        job = write_job(it_dir / "launch", base=base, settings=settings, examples=examples, seed=seed,
                        device=device, dtype=_dtype(cfg, spec), init_from=prev, out_dir=it_dir)
        result_d = run_launched(job, cfg.num_processes, cfg.accelerate_config, log)
        model = None
    else:
        model = prepare_model(base, settings, seed=seed, device=device, dtype=_dtype(cfg, spec), init_from=prev)
        result = train(model, tok, examples, settings, seed=seed, log=log)
        result_d = result.to_dict()
        del result
        save_trained(model, tok, it_dir, cfg.use_lora)
    with JsonlWriter(it_dir / "train_log.tmp.jsonl") as w:
        for i, loss in enumerate(result_d["losses"]):
            w.write({"step": i + 1, "loss": loss})
    (it_dir / "train_log.tmp.jsonl").replace(it_dir / "train_log.jsonl")
    if cfg.merge:
        if model is None:  # trained in other processes: fold the saved adapter into the base here
            import dataclasses

            model = prepare_model(base, dataclasses.replace(settings, load_in_4bit=False), seed=seed, device=device,
                                  dtype=_dtype(cfg, spec), init_from=it_dir / ("adapter" if cfg.use_lora else "model"))
        merge_and_save(model, tok, it_dir / "merged")
    info = {**result_d, "seconds": round(time.time() - t0, 2), "seed": seed,
            "init_from": str(prev) if prev else "base"}
    write_json(it_dir / "train.json", info)
    del model
    gc.collect()
    return info


def train_settings(plan: Plan) -> TrainSettings:
    cfg = plan.cfg
    spec = plan.target_spec
    targets = cfg.lora_target_modules or list(spec.lora_target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    return TrainSettings(
        learning_rate=cfg.learning_rate, epochs=cfg.epochs, batch_size=cfg.train_batch_size,
        grad_accum=cfg.grad_accum, max_length=cfg.max_length, warmup_ratio=cfg.warmup_ratio,
        use_lora=cfg.use_lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        lora_target_modules=targets, prompt_special_tokens=spec.prompt_style == "base",
        gradient_checkpointing=cfg.gradient_checkpointing, mixed_precision=cfg.mixed_precision,
        load_in_4bit=cfg.load_in_4bit, report_to=list(cfg.report_to),
    )


# ----------------------------------------------------------------------------- the loop


def announce_plan(plan: Plan, checked: dict[str, Any], log: Log) -> Any:
    """Say what the run will do, phase by phase (problems x programs per problem, programs
    already in the run directory), record it in ``plan.json``; the returned ``RunPlan``
    adds an estimate of the time after the first chunk."""
    from codedistill.ui import RunPlan

    cfg, out = plan.cfg, plan.out
    per = cfg.num_beams if cfg.generation == "beam" else cfg.num_samples
    how = f"{cfg.num_beams} beams" if cfg.generation == "beam" else f"{cfg.num_samples} samples"
    if cfg.generation == "egcfg":  # one program per EG-CFG agent that ran (fewer after an early stop)
        from codedistill.egcfg.config import EGCFGConfig

        per = len(EGCFGConfig(**{"max_new_tokens": cfg.max_new_tokens, **cfg.egcfg}).agents())
        how = f"up to {per} EG-CFG agents' programs"
    n_eval = {d: len(ps) for d, ps in plan.evals.items()}
    ev_programs = sum(n_eval.values()) * cfg.eval_num_samples
    ev_sets = ", ".join(f"{d} {n}" for d, n in n_eval.items())

    def rows(path: Path) -> int:
        return len(read_jsonl(path)) if path.exists() else 0

    def eval_phase(stage: str, model: str) -> dict[str, Any]:
        done = sum(rows(out / "eval" / stage / d / "results.jsonl") for d in plan.evals)
        return {"phase": f"eval {stage}", "model": model, "problems": n_eval, "samples_per_problem":
                cfg.eval_num_samples, "programs": ev_programs, "done_programs": done}

    phases = [eval_phase("target_iter0", plan.target_spec.alias)]
    if cfg.eval_source:
        phases.append(eval_phase("source", plan.source_spec.alias))
    roles = {"finetune": ["source"], "self": ["target"], "mixed": ["source", "target"]}[cfg.mode]
    seen_source: set[str] = set()
    for k in range(1, cfg.n_iterations + 1):
        probs = plan.iteration_problems(k) if hasattr(plan, "iteration_problems") else plan.train
        for role in roles:
            spec = plan.source_spec if role == "source" else plan.target_spec
            tag = "beam" if role == "source" and cfg.generation == "beam" else f"iter{k}"
            ids = [p.task_id for p in probs]
            if role == "source" and cfg.generation == "beam":  # computed once per problem
                ids = [i for i in ids if i not in seen_source]
                seen_source.update(ids)
            done = rows(out / "generations" / f"{role}_{tag}.verdicts.jsonl") * per if k == 1 or tag != "beam" else 0
            phases.append({"phase": f"iter {k} {role} {cfg.generation}", "model": spec.alias, "problems": len(ids),
                           "programs_per_problem": per, "programs": len(ids) * per,
                           "done_programs": min(done, len(ids) * per)})
        phases.append({"phase": f"iter {k} fine-tuning", "model": plan.target_spec.alias, "programs": 0,
                       "epochs": cfg.epochs, "draws": cfg.replay_size or "buffer size",
                       "method": "LoRA" if cfg.use_lora else "full"})
        phases.append(eval_phase(f"target_iter{k}", f"{plan.target_spec.alias}@iter{k}"))
    run_plan = RunPlan(out / "plan.json", phases, extra={"model_check": checked}, log=log,
                       note="model loading and fine-tuning not included")
    gen_programs = sum(p["programs"] for p in phases if " fine-tuning" not in p["phase"]
                       and not p["phase"].startswith("eval"))
    done = sum(int(p.get("done_programs", 0)) for p in phases)
    n_stages = sum(p["phase"].startswith("eval") for p in phases)
    run_plan.announce(
        f"plan: {cfg.mode} {plan.source_spec.alias} -> {plan.target_spec.alias}, {cfg.n_iterations} iteration(s) on "
        f"{len(plan.train)} {cfg.dataset} train problems",
        f"  {cfg.generation} phase: {how} per problem = {gen_programs} programs, each tested",
        f"  evaluations: {n_stages} x ({ev_sets} problems x {cfg.eval_num_samples} samples = {ev_programs} programs)"
        f" = {n_stages * ev_programs} programs",
        f"  fine-tuning: {cfg.n_iterations} x {cfg.epochs} epoch(s), {'LoRA' if cfg.use_lora else 'full'}, on "
        + (f"{cfg.replay_size} drawn programs" if cfg.replay_size else "as many drawn programs as the buffer holds"),
        f"  in all {run_plan.todo} programs to generate and test" + (f" ({done} done before)" if done else "")
        + "; an estimate of the time follows the first chunk",
    )
    return run_plan


def run_btp(cfg: BTPConfig, log: Log = print,
            on_iteration: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a whole BTP experiment; returns comparison.json's content.

    ``on_iteration(k, metrics)`` is called after iteration k's evaluation (metrics: dataset
    -> pass@k report), also for iterations a resumed run finds done; an exception it raises
    (e.g. a hyperparameter search pruning the trial) stops the run after that iteration."""
    from codedistill.runs import RunDir

    plan = Plan(cfg)
    from codedistill.models.preflight import preflight_btp

    checked = preflight_btp(plan)  # unreachable hub / too large: one clear line, before any work
    from codedistill.btp.trainer import check_training

    check_training(train_settings(plan), cfg.device or _default_device())  # QLoRA / trackers, before any work
    _quiet_transformers()
    run = RunDir(plan.out)
    config = {**cfg.experiment_dict(), "source_spec": plan.source_spec.to_dict(),
              "target_spec": plan.target_spec.to_dict()}
    if plan.source_backend != "hf" or plan.target_backend != "hf":
        from codedistill.generation import describe

        config["generation_backends"] = {"source": describe(plan.source_spec, plan.source_backend, cfg.serving),
                                         "target": describe(plan.target_spec, plan.target_backend, cfg.serving)}
    if plan.beam_fallback:
        config["beam_search_fallback"] = plan.beam_fallback
        log(f"note: {plan.beam_fallback}")
    resumed = run.open(config, kind="btp")
    log(f"BTP run in {plan.out}{' (resuming)' if resumed else ''}: {len(plan.train)} train problems, "
        f"eval on {', '.join(f'{d} ({len(ps)})' for d, ps in plan.evals.items())}")
    plan.run_plan = announce_plan(plan, checked, log)
    if (cfg.n_iterations > 1 and cfg.iteration_problems == "all" and cfg.mode == "finetune"
            and cfg.generation == "beam"):
        log("note: the source's beams are deterministic and iteration_problems=all, so iterations 2.."
            f"{cfg.n_iterations} add no new programs: each re-draws the same buffer and trains further "
            "(iteration_problems: slices gives each iteration fresh training problems)")
    models = Models(plan, log)
    buffer = ReplayBuffer(plan.out / "replay_buffer.jsonl")
    t_start = time.time()
    from codedistill.execution import Limits, SandboxPool

    pool = SandboxPool(workers=cfg.workers, limits=Limits(timeout=cfg.timeout))
    try:
        evals: dict[str, Any] = {"target_iter0": evaluate(plan, lambda: models.target(0), plan.target_spec,
                                                          "target_iter0", pool, log)}
        if cfg.eval_source:
            evals["source"] = evaluate(plan, models.source, plan.source_spec, "source", pool, log)
        for k in range(1, cfg.n_iterations + 1):
            it_dir = plan.out / f"iter_{k}"
            if (it_dir / "DONE").exists():
                evals[f"target_iter{k}"] = evaluate(plan, lambda: models.target(k), plan.target_spec,
                                                    f"target_iter{k}", pool, log)
                if on_iteration is not None:
                    on_iteration(k, {ds: r["metrics"] for ds, r in evals[f"target_iter{k}"].items()})
                continue
            it_dir.mkdir(parents=True, exist_ok=True)
            stats = run_iteration(plan, k, models, buffer, pool, log)
            evals[f"target_iter{k}"] = evaluate(plan, lambda: models.target(k), plan.target_spec,
                                                f"target_iter{k}", pool, log)
            stats["eval"] = {ds: r["metrics"] for ds, r in evals[f"target_iter{k}"].items()}
            write_json(it_dir / "stats.json", stats)
            (it_dir / "DONE").write_text("done\n")
            if getattr(cfg, "report_to", None):
                from codedistill.btp.tracking import log_iteration

                log_iteration(cfg.report_to, plan.out, k, stats["eval"])
            if on_iteration is not None:
                on_iteration(k, stats["eval"])
    finally:
        buffer.close()
        pool.close()
        models._drop()  # stops any vLLM server this run started
        from codedistill.baseline import record_generation

        record_generation(plan.out, models.usage, cfg.serving)
        # what this start generated (0 everywhere on a rerun of a finished run or a cached variant)
        with JsonlWriter(plan.out / "generated.jsonl") as w:
            w.write({"generated": dict(plan.generated), "total": int(sum(plan.generated.values()))})
    comparison = build_comparison(plan, evals)
    write_json(plan.out / "comparison.json", comparison)
    log(f"done: {write_run_report(plan.out, elapsed=time.time() - t_start)}")
    return comparison


def _quiet_transformers() -> None:
    import warnings

    # transformers 5.x renamed gradient checkpointing; peft and TRL still use the old names on
    # every adapter load and GRPO step (a FutureWarning each, nothing for the user to do)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`(is_)?gradient_checkpointing\w*` is deprecated")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def run_iteration(plan: Plan, k: int, models: Models, buffer: ReplayBuffer, pool: Any, log: Log) -> dict[str, Any]:
    cfg = plan.cfg
    it_dir = plan.out / f"iter_{k}"
    # 1-2. beam (or sampling) phase and testing phase, per generating model
    produced: list[tuple[str, dict[str, list[dict[str, Any]]]]] = []
    gen_stats: dict[str, Any] = {}
    roles = {"finetune": ["source"], "self": ["target"], "mixed": ["source", "target"]}[cfg.mode]
    problems = plan.iteration_problems(k)
    for role in roles:
        if role == "source":
            spec, fn = plan.source_spec, models.source
            # the source never changes: its beams are deterministic, computed once
            tag = "beam" if cfg.generation == "beam" else f"iter{k}"
        else:
            spec, fn = plan.target_spec, (lambda: models.target(k - 1))
            tag = f"iter{k}"
        n_before = plan.generated.get(f"{role}_{tag}", 0)
        # the cache can serve an unchanged model only: the source, or the target before training
        res = generate_and_test(plan, fn, spec, role, tag, k, pool, log, problems=problems,
                                cacheable=role == "source" or k == 1)
        produced.append((role, res))
        flat = [c for cs in res.values() for c in cs]
        gen_stats[role] = {
            "generated_new": plan.generated.get(f"{role}_{tag}", 0) - n_before,
            "problems": len(problems), "iteration_problems": cfg.iteration_problems,
            "model": spec.alias, "candidates": len(flat), "file": f"generations/{role}_{tag}.jsonl",
            "share_passing": float(np.mean([bool(c["passed"]) for c in flat])) if flat else 0.0,
            "mean_pass_rate": float(np.mean([c["pass_rate"] for c in flat])) if flat else 0.0,
            "problems_solved": sum(any(c["passed"] for c in cs) for cs in res.values()),
            "mean_seq_prob": float(np.mean([c["seq_prob"] for c in flat])) if flat else 0.0,
        }
    # 3. replay buffer (idempotent on restart: the same entries in the same order)
    before = len(buffer)
    for p in problems:
        for role, res in produced:
            for c in res[p.task_id]:
                buffer.add(ReplayEntry(
                    task_id=p.task_id, completion=c["completion"], program=c["program"],
                    p=sequence_p(c, cfg.p_mode), pass_rate=float(c["pass_rate"]),
                    tests_passed=int(c["tests_passed"]), tests_total=int(c["tests_total"]),
                    source=c["model"], iteration=k, origin=cfg.generation,
                ))
    log(f"[iter {k}] replay buffer: {len(buffer)} programs ({len(buffer) - before} new)")
    # 4. prioritized replay (over the programs at or above min_pass_rate)
    all_entries = list(buffer.entries)
    entries = eligible(all_entries, cfg.min_pass_rate)
    if not entries:
        raise ConfigError(f"no program in the replay buffer passes min_pass_rate={cfg.min_pass_rate:g} "
                          f"({len(all_entries)} programs, none eligible); lower min_pass_rate")
    values = [e.value(cfg.p2_alpha) for e in entries]
    n_draw = cfg.replay_size or len(entries)
    rng = np.random.default_rng(derive_seed(cfg.seed, "draw", k))
    d = draw(values, n_draw, cfg.sampling_method, cfg.sampling_alpha, rng,
             is_beta=cfg.is_beta if cfg.is_weights else None)
    samp = sampling_stats(entries, d, cfg.sampling_method, cfg.sampling_alpha,
                          cfg.is_beta if cfg.is_weights else None, cfg.p2_alpha)
    samp.update(min_pass_rate=cfg.min_pass_rate, eligible_programs=len(entries),
                excluded_programs=len(all_entries) - len(entries), p_mode=cfg.p_mode)
    log(f"[iter {k}] drew {len(d.indices)} ({samp['unique_programs_drawn']} unique programs, "
        f"{samp['share_fully_passing_drawn']:.0%} fully passing, {samp['share_zero_pass_drawn']:.0%} zero-pass)")
    write_json(it_dir / "draw.json", {
        "indices": d.indices, "is_weights": d.is_weights,
        "drawn": [{"task_id": entries[i].task_id, "key": entries[i].key} for i in d.indices]})
    # 5. fine-tune the target on prompts in the target's format
    by_id = {p.task_id: p for p in plan.train}
    tstyle = _style(plan.target_spec)
    from codedistill.btp.trainer import load_tokenizer
    from codedistill.prompts import render_prompt

    ttok = load_tokenizer(target_path(plan)) if tstyle.style == "chat" else None
    examples = []
    for i, w in zip(d.indices, d.is_weights):
        e = entries[i]
        prob = by_id[e.task_id]
        examples.append(TrainExample(prompt=render_prompt(prob, tstyle, ttok),
                                     completion=training_completion(prob, e.completion, tstyle),
                                     weight=w, task_id=e.task_id))
    models._drop()
    train_info = train_iteration(plan, k, examples, log)
    return {
        "iteration": k,
        "mode": cfg.mode,
        "generation": gen_stats,
        "buffer": buffer_stats(all_entries, cfg.p2_alpha, k),
        "p2_alpha": cfg.p2_alpha,
        "sampling": samp,
        "training": train_info,
    }


def sequence_p(c: dict[str, Any], p_mode: str) -> float:
    """P of P2Value for one candidate: the length-normalised ``seq_prob`` (exp of the mean
    token log-probability) or, ``raw``, the paper's product of token probabilities
    ``exp(sum logprob)`` (tiny for long programs: P then hardly orders anything)."""
    import math

    if p_mode == "raw":
        lp = float(c.get("logprob", float("nan")))
        v = math.exp(lp) if math.isfinite(lp) else 0.0
    else:
        v = float(c["seq_prob"])
    return min(1.0, max(0.0, v if math.isfinite(v) else 0.0))


def eligible(entries: Sequence[ReplayEntry], min_pass_rate: float) -> list[ReplayEntry]:
    """Programs the draw may pick: all at 0; at any value > 0 zero-pass programs are out and
    only pass_rate >= min_pass_rate stays (1.0: only fully passing, rejection-sampling FT)."""
    if min_pass_rate <= 0:
        return list(entries)
    return [e for e in entries if e.pass_rate > 0 and e.pass_rate >= min_pass_rate - 1e-12]


def protocol_record(plan: Plan, ds: str) -> dict[str, Any]:
    """How the numbers of one evaluation set were measured (report/protocol.py reads it)."""
    cfg = plan.cfg
    return {"preset": cfg.eval_protocol, "shots": plan.eval_shots.get(ds, 0), "temperature": cfg.eval_temperature,
            "top_p": cfg.eval_top_p, "num_samples": cfg.eval_num_samples, "split": cfg.eval_split,
            "n_problems": len(plan.evals[ds]), "method": "plain"}


# ----------------------------------------------------------------------------- outputs


def build_comparison(plan: Plan, evals: dict[str, Any]) -> dict[str, Any]:
    from codedistill.metrics import paired_bootstrap

    cfg = plan.cfg
    last = f"target_iter{cfg.n_iterations}"
    out: dict[str, Any] = {
        "source_model": plan.source_spec.alias, "target_model": plan.target_spec.alias,
        "mode": cfg.mode, "train_dataset": cfg.dataset, "n_train_problems": len(plan.train),
        "n_iterations": cfg.n_iterations, "seed": cfg.seed,
        "allow_overlap": cfg.allow_overlap, "overlapping_train_problems": plan.overlap,
        "near_duplicate_descriptions": plan.near_duplicates,
        "dropped_overlapping_train_problems": plan.dropped,
        "eval_num_samples": cfg.eval_num_samples, "eval_temperature": cfg.eval_temperature,
        "eval_protocol": cfg.eval_protocol, "eval_split": cfg.eval_split,
        "skipped_eval_datasets": plan.skipped_evals,
        "iteration_problems": cfg.iteration_problems,
        "iteration_problem_counts": [len(plan.iteration_problems(k)) for k in range(1, cfg.n_iterations + 1)],
        "datasets": {},
    }
    for ds in plan.evals:
        before = evals["target_iter0"][ds]
        after = evals[last][ds]
        entry: dict[str, Any] = {
            "n_problems": len(plan.evals[ds]),
            "protocol": protocol_record(plan, ds),
            "target_before": before["metrics"],
            "target_after": after["metrics"],
            "target_per_iteration": {k: v[ds]["metrics"] for k, v in evals.items() if k.startswith("target_iter")},
            "improvement": {f"pass@{k}": paired_bootstrap(before["counts"], after["counts"], k=k,
                                                          seed=cfg.seed).to_dict()
                            for k in cfg.ks()},
        }
        if "source" in evals:
            entry["source"] = evals["source"][ds]["metrics"]
        out["datasets"][ds] = entry
    return out
