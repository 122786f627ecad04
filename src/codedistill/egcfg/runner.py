"""EG-CFG inside ``codedistill baseline --method egcfg`` (and a measurement helper).

:func:`make_egcfg_sampler` gives the baseline its ``generate(chunk, chunk_seed)``: each of
the ``num_samples`` programs per problem is one :meth:`EGCFGSolver.solve` with its own seed,
and every solve appends one record to ``<run dir>/egcfg_log.jsonl``. ``cfg.egcfg`` holds the
:class:`EGCFGConfig` fields (``max_new_tokens`` defaults to the sampling one).

Note: the baseline resumes by whole chunks, so a chunk interrupted half-way is solved again
and its problems' records appear twice in the append-only log; readers should keep the last
record per (task_id, sample_index).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codedistill.data.problem import Problem
from codedistill.egcfg.agents import EGCFGSolver, append_log
from codedistill.egcfg.config import EGCFGConfig
from codedistill.runs import derive_seed

LOG_NAME = "egcfg_log.jsonl"


def egcfg_config_from(cfg: Any) -> EGCFGConfig:
    values = dict(getattr(cfg, "egcfg", {}) or {})
    sampling = getattr(cfg, "sampling", None)
    if sampling is not None:
        values.setdefault("max_new_tokens", sampling.max_new_tokens)
        values.setdefault("top_p", sampling.top_p)
    if getattr(cfg, "timeout", None):
        values.setdefault("exec_timeout_s", max(float(cfg.timeout), 1.0) * 3)
    return EGCFGConfig(**values)


def make_egcfg_sampler(gen: Any, style: Any, cfg: Any, out: Path | str | None, pool: Any = None):
    """``generate(problems, chunk_seed) -> [[Candidate] * num_samples]`` for the baseline."""
    from codedistill.egcfg.signal import prompt_builder
    from codedistill.prompts import render_prompt, stops_for, to_program

    from codedistill.execution import Job

    econf = egcfg_config_from(cfg)
    num_samples = cfg.sampling.num_samples
    solver = EGCFGSolver(
        gen.model, gen.tokenizer, econf, pool=pool,
        add_special_tokens=getattr(gen, "add_special_tokens", True),
        to_program=lambda p, text: to_program(p, style, text)[1],
    )
    log_path = Path(out) / LOG_NAME if out is not None else None

    def generate(chunk: list[Problem], chunk_seed: int) -> list[list[Any]]:
        res = []
        for p in chunk:
            prompt = render_prompt(p, style, gen.tokenizer)
            build = prompt_builder(p, style, gen.tokenizer, anchor=econf.signal_anchor,
                                   variants=econf.prompt_variants(), prompt=prompt)
            stop = list(stops_for(p, style))
            cands = []
            for i in range(num_samples):
                cand, rec = solver.solve(p, prompt, stop, seed=derive_seed(chunk_seed, p.task_id, i), build=build)
                rec["sample_index"] = i
                rec["guided"] = bool(p.visible_tests)
                if pool is not None and rec["agents"]:  # the first agent's own program, judged on the full tests
                    first = rec["agents"][0]["completion"]
                    rec["first_agent_passed"] = bool(pool.run([Job(to_program(p, style, first)[1], list(p.tests),
                                                                   p.test_setup)])[0].passed)
                if log_path is not None:
                    append_log(log_path, rec)
                # what the baseline's generator counters would say
                if hasattr(gen, "forward_passes"):
                    gen.forward_passes += rec["counters"]["forward_passes"]
                    gen.generated_tokens += rec["counters"]["generated_tokens"]
                cands.append(cand)
            res.append(cands)
        return res

    generate.solver = solver  # type: ignore[attr-defined]
    return generate
