"""Before loading weights: can this model be loaded here at all? Said in one line if not.

Two checks, both cheap (no weights are read, nothing is downloaded but a config file):

* **Where the weights are.** A hub id that is not in the local Hugging Face cache needs the
  hub; when ``HF_HUB_OFFLINE`` is set or the hub does not answer within a few seconds, the
  load would end (after transformers' retries) in an ``OSError`` traceback. Instead:
  a ``ConfigError`` naming the alias, the hub id and the ways out.
* **Whether it fits.** Parameters are counted from the model's ``config.json`` (hidden size,
  layers, MLP size, vocabulary, attention and key/value heads, experts), or taken from the
  registry's ``size_b`` when no config is at hand, times the bytes of the dtype it would be
  loaded in, plus a margin for activations (more for full fine-tuning: gradients and Adam
  states). A model that cannot fit the device's free memory (CUDA) or the available RAM
  (CPU) is refused with the alternatives. ``CODEDISTILL_SKIP_MEMORY_CHECK=1`` skips this
  check (the estimate is deliberately simple).

``preflight(spec, device, dtype)`` returns what it found (recorded in a run's plan).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from codedistill.errors import ConfigError
from codedistill.models.gguf import resolve_local_model
from codedistill.models.registry import REGISTRY

__all__ = [
    "available_memory",
    "check_fit",
    "count_parameters",
    "hub_cached_dir",
    "hub_reachable",
    "memory_needed",
    "preflight",
    "preflight_btp",
]

HUB_TIMEOUT_S = 3.0
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# Multipliers on the weights' bytes: activations / KV cache for generation; LoRA adds
# little; full fine-tuning holds weights + gradients (dtype) + two fp32 Adam states.
MARGIN = {"inference": 1.2, "lora": 1.3}
SKIP_ENV = "CODEDISTILL_SKIP_MEMORY_CHECK"
GB = 1e9
_TRUE = {"1", "true", "yes", "on"}
# MLPs with two matrices (up, down); every other family is counted as gated (gate, up, down)
_UNGATED = {"starcoder2", "gpt_bigcode", "gpt2", "gpt_neox", "gptj", "falcon", "phi", "opt", "bloom", "codegen"}
# config.json may omit tie_word_embeddings; transformers' defaults for the families we use
_TIED_DEFAULT = {"starcoder2": True, "gpt_bigcode": True, "gpt2": True, "codegen": False}

_checked: dict[tuple, dict[str, Any]] = {}


# ----------------------------------------------------------------------------- hub


def _offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return var
    return None


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "huggingface"
    )
    return Path(home) / "hub"


def hub_cached_dir(repo_id: str) -> Path | None:
    """The cached snapshot of ``repo_id`` (``main``) if it holds a config and weights."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=_hub_cache())
    if not isinstance(found, str):
        return None
    snap = Path(found).parent
    weights = [
        p for pat in ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json") for p in snap.glob(pat)
    ]
    return snap if weights else None


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, why not): one HEAD request to the hub endpoint (``HF_ENDPOINT``; the
    environment's proxies apply), at most ``timeout`` seconds. Any HTTP answer, even an
    error status, counts as reachable."""
    import urllib.error
    import urllib.request

    url = _hub_endpoint()
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True, ""
    except urllib.error.HTTPError:
        return True, ""
    except Exception as e:  # noqa: BLE001 - DNS, refused, timeout, TLS: not reachable from here
        reason = getattr(e, "reason", e)
        msg = str(reason).splitlines()[0] if str(reason) else type(e).__name__
        return False, f"{url}: {msg[:120]}"


def _hub_config(repo_id: str) -> dict[str, Any] | None:
    """config.json of a hub model (a few KB; the same file transformers fetches first)."""
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(repo_id, "config.json", etag_timeout=HUB_TIMEOUT_S)).read_text())
    except Exception:  # noqa: BLE001 - gated, missing or slow: no size check from a config
        return None


# ----------------------------------------------------------------------------- size


def count_parameters(config: dict[str, Any]) -> int | None:
    """Parameters of a decoder-only transformer from its config.json fields (None when the
    fields are not there). Exact for llama/mistral/qwen2/starcoder2-style models up to
    rotary buffers; MoE models count every expert (all are held in memory)."""
    c = config.get("text_config") or config
    h = c.get("hidden_size") or c.get("n_embd") or c.get("d_model")
    n_layers = c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")
    vocab = c.get("vocab_size")
    if not (h and n_layers and vocab):
        return None
    mt = str(c.get("model_type", ""))
    heads = c.get("num_attention_heads") or c.get("n_head") or 1
    kv = c.get("num_key_value_heads") or (1 if c.get("multi_query") else heads)
    hd = c.get("head_dim") or h // heads
    inter = c.get("intermediate_size") or c.get("n_inner") or 4 * h
    gated = mt not in _UNGATED
    bias = bool(c.get("use_bias", mt in ("starcoder2", "gpt_bigcode", "gpt2")))  # every linear layer
    attn_bias = bias or bool(c.get("attention_bias"))  # q, k, v and o (llama's attention_bias)
    qkv_bias = attn_bias or mt in ("qwen2", "qwen2_moe")  # qwen2: q, k, v only
    mlp_bias = bias or bool(c.get("mlp_bias"))
    layer_norm = mt in _UNGATED  # LayerNorm (weight + bias) rather than RMSNorm (weight)

    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    attn += (heads * hd + 2 * kv * hd if qkv_bias else 0) + (h if attn_bias else 0)

    def mlp(width: int) -> int:
        n = (3 if gated else 2) * h * width
        return n + (((2 if gated else 1) * width + h) if mlp_bias else 0)

    experts = c.get("num_local_experts") or c.get("n_routed_experts") or c.get("num_experts") or 0
    if experts:
        moe_w = c.get("moe_intermediate_size") or inter
        shared = c.get("n_shared_experts") or 0
        dense = c.get("first_k_dense_replace") or 0
        moe = (experts + shared) * mlp(moe_w) + h * experts
        mlp_total = dense * mlp(inter) + (n_layers - dense) * moe
    else:
        mlp_total = n_layers * mlp(inter)
    norm = (2 if layer_norm else 1) * h
    tied = c.get("tie_word_embeddings", config.get("tie_word_embeddings", _TIED_DEFAULT.get(mt, False)))
    embed = vocab * h * (1 if tied else 2)
    return int(n_layers * (attn + 2 * norm) + mlp_total + norm + embed)


def memory_needed(n_params: float, dtype: str, purpose: str = "inference") -> float:
    """Bytes to hold the model for ``purpose`` (inference | lora | full)."""
    b = DTYPE_BYTES[dtype]
    if purpose == "full":
        return n_params * (2 * b + 8) * MARGIN["inference"]
    return n_params * b * MARGIN[purpose]


def _meminfo_available() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_limit() -> float | None:
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = Path(f).read_text().strip()
        except OSError:
            continue
        if v.isdigit() and int(v) < 1 << 60:
            return float(v)
    return None


def available_memory(device: str) -> tuple[float | None, str]:
    """(bytes free, description) on ``device``: CUDA free memory (all visible GPUs for
    ``cuda``, which loads with device_map='auto'; one for ``cuda:N``), else available RAM."""
    if device.startswith("cuda"):
        try:
            import torch

            idx = [int(device.split(":")[1])] if ":" in device else list(range(torch.cuda.device_count()))
            free = sum(torch.cuda.mem_get_info(i)[0] for i in idx)
            return float(free), f"{len(idx)} GPU(s) ({', '.join(torch.cuda.get_device_name(i) for i in idx)})"
        except Exception:  # noqa: BLE001
            return None, "GPU"
    try:
        import psutil

        avail: float | None = float(psutil.virtual_memory().available)
    except ImportError:
        avail = _meminfo_available()
    limit = _cgroup_limit()
    if avail is not None and limit is not None:
        avail = min(avail, limit)
    return avail, "CPU RAM"


def _resolve_device(device: str | None) -> str:
    if device:
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def _resolve_dtype(dtype: str, spec_dtype: str, device: str) -> str:
    if dtype == "auto" and spec_dtype not in (None, "auto"):
        dtype = spec_dtype
    if dtype != "auto":
        if dtype not in DTYPE_BYTES:
            raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    return "bfloat16" if device.startswith("cuda") else "float32"  # as HFGenerator resolves auto


def _smaller_fitting(avail: float, dtype: str, purpose: str, exclude: str) -> list[str]:
    fit = [
        s
        for s in REGISTRY.values()
        if s.size_b
        and s.backend == "hf"
        and s.alias != exclude
        and s.role in ("target", "any")
        and memory_needed(s.size_b * 1e9, dtype, purpose) <= avail
    ]
    return [s.alias for s in sorted(fit, key=lambda s: -(s.size_b or 0.0))] + ["tiny-target"]


# ----------------------------------------------------------------------------- the check


def _name(spec: Any) -> str:
    return spec.alias if spec.alias == spec.path else f"{spec.alias} ({spec.path})"


def preflight(spec: Any, device: str | None = None, dtype: str = "auto", purpose: str = "inference") -> dict[str, Any]:
    """Check that ``spec`` (a registry ModelSpec) can be loaded here; raise ``ConfigError``
    in one line if not. Returns {source, params, dtype, needed_gb, available_gb, device}.
    Checks that passed are remembered for the process."""
    if getattr(spec, "tiny", False):
        return {"model": spec.alias, "source": "embedded", "purpose": purpose}
    if getattr(spec, "backend", "hf") != "hf":
        return {"model": spec.alias, "source": f"served ({spec.backend})", "purpose": purpose}
    key = (spec.alias, spec.path, spec.dtype, spec.size_b, device, dtype, purpose)
    if key in _checked:
        return _checked[key]
    info: dict[str, Any] = {"model": spec.alias, "path": spec.path, "purpose": purpose}
    config: dict[str, Any] | None = None
    local = Path(resolve_local_model(spec.path) or spec.path).expanduser()
    if local.is_dir():
        info["source"] = "local directory"
        config = _read_json(local / "config.json")
    else:
        snap = hub_cached_dir(spec.path)
        if snap is not None:
            info["source"] = f"hub cache ({snap})"
            config = _read_json(snap / "config.json")
        else:
            off = _offline()
            ok, why = (False, f"{off} is set") if off else hub_reachable()
            if not ok:
                raise ConfigError(
                    f"{_name(spec)}: the Hugging Face hub is unreachable ({why}) and the model is not "
                    f"cached. Ways out: a local directory saved with save_pretrained (--model-name "
                    f"/path/to/dir), or HF_HUB_OFFLINE=1 with a cache filled on a machine with internet "
                    f"(hf download {spec.path}), or a served backend (--backend vllm|openai)."
                )
            info["source"] = "hub (will download)"
            config = _hub_config(spec.path)
    params = count_parameters(config) if config else None
    info["params_from"] = "config.json" if params else None
    if params is None and spec.size_b:
        params, info["params_from"] = int(spec.size_b * 1e9), "registry size_b"
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, spec.dtype, dev)
    info.update(device=dev, dtype=dt, params=params)
    if params:
        avail, where = available_memory(dev)
        info.update(
            needed_gb=round(memory_needed(params, dt, purpose) / GB, 2),
            available_gb=round(avail / GB, 2) if avail else None,
        )
        if avail is not None and os.environ.get(SKIP_ENV, "").lower() not in _TRUE:
            check_fit(_name(spec), params, dt, purpose, avail, where, info["params_from"])
    _checked[key] = info
    return info


def check_fit(
    name: str, params: float, dtype: str, purpose: str, avail: float, where: str, params_from: str = "config.json"
) -> None:
    """Raise ConfigError (one line, with the alternatives) when ``params`` in ``dtype`` for
    ``purpose`` need more than ``avail`` bytes."""
    need = memory_needed(params, dtype, purpose)
    if need <= avail:
        return
    what = {"inference": "to generate", "lora": "to fine-tune with LoRA", "full": "to fine-tune fully"}[purpose]
    margin = (
        "weights + gradients + Adam states"
        if purpose == "full"
        else f"+{round((MARGIN[purpose] - 1) * 100)}% for activations"
    )
    smaller = ", ".join(_smaller_fitting(avail, dtype, purpose, name.split(" ")[0]))
    raise ConfigError(
        f"{name} needs about {need / GB:.0f} GB {what} in {dtype} ({params / 1e9:.1f}B parameters "
        f"from {params_from}, {DTYPE_BYTES[dtype]} bytes each, {margin}) but the {where} here "
        f"has {avail / GB:.1f} GB available. Alternatives: a smaller model ({smaller}); bfloat16 on "
        f"a GPU with enough memory (--device cuda --dtype bfloat16); --backend vllm with tensor "
        f"parallel over several GPUs; or a served API (--backend openai). {SKIP_ENV}=1 tries anyway."
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def preflight_btp(plan: Any) -> dict[str, Any]:
    """Both models of a BTP plan before any work: the source to generate (when used and
    loaded here, not served), the target to be fine-tuned here (LoRA or full) whatever
    serves its generations."""
    cfg = plan.cfg
    out: dict[str, Any] = {}
    source_backend = getattr(plan, "source_backend", "hf")
    if cfg.mode in ("finetune", "mixed") or cfg.eval_source:
        out["source"] = (
            preflight(plan.source_spec, cfg.device, cfg.dtype)
            if source_backend == "hf"
            else {"model": plan.source_spec.alias, "source": f"served ({source_backend})"}
        )
    out["target"] = preflight(plan.target_spec, cfg.device, cfg.dtype, "lora" if cfg.use_lora else "full")
    return out
