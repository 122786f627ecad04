"""Pydantic configs. Flags map onto these; the resolved config is saved in each run dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from codedistill.errors import ConfigError
from codedistill.generation import ServingConfig


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(10, ge=1, description="programs per problem")
    temperature: float = Field(0.8, ge=0.0, description="0 = greedy")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(384, ge=1)


class BaselineConfig(BaseModel):
    """Step 1: sample n programs per problem, test them, report pass@k."""

    model_config = ConfigDict(extra="forbid")

    model: str
    variant: Literal["base", "instruct"] | None = None
    dataset: str = "mbpp"
    split: str = "test"
    data_path: str | None = None
    max_problems: int | None = Field(None, ge=1)
    shots: int = Field(0, ge=0)
    method: Literal["plain", "egcfg"] = "plain"
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    batch_size: int = Field(16, ge=1, description="sequences per generate call")
    chunk_size: int = Field(8, ge=1, description="problems per checkpointed chunk")
    workers: int | None = Field(None, ge=1)
    timeout: float = Field(3.0, gt=0)
    device: str | None = None
    dtype: str = "auto"
    egcfg: dict[str, Any] = Field(default_factory=dict, description="EG-CFG settings (method=egcfg)")
    backend: Literal["hf", "vllm", "openai"] | None = Field(None, description="default: the registry's (hf)")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="served backends (vllm/openai)")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from codedistill.data import DATASETS

        if v.lower() not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; use one of {', '.join(DATASETS)}")
        return v.lower()

    def experiment_dict(self) -> dict[str, Any]:
        """What identifies the experiment (resume compares this); not worker counts etc."""
        d = self.model_dump()
        for k in ("workers", "device", "serving"):  # serving: addresses, concurrency (generation.json)
            d.pop(k, None)
        if d.get("backend") is None:
            d.pop("backend", None)
        return d


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e}).") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings at the top level.")
    return data


def build(model_cls: type[BaseModel], values: dict[str, Any]) -> Any:
    """Validate into ``model_cls``; pydantic errors become one readable ConfigError."""
    from pydantic import ValidationError

    try:
        return model_cls(**values)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid settings: {msgs}") from e
