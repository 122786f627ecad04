"""Fine-tuning settings, declared once.

``TrainingSettings`` is the training section of a BTP run's config: each field's default,
constraints and description are also its YAML key, its ``codedistill btp`` option and that
option's help. ``TrainSettings`` is what one fine-tuning phase runs with (plain data, sent as
JSON to processes started by ``accelerate launch``); :func:`train_settings_from` fills it from
the section, so its values and defaults come from the same declarations.

Also the light types a phase is given and returns (``TrainExample``, ``TrainResult``) and the
checks of its settings that run before any work (no torch here).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from codedistill.errors import ConfigError

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

    use_lora: bool = Field(
        False,
        description="LoRA adapters (peft) or full fine-tuning.",
        json_schema_extra={FLAGS: ["--use-lora/--full-finetune"]},
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    lora_target_modules: list[str] | None = Field(
        None,
        description="Modules LoRA adapts, comma-separated (default: the registry's per-family list; "
        "all-linear: every linear layer).",
    )
    learning_rate: float = Field(
        2e-4,
        gt=0.0,
        description="Peak learning rate (AdamW, linear warmup and decay).",
        json_schema_extra={FLAGS: ["--learning-rate", "--lr"]},
    )
    epochs: int = Field(1, ge=1, description="Passes over each iteration's replay draw.")
    train_batch_size: int = Field(
        8,
        ge=1,
        description="Global batch size (divisible by --num-processes).",
        json_schema_extra={TRAINER_NAME: "batch_size"},
    )
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(1024, ge=8, description="Max tokens of prompt + program in training.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of the steps spent warming up.")
    merge: bool = Field(False, description="Also write iter_K/merged/ (LoRA folded in).")
    num_processes: int = Field(
        1,
        ge=1,
        description="Training processes: each fine-tuning phase runs under "
        "`accelerate launch` (generation stays single-process).",
    )
    accelerate_config: str | None = Field(
        None,
        description="ddp | fsdp | zero2 | zero3 (shipped in codedistill/assets/accelerate/) or an accelerate YAML.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="no | bf16 | fp16 (autocast over fp32 master weights)."
    )
    load_in_4bit: bool = Field(False, description="QLoRA: the base in 4-bit NF4 (bitsandbytes, CUDA GPUs only).")
    report_to: list[str] = Field(
        default_factory=list, description="tensorboard | wandb | mlflow (comma-separated; wandb offline)."
    )
    weight_decay: float = Field(
        0.0,
        ge=0.0,
        description="AdamW weight decay (not on biases and norm weights).",
        json_schema_extra={DUMP_WHEN_CHANGED: True},
    )
    max_grad_norm: float = Field(
        1.0, ge=0.0, description="Gradient clipping norm (0: no clipping).", json_schema_extra={DUMP_WHEN_CHANGED: True}
    )

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


@dataclass
class TrainExample:
    prompt: str
    completion: str
    weight: float = 1.0
    task_id: str = ""


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


def train_settings_from(
    training: TrainingSettings, *, default_lora_targets: Sequence[str], prompt_special_tokens: bool
) -> TrainSettings:
    """The phase's TrainSettings from the training section (a BTPConfig is one): LoRA targets
    default to the model's (``default_lora_targets``); ``["all-linear"]`` becomes peft's string."""
    names = {f.name for f in fields(TrainSettings)}
    values = {
        trainer_field(n): getattr(training, n) for n in TrainingSettings.model_fields if trainer_field(n) in names
    }
    targets = training.lora_target_modules or list(default_lora_targets)
    values["lora_target_modules"] = "all-linear" if targets == ["all-linear"] else targets
    values["report_to"] = list(training.report_to)
    return TrainSettings(**values, prompt_special_tokens=prompt_special_tokens)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    steps: int = 0
    examples: int = 0
    completion_tokens: int = 0
    truncated: int = 0
    straddled: int = 0  # examples whose boundary token straddled prompt and completion
    tokens_per_second: float = 0.0
    trainer: Any = field(default=None, repr=False, compare=False)  # the Trainer (saving sharded models)

    def to_dict(self) -> dict[str, Any]:
        return {
            "losses": self.losses,
            "steps": self.steps,
            "examples": self.examples,
            "completion_tokens": self.completion_tokens,
            "truncated": self.truncated,
            "straddled": self.straddled,
            "tokens_per_second": round(self.tokens_per_second, 1),
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
        }


REPORT_TO = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_qlora(settings: TrainSettings, device: str) -> None:
    """QLoRA's requirements, as ConfigErrors that name the fix."""
    if not settings.load_in_4bit:
        return
    if not settings.use_lora:
        raise ConfigError("--load-in-4bit (QLoRA) trains a LoRA adapter on a frozen 4-bit base: add --use-lora")
    if not str(device).startswith("cuda"):
        raise ConfigError(
            f"--load-in-4bit (QLoRA) needs a CUDA GPU (bitsandbytes' 4-bit kernels); device is "
            f"{device!r}: drop --load-in-4bit to train LoRA in full precision here"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--load-in-4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes")


def check_report_to(report_to: Sequence[str]) -> None:
    """Each tracker's package must be installed (none is in the default install); runs
    stay offline: wandb in offline mode, mlflow to a local ./mlruns unless configured."""
    for name in report_to:
        if name not in REPORT_TO:
            raise ConfigError(f"unknown --report-to {name!r}; use one of {', '.join(REPORT_TO)}")
        if importlib.util.find_spec(REPORT_TO[name]) is None:
            raise ConfigError(f"--report-to {name} needs its package: pip install {name}")
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_MODE", "offline")


def check_training(settings: TrainSettings, device: str) -> None:
    """Everything about the training settings that can be checked before a run starts."""
    check_qlora(settings, device)
    check_report_to(settings.report_to)
