"""The BTP loop: Beam search -> Testing -> Prioritized replay -> fine-tune, iterated.

Run directory layout::

    config.json, starts.jsonl          (codedistill.runs.RunDir)
    plan.json                          what the run does, phase by phase, and its time estimate
    generations/<role>_<tag>.jsonl     one record per problem: candidates (+ seq_prob)
    generations/<role>_<tag>.verdicts.jsonl   one record per problem: verdicts
    replay_buffer.jsonl                every tested program, deduplicated per problem
    eval/<stage>/<dataset>/            per problem: n samples + verdicts (stage: target_iter0,
                                       source, target_iter1, ...)
    iter_K/draw.json, iter_K/train_log.jsonl, iter_K/adapter/ (or model/), iter_K/merged/
    iter_K/stats.json, iter_K/DONE
    comparison.json, generated.jsonl, report.md, plots/*.png

Resume: every JSONL is append-only (flush + fsync per record) and read back on restart;
work is done in fixed chunks of problems whose seeds depend only on (seed, phase,
iteration, first task_id of the chunk), so a chunk redone after a kill gives the same
result. An iteration with a DONE marker is never redone; one without is redone from its
first unfinished phase (generation, testing and evaluation records are reused,
training is rerun from the previous iteration's saved adapter with the same seed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from codedistill.btp.announce import announce_plan
from codedistill.btp.config import BTPConfig
from codedistill.btp.phases.finetune import train_iteration, train_settings
from codedistill.btp.phases.generate import generate_for_iteration
from codedistill.btp.phases.replay import add_to_buffer, prioritized_draw, training_examples
from codedistill.btp.plan import ResolvedInputs
from codedistill.btp.replay import ReplayBuffer
from codedistill.btp.runner import OnIteration, open_run_dir, run_experiment
from codedistill.btp.state import RunState
from codedistill.btp.stats import buffer_stats
from codedistill.generation import describe
from codedistill.models.preflight import preflight_btp
from codedistill.report import write_run_report
from codedistill.runs import write_json
from codedistill.training.settings import check_training

Log = Callable[[str], None]


class ReplayFinetune:
    """BTP's training step: generate and test, fill the replay buffer, draw by priority,
    fine-tune on the draw."""

    def __init__(self, inputs: ResolvedInputs):
        self.buffer = ReplayBuffer(inputs.out / "replay_buffer.jsonl")

    def train(self, run: RunState, k: int) -> dict[str, Any]:
        cfg, log = run.inputs.cfg, run.log
        # 1-2. beam (or sampling) phase and testing phase, per generating model
        problems = run.inputs.iteration_problems(k)
        produced, gen_stats = generate_for_iteration(run, k, problems)
        # 3. replay buffer
        added = add_to_buffer(self.buffer, problems, produced, k, cfg)
        log(f"[iter {k}] replay buffer: {len(self.buffer)} programs ({added} new)")
        # 4. prioritized replay (over the programs at or above min_pass_rate)
        all_entries = list(self.buffer.entries)
        replay = prioritized_draw(all_entries, cfg, k)
        samp = replay.stats
        log(
            f"[iter {k}] drew {len(replay.drawn.indices)} ({samp['unique_programs_drawn']} unique programs, "
            f"{samp['share_fully_passing_drawn']:.0%} fully passing, {samp['share_zero_pass_drawn']:.0%} zero-pass)"
        )
        write_json(run.out / f"iter_{k}" / "draw.json", replay.record())
        # 5. fine-tune the target on prompts in the target's format
        examples = training_examples(run.inputs, replay)
        run.models.release()
        train_info = train_iteration(run.inputs, k, examples, log)
        return {
            "iteration": k,
            "mode": cfg.mode,
            "generation": gen_stats,
            "buffer": buffer_stats(all_entries, cfg.p2_alpha, k),
            "p2_alpha": cfg.p2_alpha,
            "sampling": samp,
            "training": train_info,
        }

    def comparison_fields(self, stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.buffer.close()


def run_btp(
    cfg: BTPConfig, log: Log = print, on_iteration: OnIteration | None = None, chosen_on: Collection[str] = ()
) -> dict[str, Any]:
    """Run (or resume) a whole BTP experiment; returns comparison.json's content.

    ``on_iteration(k, metrics)`` is called after iteration k's evaluation (metrics: dataset
    -> pass@k report), also for iterations a resumed run finds done; an exception it raises
    (e.g. a hyperparameter search pruning the trial) stops the run after that iteration.
    ``chosen_on``: the MBPP splits this run's settings were chosen on (see ResolvedInputs)."""
    inputs = ResolvedInputs(cfg, chosen_on=chosen_on)
    checked = preflight_btp(inputs)  # unreachable hub / too large: one clear line, before any work
    check_training(train_settings(inputs), inputs.device)  # QLoRA / trackers, before any work
    resumed = open_run_dir(inputs, run_config(inputs, log), kind="btp")
    log(
        f"BTP run in {inputs.out}{' (resuming)' if resumed else ''}: {len(inputs.train)} train problems, "
        f"eval on {', '.join(f'{d} ({len(ps)})' for d, ps in inputs.evals.items())}"
    )
    estimate = announce_plan(inputs, checked, log)
    if cfg.n_iterations > 1 and cfg.iteration_problems == "all" and cfg.mode == "finetune" and cfg.generation == "beam":
        log(
            "note: the source's beams are deterministic and iteration_problems=all, so iterations 2.."
            f"{cfg.n_iterations} add no new programs: each re-draws the same buffer and trains further "
            "(iteration_problems: slices gives each iteration fresh training problems)"
        )
    t_start = time.time()
    outcome = run_experiment(inputs, ReplayFinetune(inputs), log, estimate, on_iteration)
    log(f"done: {write_run_report(inputs.out, elapsed=time.time() - t_start)}")
    return outcome.comparison


def run_config(inputs: ResolvedInputs, log: Log) -> dict[str, Any]:
    """config.json's experiment part: the settings, both models, served backends, a beam fallback."""
    cfg = inputs.cfg
    config = {
        **cfg.experiment_dict(),
        "source_spec": inputs.source_spec.to_dict(),
        "target_spec": inputs.target_spec.to_dict(),
    }
    if inputs.source_backend != "hf" or inputs.target_backend != "hf":
        config["generation_backends"] = {
            "source": describe(inputs.source_spec, inputs.source_backend, cfg.serving),
            "target": describe(inputs.target_spec, inputs.target_backend, cfg.serving),
        }
    if inputs.beam_fallback:
        config["beam_search_fallback"] = inputs.beam_fallback
        log(f"note: {inputs.beam_fallback}")
    return config
