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

import dataclasses
import json
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard

from codedistill.data.problem import Problem
from codedistill.egcfg.agents import EGCFGSolver, append_log
from codedistill.egcfg.config import EGCFGConfig
from codedistill.egcfg.served import ServedEGCFG
from codedistill.egcfg.signal import prompt_builder
from codedistill.errors import ConfigError
from codedistill.evaluation import execute
from codedistill.execution import Job
from codedistill.generation.base import Candidate, Generator, InProcessGenerator, TopKGenerator
from codedistill.prompts import render_prompt, stops_for, to_program
from codedistill.runs import derive_seed
from codedistill.ui import console

LOG_NAME = "egcfg_log.jsonl"

Sampler = Callable[[list[Problem], int], list[list[Candidate]]]

# BTP's EG-CFG solver per generator, kept while its settings stay the same
_SOLVERS: weakref.WeakKeyDictionary[Any, tuple[str, EGCFGSolver]] = weakref.WeakKeyDictionary()


def egcfg_config_from(cfg: Any) -> EGCFGConfig:
    values = dict(getattr(cfg, "egcfg", {}) or {})
    sampling = getattr(cfg, "sampling", None)
    if sampling is not None:
        values.setdefault("max_new_tokens", sampling.max_new_tokens)
        values.setdefault("top_p", sampling.top_p)
    if getattr(cfg, "timeout", None):
        values.setdefault("exec_timeout_s", max(float(cfg.timeout), 1.0) * 3)
    return EGCFGConfig(**values)


def _in_process(gen: Generator) -> TypeGuard[InProcessGenerator]:
    """An in-process transformers model (full logits) rather than a served one."""
    return hasattr(getattr(gen, "model", None), "config") and getattr(gen, "tokenizer", None) is not None


def _info(msg: str) -> None:
    console.print(msg, highlight=False, markup=False)


def _warn(msg: str) -> None:
    console.print(f"[yellow]{msg}[/yellow]", highlight=False)


def checked_visible_tests(problem: Problem, pool: Any) -> tuple[Problem, dict]:
    """Visible tests taken from a docstring (HumanEval) are checked against the dataset's
    reference solution in the sandbox, as upstream validated them; the ones the reference
    fails (an example that is not an executable check, e.g. HumanEval/130's ``tri(4) = 3``)
    are dropped. Other problems are returned as they are."""
    if (
        pool is None
        or not problem.visible_tests
        or not problem.reference
        or problem.meta.get("visible_tests_from") != "docstring"
    ):
        return problem, {}
    v = pool.run([Job(problem.reference, list(problem.visible_tests), problem.test_setup)])[0]
    per = list(getattr(v, "per_test", []) or [])
    if len(per) != len(problem.visible_tests):
        per = [bool(v.passed)] * len(problem.visible_tests)
    keep = tuple(t for t, ok in zip(problem.visible_tests, per) if ok)
    info = {
        "from_docstring": len(problem.visible_tests),
        "kept": len(keep),
        "dropped": [t for t, ok in zip(problem.visible_tests, per) if not ok],
    }
    return dataclasses.replace(problem, visible_tests=keep), info


def _checked_or_warned(problem: Problem, pool: Any) -> tuple[Problem, dict]:
    """:func:`checked_visible_tests`, with a warning when nothing is left to guide by."""
    problem, check = checked_visible_tests(problem, pool)
    if not problem.visible_tests:
        _warn(f"EG-CFG: {problem.task_id} has no visible tests: it runs UNGUIDED (plain greedy decoding)")
    return problem, check


def _annotate(rec: dict[str, Any], p: Problem, style: Any, index: int, check: dict, pool: Any) -> None:
    """What every EG-CFG sample record carries (in-process and served alike): its index, whether
    it was guided and by which visible tests, their reference check, and the first agent's own
    program judged on the full tests (its pass@1, beside the any-agent number; HumanEval+ /
    MBPP+: EvalPlus's verdict, as every evaluation judges)."""
    rec.update(sample_index=index, guided=bool(p.visible_tests), visible_tests=list(p.visible_tests))
    if check:
        rec["visible_check"] = check
    if pool is not None and rec["agents"]:
        first = to_program(p, style, rec["agents"][0]["completion"])[1]
        rec["first_agent_passed"] = bool(execute([(first, p)], pool=pool)[0]["passed"])


def summarize_log(path: Path | str, n_problems: int | None = None) -> dict[str, Any]:
    """What EG-CFG's numbers mean for one run, from its ``egcfg_log.jsonl`` (last record per
    (task_id, sample_index)): how many problems ran unguided (no visible tests), how often ANY
    agent passed the visible tests (on MBPP/synth those ARE the judging tests, so this is an
    oracle-selected "any of N agents passes", not single-sample pass@1), and the FIRST agent's
    own pass@1 on the full tests (one program, no selection by tests)."""
    recs: dict[tuple, dict] = {}
    p = Path(path)
    if p.exists():
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                recs[(r["task_id"], r.get("sample_index", 0))] = r
    rows = list(recs.values())
    unguided = sorted({r["task_id"] for r in rows if not r.get("guided", True)})
    first = [r["first_agent_passed"] for r in rows if "first_agent_passed" in r]
    out: dict[str, Any] = {
        "records": len(rows),
        "unguided_problems": len(unguided),
        "unguided_task_ids": unguided,
        "any_agent_visible_pass": (sum(bool(r.get("visible_passed")) for r in rows) / len(rows)) if rows else None,
        "first_agent_pass@1": (sum(first) / len(first)) if first else None,
        "mean_agents_run": (sum(r.get("agents_run", 0) for r in rows) / len(rows)) if rows else None,
        "sandbox_runs_per_problem": (sum(r["counters"]["sandbox_executions"] for r in rows) / len(rows))
        if rows
        else None,
    }
    return out


def summary_markdown(s: dict[str, Any], dataset: str = "") -> list[str]:
    """Report lines for :func:`summarize_log`'s summary."""

    def pct(x):
        return "n/a" if x is None else f"{x:.4f}"

    same = dataset in ("mbpp", "mbpp-sanitized", "synth")
    lines = [
        "",
        "## What EG-CFG's pass@1 means here",
        "",
        "- pass@1 above: the program EG-CFG returned (the first agent whose program passed the "
        "visible tests, else the best visible pass rate) judged on the full tests."
        + (
            ' On this dataset the visible tests ARE the judging tests, so it is an "any of N agents '
            'passes" number (oracle selection by the test suite), not single-sample pass@1.'
            if same
            else (
                " On mbpp+ the visible tests are MBPP's asserts, i.e. (part of) the base inputs: the base "
                "verdict is close to oracle-selected, the plus inputs stay unseen."
                if dataset == "mbpp+"
                else ""
            )
        ),
        f"- any agent passed the visible tests: {pct(s['any_agent_visible_pass'])}",
        f"- first agent's own pass@1 (one program, no selection): {pct(s['first_agent_pass@1'])}",
        f"- agents run per problem (mean): {pct(s['mean_agents_run'])}; sandbox runs per problem: "
        f"{pct(s['sandbox_runs_per_problem'])}",
    ]
    if s["unguided_problems"]:
        ids = ", ".join(s["unguided_task_ids"][:20]) + (" ..." if s["unguided_problems"] > 20 else "")
        lines.append(
            f"- **WARNING: EG-CFG ran UNGUIDED on {s['unguided_problems']} problem(s)** (no visible "
            f"tests: plain greedy decoding): {ids}"
        )
    return lines


def make_egcfg_sampler(gen: Generator, style: Any, cfg: Any, out: Path | str | None, pool: Any = None) -> Sampler:
    """``generate(problems, chunk_seed) -> [[Candidate] * num_samples]`` for the baseline."""
    if not _in_process(gen):
        return _served_sampler(gen, style, cfg, out, pool)
    econf = egcfg_config_from(cfg)
    num_samples = cfg.sampling.num_samples
    solver = EGCFGSolver(
        gen.model,
        gen.tokenizer,
        econf,
        pool=pool,
        add_special_tokens=gen.add_special_tokens,
        to_program=lambda p, text: to_program(p, style, text)[1],
    )
    log_path = Path(out) / LOG_NAME if out is not None else None

    def generate(chunk: list[Problem], chunk_seed: int) -> list[list[Candidate]]:
        res = []
        for p in chunk:
            p, check = _checked_or_warned(p, pool)
            prompt = render_prompt(p, style, gen.tokenizer)
            build = prompt_builder(
                p, style, gen.tokenizer, anchor=econf.signal_anchor, variants=econf.prompt_variants(), prompt=prompt
            )
            stop = list(stops_for(p, style))
            cands = []
            for i in range(num_samples):
                cand, rec = solver.solve(p, prompt, stop, seed=derive_seed(chunk_seed, p.task_id, i), build=build)
                _annotate(rec, p, style, i, check, pool)
                if log_path is not None:
                    append_log(log_path, rec)
                cnt = rec["counters"]
                _info(
                    f"EG-CFG {p.task_id}#{i}: {'guided' if rec['guided'] else 'UNGUIDED'}, "
                    f"{rec['agents_run']}/{rec['agents_total']} agents, {cnt['sandbox_executions']} sandbox runs, "
                    f"{cnt['forward_passes']} forward passes, visible tests "
                    f"{'passed' if rec['visible_passed'] else 'not passed'} ({cnt['wall_time_s']:.1f} s)"
                )
                # what the baseline's generator counters would say
                gen.forward_passes += rec["counters"]["forward_passes"]
                gen.generated_tokens += rec["counters"]["generated_tokens"]
                cands.append(cand)
            res.append(cands)
        return res

    generate.solver = solver  # type: ignore[attr-defined]
    return generate


def egcfg_agent_candidates(
    gen: Generator,
    style: Any,
    problems: list[Problem],
    stop: Any,
    settings: dict | None,
    pool: Any,
    seed: int = 0,
    max_new_tokens: int | None = None,
    log_path: Path | str | None = None,
) -> list[list[Candidate]]:
    """BTP's sampler with ``--generation egcfg``: EG-CFG's agents write each problem's programs
    with execution guidance, and EVERY agent's final program (not only the returned one) is a
    candidate, with P from its plain log-prob (the model without the signal, temperature 1, over
    its kept tokens) so that P2Value compares it with beam-search programs. With ``early_stop``
    (default) a problem's agents stop at the first one passing the visible tests, so the number
    of candidates per problem varies. Needs the in-process HF backend (full logits)."""
    if not _in_process(gen):
        raise ConfigError(
            "generation=egcfg needs the in-process HF backend (EG-CFG guides full logits); "
            "use --source-backend hf, or generation=beam/sample for served models"
        )
    values = {"max_new_tokens": max_new_tokens, **(settings or {})} if max_new_tokens else dict(settings or {})
    econf = EGCFGConfig(**values)
    solver = _btp_solver(gen, econf, style, pool)
    out: list[list[Candidate]] = []
    for p in problems:
        q, _ = checked_visible_tests(p, pool)
        prompt = render_prompt(q, style, gen.tokenizer)
        build = prompt_builder(
            q, style, gen.tokenizer, anchor=econf.signal_anchor, variants=econf.prompt_variants(), prompt=prompt
        )
        _, rec = solver.solve(q, prompt, list(stop), seed=derive_seed(seed, p.task_id), build=build)
        rec["guided"] = bool(q.visible_tests)
        if log_path is not None:
            append_log(log_path, rec)
        cands = []
        for a in rec["agents"]:
            if a["finish_reason"] == "cancelled":
                continue
            cands.append(
                Candidate(
                    text=a["completion"],
                    num_tokens=a["num_tokens"],
                    logprob=a["plain_logprob"],
                    finish_reason="length" if a["finish_reason"] == "length" else "stop",
                    meta={"agent": a["agent"], "visible": a["visible"]},
                )
            )
        out.append(cands)
    return out


def _btp_solver(gen: InProcessGenerator, econf: EGCFGConfig, style: Any, pool: Any) -> EGCFGSolver:
    """The solver of ``gen`` for ``econf`` (made once per generator and settings)."""
    key = json.dumps(econf.model_dump(), sort_keys=True, default=str)
    cached = _SOLVERS.get(gen)
    if cached is not None and cached[0] == key:
        return cached[1]
    solver = EGCFGSolver(
        gen.model,
        gen.tokenizer,
        econf,
        pool=pool,
        add_special_tokens=gen.add_special_tokens,
        to_program=lambda p, text: to_program(p, style, text)[1],
        log_signals=False,
    )
    _SOLVERS[gen] = (key, solver)
    return solver


def _served_sampler(gen: Generator, style: Any, cfg: Any, out: Path | str | None, pool: Any) -> Sampler:
    """``baseline --method egcfg`` on a served backend (vLLM, OpenAI-compatible): EG-CFG through
    the server's top-k log-probs (:class:`~codedistill.egcfg.served.ServedEGCFG`). Base prompts
    only; the returned program carries no log-prob (NaN: the guided tokens were chosen from two
    top-k lists, not one distribution)."""
    if not isinstance(gen, TopKGenerator):
        raise ConfigError(
            "--method egcfg needs full logits (HF backend: --backend hf) or a server with top-k "
            "log-probs (vLLM / OpenAI-compatible)"
        )
    if getattr(style, "style", style) != "base":
        raise ConfigError(
            "served EG-CFG takes base (completion) prompts; use the model's base variant "
            "(--variant base) or the HF backend for chat models"
        )
    econf = egcfg_config_from(cfg)
    served = ServedEGCFG(
        gen,
        econf,
        pool=pool,
        k=min(20, int(getattr(gen, "top_logprobs_limit", 20) or 20)),
        to_program=lambda p, text: to_program(p, style, text)[1],
    )
    log_path = Path(out) / LOG_NAME if out is not None else None

    def generate(chunk: list[Problem], chunk_seed: int) -> list[list[Candidate]]:
        res = []
        for p in chunk:
            p, check = _checked_or_warned(p, pool)
            build = prompt_builder(p, style, anchor=econf.signal_anchor, variants=econf.prompt_variants())
            cands = []
            for i in range(cfg.sampling.num_samples):
                completion, rec = served.solve(
                    p, build, list(stops_for(p, style)), seed=derive_seed(chunk_seed, p.task_id, i) & 0xFFFFFFF
                )
                rec["counters"] = {
                    "sandbox_executions": rec["sandbox_executions"],
                    "requests": rec["requests"],
                    "forward_passes": rec["requests"],
                    "generated_tokens": 0,
                    "wall_time_s": rec["wall_time_s"],
                }
                _annotate(rec, p, style, i, check, pool)
                for a in rec["agents"]:
                    a.pop("steps", None)
                if log_path is not None:
                    append_log(log_path, rec)
                _info(
                    f"EG-CFG (served) {p.task_id}#{i}: {'guided' if rec['guided'] else 'UNGUIDED'}, "
                    f"{rec['agents_run']}/{rec['agents_total']} agents, {rec['sandbox_executions']} sandbox runs, "
                    f"{rec['requests']} requests ({rec['wall_time_s']:.1f} s)"
                )
                cands.append(
                    Candidate(
                        text=completion,
                        num_tokens=0,
                        logprob=float("nan"),
                        meta={"egcfg": rec["counters"], "served": True},
                    )
                )
            res.append(cands)
        return res

    generate.solver = served  # type: ignore[attr-defined]
    return generate
