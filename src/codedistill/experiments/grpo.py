"""An outside baseline no BTP paper ran: online RL with TRL's GRPO on the same problems.

The target (LoRA, as in BTP) samples ``G`` programs per training problem (``G`` = BTP's
beams or samples per problem), each is run in the sandbox (``codedistill.evaluation.
execute`` with the run's SandboxPool, never in-process) and rewarded with its pass rate,
and GRPO updates the policy from the group-relative advantages. Every training problem is
visited once, so GRPO samples exactly as many programs as BTP's beam phase
(problems x G). The result is evaluated like every BTP variant (``eval/target_iter0``
shared through the generation cache, ``eval/target_iter1`` after training) and written
as a BTP-shaped run directory (comparison.json, iter_1/stats.json, generated.jsonl).

Resume: a finished training (``iter_1/DONE``) is never redone; a training killed midway
is restarted from the base model with the same seed (on CPU it takes minutes).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from codedistill.btp.config import BTPConfig
from codedistill.btp.phases.finetune import train_settings
from codedistill.btp.plan import ResolvedInputs
from codedistill.btp.runner import open_run_dir, run_experiment
from codedistill.btp.state import RunState
from codedistill.errors import ConfigError
from codedistill.evaluation import execute
from codedistill.models.loading import load_causal_lm, load_tokenizer
from codedistill.prompts import PromptStyle, render_prompt, to_program
from codedistill.report.plots import plot_loss_curves
from codedistill.runs import JsonlWriter, derive_seed
from codedistill.ui import fmt_seconds

Log = Callable[[str], None]


def grpo_budget(cfg: BTPConfig, n_problems: int) -> dict[str, int]:
    """Programs per problem (the group size) and the total, equal to what BTP's source
    generates: its beams once, or fresh samples every iteration (generation=sample with
    iteration_problems=all), in which case GRPO makes as many passes over the problems."""
    g = cfg.num_beams if cfg.generation == "beam" else cfg.num_samples
    rounds = cfg.n_iterations if (cfg.generation == "sample" and cfg.iteration_problems == "all") else 1
    out = {"num_generations": g, "problems": n_problems, "programs": n_problems * g * rounds}
    if rounds > 1:
        out["rounds"] = rounds
    return out


class GRPOStep:
    """GRPO as the experiment's training step (one iteration)."""

    def __init__(self, budget: dict[str, int]):
        self.budget = budget

    def train(self, run: RunState, k: int) -> dict[str, Any]:
        run.models.release()
        stats = train_grpo(run, self.budget)
        run.generated["target_grpo"] = stats["generation"]["target"]["generated_new"]
        return stats

    def comparison_fields(self, stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"method": "grpo", "grpo": stats[0].get("budget")}

    def close(self) -> None:
        pass


def train_grpo(run: RunState, budget: dict[str, int]) -> dict[str, Any]:
    """GRPO on the training problems; saves iter_1/adapter (+ tokenizer). Returns the stats."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOTrainer

    inputs = run.inputs
    cfg = inputs.cfg
    it_dir = inputs.out / "iter_1"
    it_dir.mkdir(parents=True, exist_ok=True)
    spec = inputs.target_spec
    style = PromptStyle.of(spec)
    tok = load_tokenizer(inputs.target_path)
    g = budget["num_generations"]
    if g < 2:
        raise ConfigError("GRPO needs at least 2 programs per problem (num_beams / num_samples >= 2)")
    prompts_per_step = max(1, min(4, len(inputs.train)))
    rows = [
        {"prompt": render_prompt(p, style, tok if style.style == "chat" else None), "task_id": p.task_id}
        for p in inputs.train
    ]
    dataset = Dataset.from_list(rows)
    seed = derive_seed(cfg.seed, "grpo")
    settings = train_settings(inputs)
    (it_dir / "grpo_samples.tmp.jsonl").unlink(missing_ok=True)  # a killed earlier start's samples
    reward = PassRateReward(run, it_dir / "grpo_samples.tmp.jsonl")
    model = load_causal_lm(inputs.target_path, inputs.device, inputs.dtype(spec))
    peft_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=settings.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    args = _grpo_config(inputs, it_dir, budget, prompts_per_step, seed)
    trainer: Any = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
    )
    # TRL's per-step metrics go to iter_1/grpo_log.jsonl, not to the console (150 dict lines)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_grpo_progress(it_dir / "grpo_log.jsonl", reward.counter))
    t0 = time.time()
    run.log(
        f"[grpo] {budget['problems']} problems x {g} programs = {budget['programs']} sampled programs "
        f"({len(dataset) // prompts_per_step} steps of {g * prompts_per_step})"
    )
    trainer.train()
    reward.close()
    (it_dir / "grpo_samples.tmp.jsonl").replace(it_dir / "grpo_samples.jsonl")
    trainer.model.save_pretrained(str(it_dir / "adapter"))
    _log_rewards(run.log, trainer.state.log_history, reward.counter, time.time() - t0)
    tok.save_pretrained(str(it_dir / "adapter"))
    hist = [h for h in trainer.state.log_history if "loss" in h]
    losses = [float(h["loss"]) for h in hist]
    with JsonlWriter(it_dir / "train_log.jsonl") as w:
        for i, h in enumerate(hist):
            w.write({"step": i + 1, "loss": float(h["loss"]), "reward": h.get("reward")})
    del trainer, model
    torch.manual_seed(0)
    training = {
        "method": "grpo",
        "losses": losses,
        "steps": len(losses),
        "seconds": round(time.time() - t0, 2),
        "seed": seed,
        "learning_rate": cfg.learning_rate,
        "lora_r": cfg.lora_r,
        "prompts_per_step": prompts_per_step,
        "num_generations": g,
        "beta": 0.0,
        "rewards": [h.get("reward") for h in hist],
    }
    return _grpo_stats(inputs, reward.counter, budget, training)


def _grpo_config(inputs: ResolvedInputs, it_dir: Path, budget: dict[str, int], prompts_per_step: int, seed: int) -> Any:
    from trl import GRPOConfig

    cfg = inputs.cfg
    g = budget["num_generations"]
    return GRPOConfig(
        output_dir=str(it_dir / "grpo_trainer"),
        per_device_train_batch_size=g * prompts_per_step,
        gradient_accumulation_steps=1,
        num_generations=g,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.gen_temperature,
        top_p=cfg.gen_top_p,
        learning_rate=cfg.learning_rate,
        num_train_epochs=budget.get("rounds", 1),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=inputs.device == "cpu",
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        beta=0.0,
    )


def _grpo_stats(
    inputs: ResolvedInputs, counter: dict[str, Any], budget: dict[str, int], training: dict[str, Any]
) -> dict[str, Any]:
    """iter_1/stats.json's content (before the evaluation is added)."""
    n = max(1, counter["programs"])
    return {
        "iteration": 1,
        "mode": "grpo",
        "generation": {
            "target": {
                "model": inputs.target_spec.alias,
                "candidates": counter["programs"],
                "generated_new": counter["programs"],
                "problems": len(inputs.train),
                "share_passing": counter["passed"] / n,
                "mean_pass_rate": counter["reward_sum"] / n,
            }
        },
        "budget": budget,
        "training": training,
    }


class PassRateReward:
    """TRL's reward function: each sampled program run in the sandbox (the run's pool),
    rewarded with its pass rate; every sample logged to ``samples_path``."""

    __name__ = "pass_rate_reward"  # TRL names the reward's metrics after it

    def __init__(self, run: RunState, samples_path: Path):
        self.run = run
        self.by_id = {p.task_id: p for p in run.inputs.train}
        self.style = PromptStyle.of(run.inputs.target_spec)
        self.samples_log = JsonlWriter(samples_path)
        self.counter: dict[str, Any] = {"programs": 0, "passed": 0, "reward_sum": 0.0}

    def __call__(self, prompts: list[Any], completions: list[Any], task_id: list[str], **kw: Any) -> list[float | None]:
        cfg = self.run.inputs.cfg
        pairs, recs = [], []
        for text, tid in zip(completions, task_id):
            prob = self.by_id[tid]
            completion, program = to_program(prob, self.style, text if isinstance(text, str) else text[-1]["content"])
            pairs.append((program, prob))
            recs.append({"task_id": tid, "completion": completion})
        verdicts = execute(pairs, workers=cfg.workers, timeout=cfg.timeout, pool=self.run.pool)
        rewards: list[float | None] = [float(v["pass_rate"]) for v in verdicts]
        for r, v in zip(recs, verdicts):
            self.samples_log.write({**r, "pass_rate": v["pass_rate"], "passed": v["passed"]})
        self.counter["programs"] += len(rewards)
        self.counter["passed"] += sum(bool(v["passed"]) for v in verdicts)
        self.counter["reward_sum"] += sum(float(v["pass_rate"]) for v in verdicts)
        return rewards

    def close(self) -> None:
        self.samples_log.close()


def _log_rewards(log: Log, history: list[dict[str, Any]], counter: dict[str, Any], seconds: float) -> None:
    rw = [float(h["reward"]) for h in history if "reward" in h]
    q = max(1, len(rw) // 10)
    trend = f"; mean reward first {q} steps {sum(rw[:q]) / q:.3f} -> last {q} {sum(rw[-q:]) / q:.3f}" if rw else ""
    log(
        f"[grpo] {len(rw)} step{'' if len(rw) == 1 else 's'}, {counter['programs']} programs sampled and tested "
        f"({counter['passed']} passed) in {fmt_seconds(seconds)}{trend}"
    )


def _grpo_progress(path: Any, counter: dict[str, Any]) -> Any:
    """A TrainerCallback: every logged step's metrics to ``path`` (JSONL), and a progress bar
    with the mean reward on a terminal."""
    from transformers import TrainerCallback

    class GRPOProgress(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Any = None
            self.writer: JsonlWriter | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            path.unlink(missing_ok=True)  # a killed earlier start's steps: this start trains from scratch
            self.writer = JsonlWriter(path)
            if state.is_world_process_zero and sys.stderr.isatty():
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, desc="GRPO", unit="step", leave=False)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if self.writer is not None and logs:
                self.writer.write({"step": state.global_step, **logs})
            if self.bar is not None:
                self.bar.n = state.global_step
                if logs and "reward" in logs:
                    self.bar.set_postfix(
                        reward=f"{float(logs['reward']):.3f}", programs=counter["programs"], refresh=False
                    )
                self.bar.refresh()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.close()
            if self.writer is not None:
                self.writer.close()

    return GRPOProgress()


def run_grpo(cfg: BTPConfig, log: Log = print) -> dict[str, Any]:
    """The GRPO baseline as a run directory shaped like a one-iteration BTP run."""
    inputs = ResolvedInputs(cfg.model_copy(update={"n_iterations": 1, "use_lora": True, "mode": "finetune"}))
    budget = grpo_budget(cfg, len(inputs.train))
    config = {
        **inputs.cfg.experiment_dict(),
        "method": "grpo",
        "grpo": budget,
        "target_spec": inputs.target_spec.to_dict(),
    }
    resumed = open_run_dir(inputs, config, kind="grpo")
    log(f"GRPO run in {inputs.out}{' (resuming)' if resumed else ''}")
    outcome = run_experiment(inputs, GRPOStep(budget), log)
    try:
        plot_loss_curves([(1, outcome.stats[0]["training"]["losses"])], inputs.out / "plots" / "loss_curve.png")
    except Exception:  # a plot never fails a run
        pass
    return outcome.comparison
