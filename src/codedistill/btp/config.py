"""BTPConfig: every setting of a BTP run (YAML in, flags override, resolved JSON saved)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from codedistill.btp.p2value import DEFAULT_P2_ALPHA
from codedistill.btp.samplers import MAX_SAMPLING_ALPHA, SAMPLING_METHODS
from codedistill.errors import ConfigError
from codedistill.generation import ServingConfig

TRAIN_DATASETS = ("mbpp", "mbpp-sanitized", "synth")
EVAL_EXTRA_DATASETS = ("humaneval", "mbpp", "mbpp-sanitized", "synth")

# Settings that do not change results (where/how fast it runs): not compared on resume.
NON_EXPERIMENT_KEYS = ("output_dir", "workers", "device", "gen_batch_size", "merge", "config",
                       "generation_cache", "num_processes", "accelerate_config", "gradient_checkpointing",
                       "report_to")
# training-at-scale settings that do change results: recorded only when not the default
# (so runs made before they existed still resume)
_SCALE_DEFAULTS = {"mixed_precision": "no", "load_in_4bit": False}


class BTPConfig(BaseModel):
    """Step 2: Beam search -> Testing -> Prioritized replay -> fine-tune the target."""

    model_config = ConfigDict(extra="forbid")

    # models
    source_model: str = "tiny-source"
    target_model: str = "tiny-target"
    source_variant: Optional[Literal["base", "instruct"]] = None
    target_variant: Optional[Literal["base", "instruct"]] = None
    mode: Literal["finetune", "self", "mixed"] = "finetune"
    # data
    dataset: str = "mbpp"
    data_path: Optional[str] = None
    max_problems: Optional[int] = Field(None, ge=1, description="first N train problems")
    eval_max_problems: Optional[int] = Field(None, ge=1, description="first N held-out problems")
    eval_datasets: list[str] = Field(default_factory=list, description="extra eval sets, e.g. humaneval")
    allow_overlap: bool = False
    drop_overlap: bool = False
    # beam / sampling phase
    generation: Literal["beam", "sample", "egcfg"] = "beam"
    egcfg: dict[str, Any] = Field(default_factory=dict, description="EG-CFG settings (EGCFGConfig fields) "
                                                                    "with generation=egcfg: every agent's program "
                                                                    "enters the buffer")
    num_beams: int = Field(5, ge=1)
    num_samples: int = Field(5, ge=1, description="programs per problem with generation=sample")
    gen_temperature: float = Field(0.8, gt=0.0)
    gen_top_p: float = Field(0.95, gt=0.0, le=1.0)
    length_penalty: float = 1.0
    max_new_tokens: int = Field(384, ge=1)
    # replay
    p2_alpha: float = Field(DEFAULT_P2_ALPHA, ge=0.0, le=1.0)
    sampling_method: str = "power"
    sampling_alpha: float = Field(1.0, ge=0.0, le=MAX_SAMPLING_ALPHA)
    is_weights: bool = False
    is_beta: float = Field(0.4, ge=0.0, le=1.0)
    replay_size: Optional[int] = Field(None, ge=1, description="draws per iteration (default: buffer size)")
    p_mode: Literal["normalized", "raw"] = Field(
        "normalized", description="P in P2Value: exp(mean token logprob) or the paper's raw exp(sum logprob)")
    min_pass_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="drop buffer programs below this pass rate before the draw "
        "(0 keeps all; any value > 0 also drops zero-pass programs; 1.0 = rejection-sampling fine-tuning)")
    iteration_problems: Literal["all", "slices"] = Field(
        "all", description="all: every iteration generates on all training problems (deterministic "
        "source beams are then computed once and iterations 2..n re-draw the same buffer); slices: "
        "iteration k generates on the k-th of n_iterations disjoint slices (fresh problems per iteration)")
    # fine-tuning
    n_iterations: int = Field(3, ge=1)
    use_lora: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: Optional[list[str]] = None
    learning_rate: float = Field(2e-4, gt=0.0)
    epochs: int = Field(1, ge=1)
    train_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=8)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    merge: bool = False
    # training at scale (transformers Trainer; several processes via accelerate launch)
    num_processes: int = Field(1, ge=1, description="training processes; generation stays single-process")
    accelerate_config: Optional[str] = Field(None, description="ddp | fsdp | zero2 | zero3 | an accelerate YAML")
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    load_in_4bit: bool = Field(False, description="QLoRA: 4-bit NF4 base (bitsandbytes, CUDA only)")
    report_to: list[str] = Field(default_factory=list, description="tensorboard | wandb | mlflow")
    # evaluation
    eval_num_samples: int = Field(10, ge=1)
    eval_temperature: float = Field(0.8, ge=0.0)
    eval_top_p: float = Field(0.95, gt=0.0, le=1.0)
    eval_source: bool = True
    eval_split: Literal["test", "validation"] = Field(
        "test", description="held-out split of the training dataset (validation for hyperparameter search)")
    eval_protocol: Literal["sampled", "paper"] = Field(
        "sampled", description="sampled: eval_num_samples at eval_temperature (pass@1/5/10); paper: the "
        "literature's protocol (MBPP 3-shot prompts with tasks 2-4, HumanEval 0-shot, greedy pass@1)")
    generation_cache: Optional[str] = Field(
        None, description="directory shared by runs (ablation variants, sweep trials) holding generations, "
        "verdicts and base-model evaluations keyed by their settings; reused instead of regenerated")
    # execution / runtime
    seed: int = 0
    timeout: float = Field(3.0, gt=0)
    workers: Optional[int] = Field(None, ge=1)
    device: Optional[str] = None
    dtype: str = "auto"
    gen_batch_size: int = Field(16, ge=1)
    chunk_size: int = Field(8, ge=1)
    output_dir: Optional[str] = None
    # generation backends (codedistill.generation.make_generator): hf in process, vllm (a server
    # codedistill starts and stops), openai (a running OpenAI-compatible endpoint, e.g. DeepSeek's API)
    backend: Optional[Literal["hf", "vllm", "openai"]] = Field(
        None, description="both roles (default: the registry's: hf, or openai for API models)")
    source_backend: Optional[Literal["hf", "vllm", "openai"]] = Field(None, description="the source's backend")
    target_backend: Optional[Literal["hf", "vllm"]] = Field(
        None, description="the target's generation (self-samples, evaluations; vllm serves the LoRA adapter)")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="endpoints, keys, vLLM settings")

    @field_validator("dataset")
    @classmethod
    def _train_dataset(cls, v: str) -> str:
        v = v.lower()
        if v not in TRAIN_DATASETS:
            raise ValueError(
                f"unknown training dataset {v!r}; BTP trains on one of {', '.join(TRAIN_DATASETS)} "
                "(HumanEval has no train split: use --eval-datasets humaneval)"
            )
        return v

    @field_validator("eval_datasets", mode="before")
    @classmethod
    def _eval_datasets(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            v = [x for x in v.replace(",", " ").split() if x]
        out = []
        for x in v:
            x = str(x).lower()
            if x not in EVAL_EXTRA_DATASETS:
                raise ValueError(f"unknown eval dataset {x!r}; use some of {', '.join(EVAL_EXTRA_DATASETS)}")
            if x not in out:
                out.append(x)
        return out

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            v = [x for x in v.replace(",", " ").split() if x]
        out = [str(x).lower() for x in v if str(x).lower() != "none"]
        for x in out:
            if x not in ("tensorboard", "wandb", "mlflow"):
                raise ValueError(f"unknown tracker {x!r}; use tensorboard, wandb or mlflow")
        return out

    @field_validator("sampling_method")
    @classmethod
    def _method(cls, v: str) -> str:
        v = v.lower()
        if v not in SAMPLING_METHODS:
            raise ValueError(f"unknown sampling method {v!r}; use one of {', '.join(SAMPLING_METHODS)}")
        return v

    @model_validator(mode="after")
    def _protocol(self) -> "BTPConfig":
        if self.eval_protocol == "paper":  # greedy pass@1: one program per problem at T=0
            self.eval_num_samples = 1
            self.eval_temperature = 0.0
        return self

    # ---- helpers -------------------------------------------------------------------
    def experiment_dict(self) -> dict[str, Any]:
        d = self.model_dump()
        for k in NON_EXPERIMENT_KEYS:
            d.pop(k, None)
        d.pop("serving", None)  # addresses, concurrency, vLLM sizes: recorded in generation.json
        for k in ("backend", "source_backend", "target_backend"):
            if d.get(k) is None:
                d.pop(k, None)
        for k, default in _SCALE_DEFAULTS.items():
            if d.get(k) == default:
                d.pop(k, None)
        return d

    def role_backend(self, role: str, spec: Any) -> str:
        """The resolved backend of ``role`` (source | target) for its ModelSpec."""
        from codedistill.generation import resolve_backend

        flag = (self.source_backend if role == "source" else self.target_backend) or self.backend
        if role == "target" and flag == "openai":
            flag = None  # the target is fine-tuned here: it is never a remote API model
        return resolve_backend(spec, flag)

    def default_output_dir(self) -> Path:
        s = Path(self.source_model).name
        t = Path(self.target_model).name
        return Path("results") / "btp" / f"{s}_to_{t}_{self.dataset}_{self.mode}_s{self.seed}"

    def ks(self) -> list[int]:
        return [k for k in (1, 5, 10) if k <= self.eval_num_samples]


def build_config(yaml_values: dict[str, Any] | None, overrides: dict[str, Any]) -> BTPConfig:
    """Defaults < YAML file < flags (``None`` flags are "not given")."""
    from pydantic import ValidationError

    vals: dict[str, Any] = dict(yaml_values or {})
    vals.update({k: v for k, v in overrides.items() if v is not None})
    # YAML may use dashes like the flags
    vals = {k.replace("-", "_"): v for k, v in vals.items()}
    try:
        return BTPConfig(**vals)
    except ValidationError as e:
        msgs = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid BTP settings: {msgs}") from e


def load_config_file(path: str | Path) -> dict[str, Any]:
    from codedistill.config import load_yaml

    data = load_yaml(path)
    data.pop("config", None)
    return data


# The embedded default (``codedistill demo``, ``configs/btp_tiny.yaml``, the learning test):
# tiny-source teaches tiny-target on synth, on CPU in a few minutes. Why these values:
# the source's 5 beams per problem are mostly near misses (right shape, a wrong constant),
# which pass some tests and so keep a high P2Value; at sampling_alpha 1.5 a third of the
# draws were such programs and the target did not improve (0.436 -> 0.440). alpha 8 makes
# the draw 98% fully-passing programs (0.436 -> 0.618). See the issue note / report.
EMBEDDED_DEFAULT: dict[str, Any] = {
    "source_model": "tiny-source",
    "target_model": "tiny-target",
    "mode": "finetune",
    "dataset": "synth",
    "max_problems": 600,
    "eval_max_problems": 100,
    "generation": "beam",
    "num_beams": 5,
    "max_new_tokens": 96,
    "p2_alpha": DEFAULT_P2_ALPHA,
    "sampling_method": "power",
    "sampling_alpha": 8.0,
    "replay_size": 600,
    "n_iterations": 1,
    "use_lora": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "learning_rate": 3e-3,
    "epochs": 4,
    "train_batch_size": 16,
    "max_length": 512,
    "warmup_ratio": 0.05,
    "eval_num_samples": 5,
    "eval_temperature": 0.2,
    "seed": 0,
}
