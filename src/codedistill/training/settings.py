"""Fine-tuning settings, declared once.

``TrainingSettings`` is the training section of a BTP run's config: each field's default,
constraints and description are also its YAML key, its ``codedistill btp`` option and that
option's help. ``TrainSettings`` is what one fine-tuning phase runs with (plain data, sent as
JSON to processes started by ``accelerate launch``); :func:`train_settings_from` fills it from
the section, so its values and defaults come from the same declarations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TRACKERS = ("tensorboard", "wandb", "mlflow")
#: field metadata (``json_schema_extra``) naming the TrainSettings field a section field fills
TRAINER_NAME = "trainer_name"
#: field metadata: the resolved config records the field only when it differs from its default
#: (so that run directories made before the field existed still resume)
DUMP_WHEN_CHANGED = "dump_when_changed"
#: field metadata: the CLI option declarations (aliases, ``--on/--off`` names of a bool)
FLAGS = "flags"


def split_names(v: Any) -> Any:
    """``"a, b c"`` -> ``["a", "b", "c"]`` (comma-separated CLI values); lists pass through."""
    if isinstance(v, str):
        return [x for x in v.replace(",", " ").split() if x]
    return v


class TrainingSettings(BaseModel):
    """How the target is fine-tuned (transformers Trainer; several processes via accelerate)."""

    model_config = ConfigDict(extra="forbid")

    use_lora: bool = Field(False, description="LoRA adapters (peft) or full fine-tuning.",
                           json_schema_extra={FLAGS: ["--use-lora/--full-finetune"]})
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    lora_target_modules: list[str] | None = Field(
        None, description="Modules LoRA adapts, comma-separated (default: the registry's per-family list; "
                          "all-linear: every linear layer).")
    learning_rate: float = Field(2e-4, gt=0.0, description="Peak learning rate (AdamW, linear warmup and decay).",
                                 json_schema_extra={FLAGS: ["--learning-rate", "--lr"]})
    epochs: int = Field(1, ge=1, description="Passes over each iteration's replay draw.")
    train_batch_size: int = Field(8, ge=1, description="Global batch size (divisible by --num-processes).",
                                  json_schema_extra={TRAINER_NAME: "batch_size"})
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(1024, ge=8, description="Max tokens of prompt + program in training.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of the steps spent warming up.")
    merge: bool = Field(False, description="Also write iter_K/merged/ (LoRA folded in).")
    num_processes: int = Field(1, ge=1, description="Training processes: each fine-tuning phase runs under "
                                                    "`accelerate launch` (generation stays single-process).")
    accelerate_config: str | None = Field(
        None, description="ddp | fsdp | zero2 | zero3 (configs/accelerate/) or an accelerate YAML.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="no | bf16 | fp16 (autocast over fp32 master weights).")
    load_in_4bit: bool = Field(False, description="QLoRA: the base in 4-bit NF4 (bitsandbytes, CUDA GPUs only).")
    report_to: list[str] = Field(default_factory=list,
                                 description="tensorboard | wandb | mlflow (comma-separated; wandb offline).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.",
                                json_schema_extra={DUMP_WHEN_CHANGED: True})
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0: no clipping).",
                                 json_schema_extra={DUMP_WHEN_CHANGED: True})

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _module_names(cls, v: Any) -> Any:
        return split_names(v)

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, v: Any) -> list[str]:
        out = [str(x).lower() for x in split_names(v) or () if str(x).lower() != "none"]
        for x in out:
            if x not in TRACKERS:
                raise ValueError(f"unknown tracker {x!r}; use {', '.join(TRACKERS)}")
        return out


def _default(name: str) -> Any:
    return TrainingSettings.model_fields[name].get_default(call_default_factory=True)


@dataclass
class TrainSettings:
    """One fine-tuning phase's settings: the trainer-facing subset of TrainingSettings (same
    defaults) plus what the phase sets per model (``PER_PHASE``)."""

    learning_rate: float = _default("learning_rate")
    epochs: int = _default("epochs")
    batch_size: int = _default("train_batch_size")
    grad_accum: int = _default("grad_accum")
    max_length: int = _default("max_length")
    weight_decay: float = _default("weight_decay")
    warmup_ratio: float = _default("warmup_ratio")
    max_grad_norm: float = _default("max_grad_norm")
    use_lora: bool = _default("use_lora")
    lora_r: int = _default("lora_r")
    lora_alpha: int = _default("lora_alpha")
    lora_dropout: float = _default("lora_dropout")
    lora_target_modules: list[str] | str | None = None  # resolved per model: train_settings_from
    gradient_checkpointing: bool = _default("gradient_checkpointing")
    mixed_precision: str = _default("mixed_precision")
    load_in_4bit: bool = _default("load_in_4bit")
    report_to: list[str] = field(default_factory=list)
    add_eos: bool = True
    prompt_special_tokens: bool = True  # False for chat templates (they hold BOS already)
    logging_dir: str | None = None  # the Trainer's output_dir: trackers' logs (nothing else)


#: TrainSettings fields set per phase or per model rather than by a setting
PER_PHASE = ("add_eos", "prompt_special_tokens", "logging_dir")


def trainer_field(name: str) -> str:
    """The TrainSettings field a TrainingSettings field fills (its own name unless renamed)."""
    extra = TrainingSettings.model_fields[name].json_schema_extra
    return str(extra.get(TRAINER_NAME, name)) if isinstance(extra, dict) else name


def train_settings_from(training: TrainingSettings, *, default_lora_targets: Sequence[str],
                        prompt_special_tokens: bool) -> TrainSettings:
    """The phase's TrainSettings from the training section (a BTPConfig is one): LoRA targets
    default to the model's (``default_lora_targets``); ``["all-linear"]`` becomes peft's string."""
    names = {f.name for f in fields(TrainSettings)}
    values = {trainer_field(n): getattr(training, n) for n in TrainingSettings.model_fields
              if trainer_field(n) in names}
    targets = training.lora_target_modules or list(default_lora_targets)
    values["lora_target_modules"] = "all-linear" if targets == ["all-linear"] else targets
    values["report_to"] = list(training.report_to)
    return TrainSettings(**values, prompt_special_tokens=prompt_special_tokens)
