"""Phase 5 of an iteration: fine-tune the target on the drawn programs, from the previous
iteration's checkpoint (or the base), in this process or under ``accelerate launch``, and
save ``iter_K/adapter`` (or ``model``), ``train_log.jsonl``, ``train.json`` and, if asked,
``merged/``."""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codedistill.btp.plan import ResolvedInputs
from codedistill.models.loading import load_tokenizer
from codedistill.runs import JsonlWriter, derive_seed, write_json
from codedistill.training.launch import run_launched, write_job
from codedistill.training.settings import TrainExample, TrainSettings, train_settings_from

Log = Callable[[str], None]


def train_settings(inputs: ResolvedInputs) -> TrainSettings:
    """The fine-tuning phase's settings, from the run's declared training section."""
    spec = inputs.target_spec
    return train_settings_from(
        inputs.cfg, default_lora_targets=spec.lora_target_modules, prompt_special_tokens=spec.prompt_style == "base"
    )


def checkpoint_dir(inputs: ResolvedInputs, iteration: int) -> Path:
    """Where iteration ``iteration``'s trained weights are: ``iter_K/adapter`` (LoRA) or ``iter_K/model``."""
    return inputs.out / f"iter_{iteration}" / ("adapter" if inputs.cfg.use_lora else "model")


def train_iteration(inputs: ResolvedInputs, iteration: int, examples: list[TrainExample], log: Log) -> dict[str, Any]:
    """Fine-tune from the previous iteration's checkpoint (or the base) and save; train.json's content."""
    cfg = inputs.cfg
    it_dir = inputs.out / f"iter_{iteration}"
    prev = checkpoint_dir(inputs, iteration - 1) if iteration > 1 else None
    settings = train_settings(inputs)
    if cfg.report_to:
        settings.logging_dir = str(it_dir / "trainer")  # the trackers write here
    seed = derive_seed(cfg.seed, "train", iteration)
    t0 = time.time()
    log(
        f"[iter {iteration}] fine-tuning {inputs.target_spec.alias} on {len(examples)} examples "
        f"({f'LoRA r={settings.lora_r}' if cfg.use_lora else 'full'}"
        f"{f', {cfg.num_processes} processes' if cfg.num_processes > 1 else ''})"
    )
    training = _Training(inputs, iteration, settings, seed, prev)
    if cfg.num_processes > 1 or cfg.accelerate_config:
        result = training.launched(examples, log)
    else:
        result = training.in_process(examples, log)
    _write_train_log(it_dir, result["losses"])
    if cfg.merge or inputs.serves_merged:
        training.merge()
    info = {**result, "seconds": round(time.time() - t0, 2), "seed": seed, "init_from": str(prev) if prev else "base"}
    write_json(it_dir / "train.json", info)
    training.model = None
    gc.collect()
    return info


class _Training:
    """One iteration's training: where from, with what, and the model it leaves in memory."""

    def __init__(self, inputs: ResolvedInputs, iteration: int, settings: TrainSettings, seed: int, prev: Path | None):
        self.inputs, self.iteration, self.settings, self.seed, self.prev = inputs, iteration, settings, seed, prev
        self.it_dir = inputs.out / f"iter_{iteration}"
        self.base = inputs.target_path
        self.tok = load_tokenizer(self.base)
        self.model: Any = None

    def in_process(self, examples: list[TrainExample], log: Log) -> dict[str, Any]:
        from codedistill.training.trainer import prepare_model, save_trained, train  # torch: only when training

        inputs = self.inputs
        self.model = prepare_model(
            self.base,
            self.settings,
            seed=self.seed,
            device=inputs.device,
            dtype=inputs.dtype(inputs.target_spec),
            init_from=self.prev,
        )
        result = train(self.model, self.tok, examples, self.settings, seed=self.seed, log=log)
        result_d = result.to_dict()
        del result
        save_trained(self.model, self.tok, self.it_dir, inputs.cfg.use_lora)
        return result_d

    def launched(self, examples: list[TrainExample], log: Log) -> dict[str, Any]:
        inputs = self.inputs
        job = write_job(
            self.it_dir / "launch",
            base=self.base,
            settings=self.settings,
            examples=examples,
            seed=self.seed,
            device=inputs.device,
            dtype=inputs.dtype(inputs.target_spec),
            init_from=self.prev,
            out_dir=self.it_dir,
        )
        return run_launched(job, inputs.cfg.num_processes, inputs.cfg.accelerate_config, log)

    def merge(self) -> None:
        """``iter_K/merged``: the trained weights folded into a standalone model."""
        from codedistill.training.trainer import merge_and_save, prepare_model  # torch: only when training

        inputs = self.inputs
        if self.model is None:  # trained in other processes: fold the saved adapter into the base here
            self.model = prepare_model(
                self.base,
                dataclasses.replace(self.settings, load_in_4bit=False),
                seed=self.seed,
                device=inputs.device,
                dtype=inputs.dtype(inputs.target_spec),
                init_from=checkpoint_dir(inputs, self.iteration),
            )
        merge_and_save(self.model, self.tok, self.it_dir / "merged")


def _write_train_log(it_dir: Path, losses: list[float]) -> None:
    with JsonlWriter(it_dir / "train_log.tmp.jsonl") as w:
        for i, loss in enumerate(losses):
            w.write({"step": i + 1, "loss": loss})
    (it_dir / "train_log.tmp.jsonl").replace(it_dir / "train_log.jsonl")
