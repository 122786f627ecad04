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

import json
import time
from pathlib import Path
from typing import Any, Callable

from codedistill.btp.config import BTPConfig
from codedistill.report.plots import plot_loss_curves

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


def train_grpo(plan: Any, pool: Any, log: Log) -> dict[str, Any]:
    """GRPO on plan.train; saves iter_1/adapter (+ tokenizer). Returns the stats."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from codedistill.btp.loop import _default_device, _dtype, _style, target_path, train_settings
    from codedistill.btp.trainer import load_model, load_tokenizer
    from codedistill.evaluation import execute
    from codedistill.prompts import render_prompt, to_program
    from codedistill.runs import JsonlWriter, derive_seed
    from codedistill.ui import fmt_seconds

    cfg = plan.cfg
    it_dir = plan.out / "iter_1"
    it_dir.mkdir(parents=True, exist_ok=True)
    spec = plan.target_spec
    style = _style(spec)
    tok = load_tokenizer(target_path(plan))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    budget = getattr(plan, "grpo_budget", None) or grpo_budget(cfg, len(plan.train))
    g = budget["num_generations"]
    if g < 2:
        from codedistill.errors import ConfigError

        raise ConfigError("GRPO needs at least 2 programs per problem (num_beams / num_samples >= 2)")
    prompts_per_step = max(1, min(4, len(plan.train)))
    by_id = {p.task_id: p for p in plan.train}
    rows = [{"prompt": render_prompt(p, style, tok if style.style == "chat" else None), "task_id": p.task_id}
            for p in plan.train]
    dataset = Dataset.from_list(rows)
    seed = derive_seed(cfg.seed, "grpo")
    device = cfg.device or _default_device()
    settings = train_settings(plan)
    (it_dir / "grpo_samples.tmp.jsonl").unlink(missing_ok=True)  # a killed earlier start's samples
    samples_log = JsonlWriter(it_dir / "grpo_samples.tmp.jsonl")
    counter = {"programs": 0, "passed": 0, "reward_sum": 0.0}

    def pass_rate_reward(prompts, completions, task_id, **kw):  # noqa: ANN001 - TRL's signature
        pairs, recs = [], []
        for text, tid in zip(completions, task_id):
            prob = by_id[tid]
            completion, program = to_program(prob, style, text if isinstance(text, str) else text[-1]["content"])
            pairs.append((program, prob))
            recs.append({"task_id": tid, "completion": completion})
        verdicts = execute(pairs, workers=cfg.workers, timeout=cfg.timeout, pool=pool)
        rewards = [float(v["pass_rate"]) for v in verdicts]
        for r, v in zip(recs, verdicts):
            samples_log.write({**r, "pass_rate": v["pass_rate"], "passed": v["passed"]})
        counter["programs"] += len(rewards)
        counter["passed"] += sum(bool(v["passed"]) for v in verdicts)
        counter["reward_sum"] += sum(rewards)
        return rewards

    model = load_model(target_path(plan), device, _dtype(cfg, spec))
    targets = settings.lora_target_modules
    peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=targets, task_type="CAUSAL_LM")
    args = GRPOConfig(
        output_dir=str(it_dir / "grpo_trainer"), per_device_train_batch_size=g * prompts_per_step,
        gradient_accumulation_steps=1, num_generations=g, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.gen_temperature, top_p=cfg.gen_top_p, learning_rate=cfg.learning_rate,
        num_train_epochs=budget.get("rounds", 1), logging_steps=1, save_strategy="no", report_to="none", seed=seed,
        data_seed=seed, use_cpu=device == "cpu", bf16=False, fp16=False, disable_tqdm=True,
        beta=0.0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=pass_rate_reward, args=args, train_dataset=dataset,
                          processing_class=tok, peft_config=peft_config)
    # TRL's per-step metrics go to iter_1/grpo_log.jsonl, not to the console (150 dict lines)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_grpo_progress(it_dir / "grpo_log.jsonl", counter))
    t0 = time.time()
    log(f"[grpo] {budget['problems']} problems x {g} programs = {budget['programs']} sampled programs "
        f"({len(dataset) // prompts_per_step} steps of {g * prompts_per_step})")
    trainer.train()
    samples_log.close()
    (it_dir / "grpo_samples.tmp.jsonl").replace(it_dir / "grpo_samples.jsonl")
    trainer.model.save_pretrained(str(it_dir / "adapter"))
    rw = [float(h["reward"]) for h in trainer.state.log_history if "reward" in h]
    q = max(1, len(rw) // 10)
    trend = f"; mean reward first {q} steps {sum(rw[:q]) / q:.3f} -> last {q} {sum(rw[-q:]) / q:.3f}" if rw else ""
    log(f"[grpo] {len(rw)} step{'' if len(rw) == 1 else 's'}, {counter['programs']} programs sampled and tested "
        f"({counter['passed']} passed) in {fmt_seconds(time.time() - t0)}{trend}")
    tok.save_pretrained(str(it_dir / "adapter"))
    hist = [h for h in trainer.state.log_history if "loss" in h]
    losses = [float(h["loss"]) for h in hist]
    with JsonlWriter(it_dir / "train_log.jsonl") as w:
        for i, h in enumerate(hist):
            w.write({"step": i + 1, "loss": float(h["loss"]), "reward": h.get("reward")})
    del trainer, model
    torch.manual_seed(0)
    n = max(1, counter["programs"])
    return {
        "iteration": 1, "mode": "grpo",
        "generation": {"target": {"model": spec.alias, "candidates": counter["programs"],
                                  "generated_new": counter["programs"], "problems": len(plan.train),
                                  "share_passing": counter["passed"] / n,
                                  "mean_pass_rate": counter["reward_sum"] / n}},
        "budget": budget,
        "training": {"method": "grpo", "losses": losses, "steps": len(losses), "seconds": round(time.time() - t0, 2),
                     "seed": seed, "learning_rate": cfg.learning_rate, "lora_r": cfg.lora_r,
                     "prompts_per_step": prompts_per_step, "num_generations": g, "beta": 0.0,
                     "rewards": [h.get("reward") for h in hist]},
    }


def _grpo_progress(path: Any, counter: dict[str, Any]) -> Any:
    """A TrainerCallback: every logged step's metrics to ``path`` (JSONL), and a progress bar
    with the mean reward on a terminal."""
    import sys

    from transformers import TrainerCallback

    from codedistill.runs import JsonlWriter

    class GRPOProgress(TrainerCallback):
        def __init__(self) -> None:
            self.bar = None
            self.writer = None

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
                    self.bar.set_postfix(reward=f"{float(logs['reward']):.3f}", programs=counter["programs"],
                                         refresh=False)
                self.bar.refresh()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.close()
            if self.writer is not None:
                self.writer.close()

    return GRPOProgress()


def run_grpo(cfg: BTPConfig, log: Log = print) -> dict[str, Any]:
    """The GRPO baseline as a run directory shaped like a one-iteration BTP run."""
    from codedistill.btp.loop import Models, Plan, _quiet_transformers, build_comparison, evaluate
    from codedistill.execution import Limits, SandboxPool
    from codedistill.runs import JsonlWriter, RunDir, write_json

    budget_cfg = cfg
    cfg = cfg.model_copy(update={"n_iterations": 1, "use_lora": True, "mode": "finetune"})
    plan = Plan(cfg)
    plan.grpo_budget = grpo_budget(budget_cfg, len(plan.train))
    _quiet_transformers()
    config = {**cfg.experiment_dict(), "method": "grpo", "grpo": plan.grpo_budget,
              "target_spec": plan.target_spec.to_dict()}
    resumed = RunDir(plan.out).open(config, kind="grpo")
    log(f"GRPO run in {plan.out}{' (resuming)' if resumed else ''}")
    models = Models(plan, log)
    pool = SandboxPool(workers=cfg.workers, limits=Limits(timeout=cfg.timeout))
    it_dir = plan.out / "iter_1"
    stats: list[dict[str, Any]] = []
    try:
        evals: dict[str, Any] = {"target_iter0": evaluate(plan, lambda: models.target(0), plan.target_spec,
                                                          "target_iter0", pool, log)}
        if cfg.eval_source:
            evals["source"] = evaluate(plan, models.source, plan.source_spec, "source", pool, log)
        if (it_dir / "DONE").exists():
            st = json.loads((it_dir / "stats.json").read_text())
        else:
            models._drop()
            st = train_grpo(plan, pool, log)
            plan.generated["target_grpo"] = st["generation"]["target"]["generated_new"]
        evals["target_iter1"] = evaluate(plan, lambda: models.target(1), plan.target_spec, "target_iter1", pool, log)
        if not (it_dir / "DONE").exists():
            st["eval"] = {ds: r["metrics"] for ds, r in evals["target_iter1"].items()}
            write_json(it_dir / "stats.json", st)
            (it_dir / "DONE").write_text("done\n")
        stats.append(st)
    finally:
        pool.close()
        with JsonlWriter(plan.out / "generated.jsonl") as w:
            w.write({"generated": dict(plan.generated), "total": int(sum(plan.generated.values()))})
    comparison = build_comparison(plan, evals)
    comparison["method"] = "grpo"
    comparison["grpo"] = stats[0].get("budget")
    write_json(plan.out / "comparison.json", comparison)
    try:
        plot_loss_curves([(1, stats[0]["training"]["losses"])], plan.out / "plots" / "loss_curve.png")
    except Exception:  # a plot never fails a run
        pass
    return comparison
