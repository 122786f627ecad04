"""Fine-tune the target on replayed programs: completion-only causal-LM loss, LoRA or full.

A plain torch loop (no Trainer): deterministic given a seed (LoRA init, shuffling and
dropout all draw from generators seeded here), runs on CPU for tiny models and in bf16 on
GPU. Prompts are rendered and tokenized with the *target's* tokenizer; the source's
token ids never reach this module (only program text does).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

IGNORE_INDEX = -100


@dataclass
class TrainExample:
    prompt: str
    completion: str
    weight: float = 1.0
    task_id: str = ""


@dataclass
class TrainSettings:
    learning_rate: float = 2e-4
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str | None = None
    add_eos: bool = True
    prompt_special_tokens: bool = True  # False for chat templates (they hold BOS already)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    steps: int = 0
    examples: int = 0
    completion_tokens: int = 0
    truncated: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "losses": self.losses,
            "steps": self.steps,
            "examples": self.examples,
            "completion_tokens": self.completion_tokens,
            "truncated": self.truncated,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
        }


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def split_prompt_completion(
    tokenizer: Any, prompt: str, completion: str, add_special_tokens: bool = True,
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
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                        return_special_tokens_mask=True)
    except NotImplementedError:  # a slow (pure Python) tokenizer has no offsets
        from codedistill.errors import ConfigError

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
    while p_ids and p_enc["special_tokens_mask"][len(p_ids) - 1] and p_ids[-1] == getattr(tokenizer, "eos_token_id", None):
        p_ids.pop()  # a tokenizer that appends EOS to every text
    head = list(tokenizer(text[n:offsets[b][1]], add_special_tokens=False)["input_ids"])
    return p_ids, head + completion_ids[1:], True


def encode_example(
    tokenizer: Any, prompt: str, completion: str, max_length: int = 1024, add_eos: bool = True,
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
            p_ids = p_ids[len(p_ids) + len(c_ids) - max_length:]
    ids = p_ids + c_ids
    labels = [IGNORE_INDEX] * len(p_ids) + c_ids
    return {"input_ids": ids, "labels": labels, "prompt_len": len(p_ids), "truncated": truncated,
            "straddled": straddled}


def collate(features: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    import torch

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


def completion_loss(logits: Any, labels: Any, weights: Any | None = None) -> Any:
    """Mean next-token cross-entropy over labelled (completion) positions; each token
    weighted by its example's importance weight (sum w*ce / number of tokens)."""
    import torch
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    valid = (shift_labels != IGNORE_INDEX).float()
    if weights is not None:
        valid_w = valid * weights.to(ce.device).float().unsqueeze(1)
    else:
        valid_w = valid
    denom = valid.sum().clamp(min=1.0)
    return (ce * valid_w).sum() / denom


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str | Path, device: str, dtype: str = "auto") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        td = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        td = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
              "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=td)
    return model.to(device)


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


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
    import warnings

    set_seed(seed)
    if not settings.use_lora:
        return load_model(init_from or base_path, device, dtype)
    from peft import LoraConfig, PeftModel, get_peft_model

    # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning
    # on every adapter, nothing a user can act on)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    model = load_model(base_path, device, dtype)
    if init_from is not None:
        return PeftModel.from_pretrained(model, str(init_from), is_trainable=True)
    targets = settings.lora_target_modules or "all-linear"
    cfg = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def train(
    model: Any,
    tokenizer: Any,
    examples: Sequence[TrainExample],
    settings: TrainSettings,
    seed: int,
    log: Any = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``examples``; returns the per-step loss curve."""
    import torch

    result = TrainResult()
    if not examples:
        return result
    set_seed(seed)
    feats = []
    for ex in examples:
        f = encode_example(tokenizer, ex.prompt, ex.completion, settings.max_length, settings.add_eos,
                           settings.prompt_special_tokens)
        f["weight"] = ex.weight
        result.truncated += int(f["truncated"])
        result.completion_tokens += sum(1 for x in f["labels"] if x != IGNORE_INDEX)
        feats.append(f)
    result.examples = len(feats)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    bs = max(1, settings.batch_size)
    steps_per_epoch = math.ceil(len(feats) / (bs * max(1, settings.grad_accum)))
    total = max(1, steps_per_epoch * settings.epochs)
    warm = int(settings.warmup_ratio * total)

    def lr_at(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    for _epoch in range(settings.epochs):
        order = torch.randperm(len(feats), generator=gen).tolist()
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        for b0 in range(0, len(batches), max(1, settings.grad_accum)):
            group = batches[b0:b0 + max(1, settings.grad_accum)]
            opt.zero_grad(set_to_none=True)
            tot = 0.0
            for bidx in group:
                batch = collate([feats[i] for i in bidx], pad_id)
                out = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                )
                loss = completion_loss(out.logits, batch["labels"].to(device), batch["weights"])
                (loss / len(group)).backward()
                tot += float(loss.detach()) / len(group)
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            result.losses.append(tot)
            if log is not None:
                log(f"step {step}/{total} loss {tot:.4f}")
    result.steps = step
    model.eval()
    return result


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
