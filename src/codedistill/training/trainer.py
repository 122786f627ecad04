"""Fine-tune the target on replayed programs: completion-only causal-LM loss, LoRA or full.

transformers' ``Trainer``, so it runs single-process or under ``accelerate launch`` (DDP,
FSDP, DeepSpeed), with gradient checkpointing, mixed precision and QLoRA where asked. Two
methods are overridden, both documented override points of ``Trainer``: ``compute_loss``
(the completion-only, importance-weighted loss, :mod:`codedistill.training.loss`) and
``create_scheduler`` (linear warmup from the first step's nonzero rate, then linear decay:
no scheduler transformers names does this). Everything else is set through public
arguments: the data order is the dataset's own (``train_sampling_strategy="sequential"``
over a dataset that gives each epoch's seeded permutation through ``set_epoch``, which
the Trainer calls), the optimizer ``optim="adamw_torch"``. tests/test_trainer_hooks.py
pins what each of these must do, so that a transformers upgrade that changes one fails
there. Deterministic given a seed (LoRA init, data order and dropout all draw from
generators seeded here). Prompts are rendered and tokenized with the *target's*
tokenizer; the source's token ids never reach this module (only program text does).
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from codedistill.errors import ConfigError
from codedistill.models.loading import hide_loading_bars, load_causal_lm
from codedistill.training.loss import IGNORE_INDEX, CompletionLoss, completion_loss
from codedistill.training.settings import TrainExample, TrainResult, TrainSettings, check_qlora, check_report_to

__all__ = ["IGNORE_INDEX", "completion_loss"]  # re-exported: the loss lives in training/loss.py


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def split_prompt_completion(
    tokenizer: Any,
    prompt: str,
    completion: str,
    add_special_tokens: bool = True,
) -> tuple[list[int], list[int], bool]:
    """(prompt ids, completion ids, straddled) from ONE tokenization of ``prompt + completion``.

    The completion's tokens are the ones the target emits after its prompt, not the
    completion tokenized on its own: with SentencePiece (Llama/CodeLlama) a string
    tokenized alone starts with a ``▁``-prefixed token (``▁def``) where after the prompt's
    ``[BEGIN]\n`` the same text is ``def``. The boundary is found by character offsets: a
    token belongs to the prompt iff its span ends at or before ``len(prompt)``; tokens the
    tokenizer adds itself (BOS/EOS: special, empty span) are prompt tokens at the start and
    dropped at the end. A token that *straddles* the boundary (starts in the prompt, ends
    in the completion, e.g. a BPE merge of a prompt's trailing space with the completion's
    first word; StarCoder's ``\n   `` after a HumanEval prompt's final newline) cannot be
    kept as is, since generation feeds the prompt tokenized on its own: then the prompt
    ids are the prompt's own tokenization (exactly the generation context) and the
    straddling token is replaced by its completion part tokenized alone, followed by the
    joint tokens after it; ``straddled`` reports this case. Either way
    ``decode(prompt_ids + completion_ids) == prompt + completion``.
    """
    text = prompt + completion
    n = len(prompt)
    try:
        enc = tokenizer(
            text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, return_special_tokens_mask=True
        )
    except NotImplementedError:  # a slow (pure Python) tokenizer has no offsets
        raise ConfigError(
            f"{type(tokenizer).__name__} gives no character offsets; load the fast tokenizer "
            "(AutoTokenizer.from_pretrained(path), use_fast=True) to fine-tune on it"
        ) from None
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    added = [bool(m) and s == e for m, (s, e) in zip(enc["special_tokens_mask"], offsets)]
    b = len(ids)
    straddled = False
    for i, (s, e) in enumerate(offsets):
        if added[i]:
            continue
        if e > n:
            b, straddled = i, s < n
            break
    completion_ids = [t for t, a in zip(ids[b:], added[b:]) if not a]
    if not straddled:
        return ids[:b], completion_ids, False
    p_enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_special_tokens_mask=True)
    p_ids = list(p_enc["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    while p_ids and p_enc["special_tokens_mask"][len(p_ids) - 1] and p_ids[-1] == eos:
        p_ids.pop()  # a tokenizer that appends EOS to every text
    head = list(tokenizer(text[n : offsets[b][1]], add_special_tokens=False)["input_ids"])
    return p_ids, head + completion_ids[1:], True


def encode_example(
    tokenizer: Any,
    prompt: str,
    completion: str,
    max_length: int = 1024,
    add_eos: bool = True,
    prompt_special_tokens: bool = True,
) -> dict[str, Any]:
    """Token ids and labels for one (prompt, completion) pair.

    ``prompt + completion`` is tokenized as one string (prompt special tokens, e.g. BOS,
    exactly as at generation time) and split at the prompt's end by character offsets
    (:func:`split_prompt_completion`), so the labels are exactly the tokens the target
    would emit after its prompt, for SentencePiece and byte-level BPE alike; then EOS.
    Labels copy the completion ids (and EOS); every prompt position is ``IGNORE_INDEX`` so
    the prompt carries no loss. Over-long pairs lose completion tokens from the right
    (and, if the prompt alone is too long, prompt tokens from the left), keeping at least
    one completion token.
    """
    p_ids, c_ids, straddled = split_prompt_completion(tokenizer, prompt, completion, prompt_special_tokens)
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None:
        c_ids = c_ids + [int(eos)]
    truncated = False
    if len(p_ids) + len(c_ids) > max_length:
        truncated = True
        keep_c = max(1, min(len(c_ids), max_length - len(p_ids)))
        c_ids = c_ids[:keep_c]
        if len(p_ids) + len(c_ids) > max_length:
            p_ids = p_ids[len(p_ids) + len(c_ids) - max_length :]
    ids = p_ids + c_ids
    labels = [IGNORE_INDEX] * len(p_ids) + c_ids
    return {
        "input_ids": ids,
        "labels": labels,
        "prompt_len": len(p_ids),
        "truncated": truncated,
        "straddled": straddled,
    }


def collate(features: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), n), pad_id, dtype=torch.long)
    labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), n), dtype=torch.long)
    for i, f in enumerate(features):
        L = len(f["input_ids"])
        ids[i, :L] = torch.tensor(f["input_ids"])
        labels[i, :L] = torch.tensor(f["labels"])
        mask[i, :L] = 1
    weights = torch.tensor([float(f.get("weight", 1.0)) for f in features])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "weights": weights}


class PaddingCollator:
    """Batches encoded examples (:func:`collate`), padding with the tokenizer's pad id."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate(features, self.pad_id)


def prepare_model(
    base_path: str | Path,
    settings: TrainSettings,
    seed: int,
    device: str,
    dtype: str = "auto",
    init_from: str | Path | None = None,
) -> Any:
    """The model to train: base + (new or continued) LoRA adapter, or full weights.

    ``init_from`` is the previous iteration's ``adapter/`` (LoRA) or ``model/`` (full).
    The global RNG is seeded first, so a new adapter's initialisation is reproducible.
    """
    set_seed(seed)
    if settings.load_in_4bit:
        return _prepare_qlora(base_path, settings, device, init_from)
    if not settings.use_lora:
        return load_causal_lm(init_from or base_path, device, dtype)
    from peft import PeftModel, get_peft_model

    # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning
    # on every adapter, nothing a user can act on)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    model = load_causal_lm(base_path, device, dtype)
    if init_from is not None:
        return PeftModel.from_pretrained(model, str(init_from), is_trainable=True)
    return get_peft_model(model, _lora_config(settings))


def _lora_config(settings: TrainSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_target_modules or "all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


def _prepare_qlora(base_path: str | Path, settings: TrainSettings, device: str, init_from: str | Path | None) -> Any:
    """The base in 4-bit NF4 (double quantization, bf16 compute) + a LoRA adapter."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    check_qlora(settings, device)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    index = torch.device(device).index or 0
    hide_loading_bars()
    model = AutoModelForCausalLM.from_pretrained(
        str(base_path), quantization_config=q, dtype=torch.bfloat16, device_map={"": index}
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    if init_from is not None:
        return PeftModel.from_pretrained(model, str(init_from), is_trainable=True)
    return get_peft_model(model, _lora_config(settings))


def train(
    model: Any,
    tokenizer: Any,
    examples: Sequence[TrainExample],
    settings: TrainSettings,
    seed: int,
    log: Callable[[str], None] | None = None,
    output_dir: str | Path | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Fine-tune ``model`` in place on ``examples`` with transformers' ``Trainer``; returns
    the per-step loss curve (the same on every process of a distributed run).

    Why ``Trainer`` and not TRL's ``SFTTrainer``: BTP tokenizes each pair itself (jointly,
    :func:`encode_example`, so the labels are the target's own tokens after its prompt) and
    weights each example's loss by its importance-sampling weight; ``SFTTrainer`` would
    re-tokenize prompt and completion its own way and has no per-example weight. What BTP
    needs on top of ``Trainer`` is its ``compute_loss`` and its learning-rate schedule
    (:class:`CompletionTrainer`); the rest (accelerate/DDP/FSDP/DeepSpeed, gradient
    accumulation and checkpointing, mixed precision, ``report_to``) is the library's.

    The data order is one ``torch.randperm`` per epoch from a generator seeded with ``seed``
    (:class:`EpochOrderedDataset`); the optimizer ``torch.optim.AdamW`` on the trainable
    parameters, with linear warmup then linear decay and gradient clipping. A step's loss
    is the importance-weighted token cross-entropy summed over the step's completion tokens
    / their number (with ``grad_accum`` 1 the per-batch mean; with more, the token mean over
    the whole accumulated step; across processes, the token mean over the global batch, so N
    processes with ``batch_size``/N each give the single-process curve). Bit for bit
    reproducible given the seed with ``grad_accum`` 1 and no LoRA dropout; with dropout the
    Trainer's data loader draws from the global RNG, still seeded.
    """
    result = TrainResult()
    if not examples:
        return result
    check_report_to(settings.report_to)
    set_seed(seed)
    feats = _encode_all(tokenizer, examples, settings, result)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = str(next(model.parameters()).device)
    world = PartialState(cpu=device == "cpu").num_processes
    bs = max(1, settings.batch_size)
    if bs % world:
        raise ConfigError(
            f"train batch size {bs} is the global batch: it must be divisible by the "
            f"{world} processes (e.g. --train-batch-size {bs - bs % world or world})"
        )
    ga = max(1, settings.grad_accum)
    total = max(1, math.ceil(len(feats) / (bs * ga)) * settings.epochs)
    # where trackers write (tensorboard: <dir>/runs/...); no checkpoints are saved there
    out_s = output_dir or settings.logging_dir
    scratch = None if out_s else tempfile.TemporaryDirectory(prefix="codedistill-train-")
    out = Path(out_s) if out_s else Path(scratch.name)  # type: ignore[union-attr]
    trainer = CompletionTrainer(
        model=model,
        args=_training_args(settings, out, bs // world, seed, total, device),
        train_dataset=EpochOrderedDataset(feats, settings.epochs, seed),
        data_collator=PaddingCollator(pad_id),
        schedule=_lr_lambda(total, int(settings.warmup_ratio * total)),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    progress = TrainProgress(trainer, result, log)
    trainer.add_callback(progress)
    for cb in callbacks:  # e.g. to look at each step's gradients (on_pre_optimizer_step)
        trainer.add_callback(cb)
    try:
        trainer.train()
    finally:
        if scratch is not None:
            scratch.cleanup()
    result.steps = len(result.losses)
    result.tokens_per_second = progress.tokens_per_second
    result.trainer = trainer
    model.eval()
    return result


def _encode_all(
    tokenizer: Any, examples: Sequence[TrainExample], settings: TrainSettings, result: TrainResult
) -> list[dict[str, Any]]:
    """Every example encoded (:func:`encode_example`) with its weight; counts into ``result``."""
    feats = []
    for ex in examples:
        f = encode_example(
            tokenizer, ex.prompt, ex.completion, settings.max_length, settings.add_eos, settings.prompt_special_tokens
        )
        f["weight"] = ex.weight
        result.truncated += int(f["truncated"])
        result.straddled += int(f["straddled"])
        result.completion_tokens += sum(1 for x in f["labels"] if x != IGNORE_INDEX)
        feats.append(f)
    result.examples = len(feats)
    return feats


def _training_args(
    settings: TrainSettings, out: Path, per_device_batch: int, seed: int, total: int, device: str
) -> TrainingArguments:
    if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:
        raise ConfigError(
            "fine-tuning needs transformers >= 5.2 (TrainingArguments.train_sampling_strategy, for the "
            "seeded data order): pip install -c constraints.txt transformers"
        )
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=max(1, settings.grad_accum),
        num_train_epochs=settings.epochs,
        max_steps=total,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        # torch.optim.AdamW (betas, eps: torch's defaults) over the trainable parameters;
        # Trainer exempts biases and norm weights from weight decay
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        # the dataset's own order (EpochOrderedDataset: a seeded permutation per epoch)
        train_sampling_strategy="sequential",
        max_grad_norm=settings.max_grad_norm or 0.0,
        seed=seed,
        bf16=settings.mixed_precision == "bf16",
        fp16=settings.mixed_precision == "fp16",
        **_checkpointing_args(settings.gradient_checkpointing),
        use_cpu=device == "cpu",
        report_to=list(settings.report_to) or "none",
        logging_strategy="steps" if settings.report_to else "no",
        logging_steps=1,
        save_strategy="no",
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
        dataloader_num_workers=0,
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,
    )


def _checkpointing_args(on: bool) -> dict[str, Any]:
    """Gradient (activation) checkpointing, non-reentrant (works with frozen inputs under
    LoRA); transformers 5 renamed the argument ``activation_checkpointing``."""
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        else "gradient_checkpointing"
    )
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def _lr_lambda(total: int, warm: int) -> Callable[[int], float]:
    def lr_at(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return lr_at


class EpochOrderedDataset:
    """The encoded features in the training order: in epoch ``e`` item ``i`` is feature
    ``orders[e][i]``, ``orders[e]`` the e-th ``torch.randperm`` of a generator seeded with the
    run's seed. The Trainer reads it sequentially (``train_sampling_strategy="sequential"``)
    and calls ``set_epoch(e)`` (through accelerate's data loader) before each epoch;
    accelerate shards the batches built from it over processes."""

    def __init__(self, feats: list[dict[str, Any]], epochs: int, seed: int):
        self.feats = feats
        gen = torch.Generator().manual_seed(seed)
        self.orders = [torch.randperm(len(feats), generator=gen).tolist() for _ in range(max(1, epochs))]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = min(int(epoch), len(self.orders) - 1)

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.feats[self.orders[self.epoch][i]]


class CompletionTrainer(Trainer):
    """``Trainer`` with BTP's loss: completion tokens only, each weighted by its example's
    importance-sampling weight, normalised by the step's (global) number of completion
    tokens (:class:`~codedistill.training.loss.CompletionLoss`: the LM head on completion
    positions only, chunked); and BTP's learning-rate schedule."""

    def __init__(self, *a: Any, schedule: Callable[[int], float], loss_mode: str | None = None, **kw: Any):
        super().__init__(*a, **kw)
        self._schedule = schedule
        self._loss_mode = loss_mode
        self._loss: CompletionLoss | None = None
        # our compute_loss takes num_items_in_batch: Trainer then counts the labelled
        # tokens of the whole (accumulated, all-process) step and does not divide by GA
        self.model_accepts_loss_kwargs = True
        self.step_loss = 0.0
        self.step_tokens = 0

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.lr_scheduler is None:
            optimizer = optimizer or self.optimizer
            assert optimizer is not None
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._schedule)
        return self.lr_scheduler

    def completion_loss_of(self, model: Any) -> CompletionLoss:
        """The loss computer of the model being trained (made on the first batch, when the
        model is wrapped)."""
        if self._loss is None:
            sharded = bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)
            inner = self.accelerator.unwrap_model(model)
            self._loss = CompletionLoss(inner, sharded=sharded, mode=self._loss_mode)
        return self._loss

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        weights = inputs.pop("weights", None)
        labels = inputs.pop("labels")
        loss_of = self.completion_loss_of(model)
        loss, outputs = loss_of(model, inputs["input_ids"], inputs["attention_mask"], labels, weights)
        if num_items_in_batch is not None:
            n_local = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
            loss = loss * n_local / num_items_in_batch
            self.step_loss += float(loss.detach())
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        self.step_tokens += int(inputs["attention_mask"].sum())
        return (loss, outputs) if return_outputs else loss

    def pop_step(self) -> tuple[float, int]:
        """This step's loss (summed over processes) and tokens (all processes)."""
        t = torch.tensor([self.step_loss, float(self.step_tokens)], device=self.args.device)
        if self.accelerator.num_processes > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        self.step_loss, self.step_tokens = 0.0, 0
        return float(t[0]), int(t[1])


class TrainProgress(TrainerCallback):
    """Records the per-step loss curve and shows a progress bar with loss and tokens/s
    (tqdm, on the main process, only on a terminal); elsewhere one summary line at the end."""

    def __init__(self, trainer: CompletionTrainer, result: TrainResult, log: Callable[[str], None] | None = None):
        self.trainer, self.result, self.log = trainer, result, log
        self.bar: Any = None
        self.tokens = 0
        self.t0 = 0.0
        self.tokens_per_second = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.t0 = time.perf_counter()
        if state.is_world_process_zero and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc="fine-tuning", unit="step", leave=False)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        loss, tokens = self.trainer.pop_step()
        self.result.losses.append(loss)
        self.tokens += tokens
        dt = max(1e-9, time.perf_counter() - self.t0)
        self.tokens_per_second = self.tokens / dt
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens_per_second:.0f}", refresh=False)
            self.bar.update(1)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        if not state.is_world_process_zero or not self.result.losses:
            return
        L = self.result.losses
        line = (
            f"fine-tuned {len(L)} steps in {time.perf_counter() - self.t0:.1f}s: loss {L[0]:.4f} -> "
            f"{L[-1]:.4f}, {self.tokens_per_second:.0f} tokens/s"
        )
        if self.log is not None:
            self.log(line)
        elif self.bar is None:
            print(line, file=sys.stderr)


def save_trained(model: Any, tokenizer: Any, out_dir: str | Path, use_lora: bool) -> Path:
    """LoRA: ``out_dir/adapter`` (adapter_model.safetensors + adapter_config.json);
    full: ``out_dir/model``. The tokenizer goes alongside."""
    out = Path(out_dir) / ("adapter" if use_lora else "model")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def merge_and_save(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write a merged (LoRA folded in) standalone model to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
