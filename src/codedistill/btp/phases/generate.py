"""Phases 1-2 of an iteration: beam search (or sampling, or EG-CFG) on the training problems,
then every program tested in the sandbox.

Records go to ``generations/<role>_<tag>.jsonl`` (candidates) and ``.verdicts.jsonl``
(verdicts), one per problem, appended chunk by chunk and read back on restart. A chunk's
sampling seed depends only on (seed, role, tag, first task_id of the chunk), so a chunk
redone after a kill gives the same programs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from codedistill.baseline import check_prompts_fit
from codedistill.btp.gencache import ids_hash, model_id
from codedistill.btp.models import generating_roles
from codedistill.btp.state import RunState
from codedistill.data.problem import Problem
from codedistill.evaluation import execute
from codedistill.generation import computed_since, requests_sent
from codedistill.generation.base import served_fields
from codedistill.prompts import PromptStyle, render_prompt, stops_for, to_program
from codedistill.runs import JsonlWriter, chunks, derive_seed, read_jsonl
from codedistill.ui import Tracker, progress_tasks

#: {task_id: [candidate dicts with their verdict fields]}
Tested = dict[str, list[dict[str, Any]]]


def generation_tag(role: str, generation: str, k: int) -> str:
    """The source's beams are deterministic: computed once (``beam``); everything else per iteration."""
    return "beam" if role == "source" and generation == "beam" else f"iter{k}"


def generate_for_iteration(
    run: RunState, k: int, problems: Sequence[Problem]
) -> tuple[list[tuple[str, Tested]], dict[str, Any]]:
    """Every generating model of the mode (source, target or both) on iteration ``k``'s
    problems: [(role, tested programs)] and the generation statistics per role."""
    inputs = run.inputs
    produced: list[tuple[str, Tested]] = []
    stats: dict[str, Any] = {}
    for role in generating_roles(inputs.cfg.mode):
        if role == "source":
            spec, load = inputs.source_spec, run.models.source
        else:
            spec, load = inputs.target_spec, (lambda: run.models.target(k - 1))
        tag = generation_tag(role, inputs.cfg.generation, k)
        n_before = run.generated.get(f"{role}_{tag}", 0)
        # the cache can serve an unchanged model only: the source, or the target before training
        tested = generate_and_test(run, load, spec, role, tag, k, problems, cacheable=role == "source" or k == 1)
        produced.append((role, tested))
        stats[role] = generation_stats(
            tested,
            run.generated.get(f"{role}_{tag}", 0) - n_before,
            len(problems),
            inputs.cfg.iteration_problems,
            spec.alias,
            f"{role}_{tag}",
        )
    return produced, stats


def generation_stats(
    tested: Tested, generated_new: int, n_problems: int, iteration_problems: str, model: str, name: str
) -> dict[str, Any]:
    flat = [c for cs in tested.values() for c in cs]
    return {
        "generated_new": generated_new,
        "problems": n_problems,
        "iteration_problems": iteration_problems,
        "model": model,
        "candidates": len(flat),
        "file": f"generations/{name}.jsonl",
        "share_passing": float(np.mean([bool(c["passed"]) for c in flat])) if flat else 0.0,
        "mean_pass_rate": float(np.mean([c["pass_rate"] for c in flat])) if flat else 0.0,
        "problems_solved": sum(any(c["passed"] for c in cs) for cs in tested.values()),
        "mean_seq_prob": float(np.mean([c["seq_prob"] for c in flat])) if flat else 0.0,
    }


def gen_cache_parts(run: RunState, spec: Any, role: str, tag: str, problems: Sequence[Problem]) -> dict[str, Any]:
    """Everything that determines a generation phase's programs and verdicts (its cache key)."""
    cfg = run.inputs.cfg
    parts: dict[str, Any] = {
        "model": model_id(spec),
        "style": PromptStyle.of(spec).style,
        "role": role,
        "generation": cfg.generation,
        "max_new_tokens": cfg.max_new_tokens,
        "dataset": cfg.dataset,
        "data_path": cfg.data_path,
        "problems": ids_hash(problems),
        "n_problems": len(problems),
        "chunk_size": cfg.chunk_size,
        "timeout": cfg.timeout,
    }
    if cfg.generation == "beam":
        parts.update(num_beams=cfg.num_beams, length_penalty=cfg.length_penalty)
    else:
        parts.update(
            num_samples=cfg.num_samples, temperature=cfg.gen_temperature, top_p=cfg.gen_top_p, seed=cfg.seed, tag=tag
        )
    if cfg.generation == "egcfg":
        parts["egcfg"] = cfg.egcfg.model_dump(exclude_unset=True)
    if cfg.gen_shots:
        parts["gen_shots"] = cfg.gen_shots
    return parts


class _Records:
    """The phase's two record files, read back, and their writers while the phase runs."""

    def __init__(self, run: RunState, role: str, tag: str):
        gdir = run.out / "generations"
        self.gpath = gdir / f"{role}_{tag}.jsonl"
        self.vpath = gdir / f"{role}_{tag}.verdicts.jsonl"
        self.gens = {r["task_id"]: r for r in read_jsonl(self.gpath)}
        self.verd = {r["task_id"]: r for r in read_jsonl(self.vpath)}
        self.gw = JsonlWriter(self.gpath)
        self.vw = JsonlWriter(self.vpath)

    def close(self) -> None:
        self.gw.close()
        self.vw.close()

    def add_generation(self, rec: dict[str, Any]) -> None:
        self.gw.write(rec)
        self.gens[rec["task_id"]] = rec

    def add_verdicts(self, rec: dict[str, Any]) -> None:
        self.vw.write(rec)
        self.verd[rec["task_id"]] = rec

    def tested(self, problems: Sequence[Problem]) -> Tested:
        out: Tested = {}
        for p in problems:
            cs = self.gens[p.task_id]["candidates"]
            vs = self.verd[p.task_id]["verdicts"]
            out[p.task_id] = [{**c, **v, "model": self.gens[p.task_id]["model"]} for c, v in zip(cs, vs)]
        return out


class _Phase:
    """One generator's generation + testing over a list of problems, chunk by chunk."""

    def __init__(self, run: RunState, load: Callable[[], Any], spec: Any, role: str, tag: str, iteration: int):
        self.run, self.load, self.role, self.tag, self.iteration = run, load, role, tag, iteration
        self.cfg = run.inputs.cfg
        self.style = PromptStyle.of(spec)
        self.counter = f"{role}_{tag}"
        run.generated.setdefault(self.counter, 0)
        method = "beam search" if self.cfg.generation == "beam" else "sampling"
        # progress: the beam (or sampling) phase in problems, the testing phase in programs;
        # each phase's wall time is the time spent in it (they alternate chunk by chunk)
        self.gbar = Tracker(f"[iter {iteration}] {role} {method}", 0, "problems")
        self.tbar = Tracker(f"[iter {iteration}] testing {role}'s programs", 0, "programs")
        self.n_cands = self.n_passed = 0
        self.computed = True  # whether the last chunk's generation computed (not all from the response cache)
        self.pending: list[Problem] = []  # problems to generate, until checked against the context

    def fill_from_cache(self, rec: _Records, parts: dict[str, Any], problems: Sequence[Problem]) -> None:
        cache = self.run.cache
        assert cache is not None
        cg = cache.get_rows("gen", parts, "generations")
        cv = cache.get_rows("gen", parts, "verdicts")
        if cg is None or cv is None:
            return
        cg_by = {r["task_id"]: r for r in cg}
        cv_by = {r["task_id"]: r for r in cv}
        for p in problems:
            if p.task_id not in rec.gens and p.task_id in cg_by:
                rec.add_generation(cg_by[p.task_id])
            if p.task_id not in rec.verd and p.task_id in cv_by:
                rec.add_verdicts(cv_by[p.task_id])
        self.run.log(
            f"[iter {self.iteration}] {self.role}: {self.cfg.generation} generations and verdicts of "
            f"{len(problems)} problems from the generation cache"
        )

    def plan_chunks(self, rec: _Records, problems: Sequence[Problem]) -> list[list[Problem]]:
        """The chunks with untested problems; sizes the progress bars and says how many."""
        todo = [c for c in chunks(list(problems), self.cfg.chunk_size) if any(p.task_id not in rec.verd for p in c)]
        self.pending = [p for c in todo for p in c if p.task_id not in rec.gens]  # checked on the first chunk
        if todo:
            n = sum(len(c) for c in todo)
            self.run.log(
                f"[iter {self.iteration}] {self.role}: {self.cfg.generation} on {n} problems"
                f" ({len(problems) - n} done before)"
            )
        per = self.cfg.num_beams if self.cfg.generation == "beam" else self.cfg.num_samples
        self.gbar.set_total(sum(p.task_id not in rec.gens for c in todo for p in c))
        self.tbar.set_total(
            sum(
                len(rec.gens[p.task_id]["candidates"]) if p.task_id in rec.gens else per
                for c in todo
                for p in c
                if p.task_id not in rec.verd
            )
        )
        return todo

    def run_chunk(self, rec: _Records, chunk: list[Problem]) -> None:
        t_chunk, load_s = time.perf_counter(), 0.0
        missing = [p for p in chunk if p.task_id not in rec.gens]
        if missing:
            load_s = self.generate(rec, chunk, t_chunk)
            self.gbar.advance(len(missing))
            self.gbar.note = f"{self.n_cands} candidates"
        programs = self.test(rec, chunk)
        if missing:  # a chunk the response cache answered in full says nothing of the time
            self.run.chunk(programs, time.perf_counter() - t_chunk - load_s, self.computed)

    def generate(self, rec: _Records, chunk: list[Problem], t_chunk: float) -> float:
        """Candidates for the chunk's problems not generated yet; the seconds spent loading the model."""
        gen = self.load()
        load_s = time.perf_counter() - t_chunk  # loading the model (first chunk) is not the phase
        if self.pending:  # every prompt of the phase fits a served model's context, before any work
            ps = [self.run.inputs.for_generation(p) for p in self.pending]
            check_prompts_fit(gen, ps, self.style, self.cfg.max_new_tokens)
            self.pending = []
        before = requests_sent(gen)
        cands = self.candidates(gen, chunk)
        self.computed = computed_since(gen, before)
        for p, cs in zip(chunk, cands):
            if p.task_id in rec.gens:
                continue
            self.run.generated[self.counter] += len(cs)
            rows = []
            for i, c in enumerate(cs):
                completion, program = to_program(p, self.style, c.text)
                rows.append(
                    {
                        "index": i,
                        "completion": completion,
                        "program": program,
                        "logprob": c.logprob,
                        "num_tokens": c.num_tokens,
                        "seq_prob": c.seq_prob,
                        "finish_reason": c.finish_reason,
                        **served_fields(c),
                    }
                )
            rec.add_generation(
                {
                    "task_id": p.task_id,
                    "role": self.role,
                    "model": getattr(gen, "name", self.role),
                    "iteration": self.iteration,
                    "candidates": rows,
                }
            )
            self.n_cands += len(rows)
        self.gbar.add_time(time.perf_counter() - t_chunk - load_s)
        return load_s

    def candidates(self, gen: Any, chunk: list[Problem]) -> list[list[Any]]:
        cfg = self.cfg
        chunk = [self.run.inputs.for_generation(p) for p in chunk]
        prompts = [render_prompt(p, self.style, gen.tokenizer) for p in chunk]
        stop = stops_for(chunk[0], self.style)
        seed = derive_seed(cfg.seed, "gen", self.role, self.tag, chunk[0].task_id)
        if cfg.generation == "beam":
            return gen.beam_search(
                prompts,
                num_beams=cfg.num_beams,
                num_return_sequences=cfg.num_beams,
                max_new_tokens=cfg.max_new_tokens,
                stop=stop,
                length_penalty=cfg.length_penalty,
            )
        if cfg.generation == "egcfg":  # every EG-CFG agent's final program
            from codedistill.egcfg.runner import egcfg_agent_candidates  # torch: only for EG-CFG runs

            return egcfg_agent_candidates(
                gen,
                self.style,
                list(chunk),
                stop,
                cfg.egcfg.model_dump(exclude_unset=True),
                self.run.pool,
                seed=seed,
                max_new_tokens=cfg.max_new_tokens,
                log_path=self.run.out / "generations" / f"{self.counter}.egcfg_log.jsonl",
            )
        return gen.sample(
            prompts,
            n=cfg.num_samples,
            temperature=cfg.gen_temperature,
            top_p=cfg.gen_top_p,
            max_new_tokens=cfg.max_new_tokens,
            stop=stop,
            seed=seed,
        )

    def test(self, rec: _Records, chunk: list[Problem]) -> int:
        """The testing phase of the chunk's untested problems; the number of programs run."""
        need = [p for p in chunk if p.task_id not in rec.verd]
        pairs = [(c["program"], p) for p in need for c in rec.gens[p.task_id]["candidates"]]
        t_test = time.perf_counter()
        vs = execute(pairs, workers=self.cfg.workers, timeout=self.cfg.timeout, pool=self.run.pool)
        self.tbar.add_time(time.perf_counter() - t_test)
        self.tbar.advance(len(pairs))
        self.n_passed += sum(bool(v["passed"]) for v in vs)
        self.tbar.note = f"{self.n_passed} passed"
        k = 0
        for p in need:
            nc = len(rec.gens[p.task_id]["candidates"])
            rec.add_verdicts({"task_id": p.task_id, "verdicts": vs[k : k + nc]})
            k += nc
        return len(pairs)


def generate_and_test(
    run: RunState,
    load: Callable[[], Any],
    spec: Any,
    role: str,
    tag: str,
    iteration: int,
    problems: Sequence[Problem],
    cacheable: bool = False,
) -> Tested:
    """Beam phase + testing phase for one generator (``load()`` gives it, loaded only when
    something is left to generate) over ``problems``; {task_id: tested candidates} in
    problem order. ``cacheable``: the generator is an unchanged model whose programs the
    shared generation cache may hold (or receive)."""
    parts = gen_cache_parts(run, spec, role, tag, problems) if (run.cache and cacheable) else None
    phase = _Phase(run, load, spec, role, tag, iteration)
    rec = _Records(run, role, tag)
    try:
        with progress_tasks(phase.gbar, phase.tbar):
            if parts is not None and any(p.task_id not in rec.verd for p in problems):
                phase.fill_from_cache(rec, parts, problems)
            for chunk in phase.plan_chunks(rec, problems):
                phase.run_chunk(rec, chunk)
    finally:
        rec.close()
    if parts is not None and run.cache is not None and not run.cache.has("gen", parts):
        run.cache.put_rows(
            "gen",
            parts,
            {
                "generations": [rec.gens[p.task_id] for p in problems],
                "verdicts": [rec.verd[p.task_id] for p in problems],
            },
        )
    return rec.tested(problems)
