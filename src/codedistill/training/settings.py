"""What a fine-tuning phase is given and what it returns, and the checks of its settings
that can run before any work: light types (no torch), imported by the BTP loop."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from codedistill.errors import ConfigError


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
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast; fp32 master weights)
    load_in_4bit: bool = False  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only)
    report_to: list[str] = field(default_factory=list)  # tensorboard | wandb | mlflow
    logging_dir: str | None = None  # the Trainer's output_dir: trackers' logs (nothing else)


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
        raise ConfigError(f"--load-in-4bit (QLoRA) needs a CUDA GPU (bitsandbytes' 4-bit kernels); device is "
                          f"{device!r}: drop --load-in-4bit to train LoRA in full precision here")
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
