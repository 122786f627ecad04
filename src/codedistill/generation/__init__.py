"""Generators: one factory for every place a model generates (baseline, BTP, evaluation).

``make_generator(spec, backend, serving, ...)`` returns an object with the Generator
protocol (``sample``, ``beam_search``, ``name``, ``tokenizer``):

- ``hf``: in-process transformers (:mod:`codedistill.generation.hf`);
- ``vllm``: a vLLM server started for this model (and adapter) and stopped on ``close()``
  (:mod:`codedistill.generation.vllm`);
- ``openai``: any OpenAI-compatible endpoint that is already running (DeepSeek's API, a
  vLLM/SGLang deployment; :mod:`codedistill.generation.openai_api`).

Call :func:`close_generator` when a phase is done (it stops a vLLM server, frees a GPU).
Served answers are cached in the response cache (:func:`response_cache_dir`, shared by all
runs of the user by default; :mod:`codedistill.generation.cache`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from codedistill.errors import ConfigError
from codedistill.models.loading import merge_adapter

BACKENDS = ("hf", "vllm", "openai")
RESPONSE_CACHE_SHARED = "shared"  # cache_path: the user's cache directory (the default)
RESPONSE_CACHE_RUN = "run"  # cache_path: responses/ in the run directory
LEGACY_CACHE_FILE = "generation_cache.sqlite"  # the run directory's SQLite cache of earlier versions


class ServingConfig(BaseModel):
    """How served models are reached (``--backend vllm|openai``); recorded in the run."""

    model_config = ConfigDict(extra="forbid")

    base_url: list[str] = Field(default_factory=list, description="OpenAI-compatible endpoint(s), load-balanced")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    served_model_name: str | None = Field(None, description="model name the server knows (default: registry)")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    max_retries: int = Field(8, ge=0)
    request_timeout: float = Field(600.0, gt=0)
    max_n: int | None = Field(None, ge=1, description="largest n the server takes in one request")
    beam_search: bool | None = Field(
        None, description="server has vLLM's use_beam_search (default: vllm yes, openai no)"
    )
    fallback_temperature: float = Field(1.0, gt=0, description="sampling temperature that replaces missing beam search")
    price_input_per_1m: float | None = Field(None, ge=0)
    price_output_per_1m: float | None = Field(None, ge=0)
    cache: bool = Field(True, description="cache every served answer (a rerun or resume sends nothing twice)")
    cache_path: str | None = Field(
        None,
        description="Response cache: shared (the default: $CODEDISTILL_CACHE/responses, else "
        "~/.cache/codedistill/responses, one for every run of this user), run (responses/ in the run "
        "directory), or a directory.",
    )
    # vLLM server
    vllm_python: str | None = Field(None, description="interpreter of the vLLM environment (default .venv-vllm)")
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=16)
    startup_timeout: float = Field(900.0, gt=0)
    kv_cache_gib: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    cpu_reserved_cores: int | None = Field(
        None,
        ge=0,
        description="VLLM_CPU_NUM_OF_RESERVED_CPU on CPU: cores vLLM keeps off the model for its API "
        "server (vLLM's default: 1; 0 lets the model use every core, faster where there are few)",
    )
    extra_args: list[str] = Field(default_factory=list, description="more vLLM server flags")

    @field_validator("base_url", mode="before")
    @classmethod
    def _urls(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            v = [x for x in v.replace(",", " ").split() if x]
        return [str(x).rstrip("/") for x in v]


def shared_response_cache_dir() -> Path:
    """``$CODEDISTILL_CACHE/responses``, else ``~/.cache/codedistill/responses``."""
    from codedistill.models.tiny import default_cache_dir

    return default_cache_dir().parent / "responses"


def response_cache_dir(serving: ServingConfig, run_dir: str | Path | None = None) -> Path | None:
    """The response cache directory of ``serving`` for a run in ``run_dir`` (None: no cache).

    ``cache_path``: unset or ``shared``: :func:`shared_response_cache_dir`; ``run``:
    ``run_dir/responses`` (the shared one for a generator without a run directory); else that
    directory (an old SQLite cache file named there: a ``.d`` directory beside it, the file
    read as a legacy cache)."""
    if not serving.cache:
        return None
    where = serving.cache_path or RESPONSE_CACHE_SHARED
    if where == RESPONSE_CACHE_SHARED or (where == RESPONSE_CACHE_RUN and run_dir is None):
        return shared_response_cache_dir()
    if where == RESPONSE_CACHE_RUN:
        return Path(run_dir) / "responses"  # type: ignore[arg-type]
    p = Path(where).expanduser()
    return p.with_name(p.name + ".d") if p.is_file() else p


def legacy_response_cache(serving: ServingConfig, run_dir: str | Path | None = None) -> Path | None:
    """An old SQLite response cache to read: ``cache_path`` naming such a file, else the run
    directory's ``generation_cache.sqlite`` (None when there is none)."""
    if not serving.cache:
        return None
    if serving.cache_path and serving.cache_path not in (RESPONSE_CACHE_SHARED, RESPONSE_CACHE_RUN):
        p = Path(serving.cache_path).expanduser()
        if p.is_file():
            return p
    if run_dir is not None and (Path(run_dir) / LEGACY_CACHE_FILE).is_file():
        return Path(run_dir) / LEGACY_CACHE_FILE
    return None


def resolve_backend(spec: Any, backend: str | None) -> str:
    """The backend for a model: the flag, else the registry's (``hf`` for loadable models)."""
    b = (backend or getattr(spec, "backend", "hf") or "hf").lower()
    if b not in BACKENDS:
        raise ConfigError(f"unknown backend {b!r}; use one of {', '.join(BACKENDS)}")
    if b == "hf" and getattr(spec, "backend", "hf") == "openai":
        raise ConfigError(
            f"{spec.alias} is served through an API, not loadable with the HF backend on one node: "
            "use --backend openai (its API; the key from --api-key-env) or --backend vllm on a multi-GPU node."
        )
    return b


def has_beam_search(backend: str, serving: ServingConfig) -> bool:
    if serving.beam_search is not None:
        return serving.beam_search
    return backend in ("hf", "vllm")


def beam_fallback_note(alias: str, backend: str, serving: ServingConfig, num_beams: int) -> str | None:
    """The plain-words note for config.json and the report, or None when beams are real."""
    if has_beam_search(backend, serving):
        return None
    return (
        f"{alias} is reached through an OpenAI-compatible API ({backend}) without beam search: its beam "
        f"phase draws {num_beams} samples per problem at temperature {serving.fallback_temperature:g} "
        "instead of returning beams"
    )


def expected_served_model(spec: Any, serving: ServingConfig) -> str:
    """The ``model`` an endpoint should report in its answers: the registry's ``served_model``
    where the name asked for is the registry's own, else the name asked for."""
    asked = serving.served_model_name or getattr(spec, "served_name", None) or spec.path
    expected = getattr(spec, "served_model", None)
    return expected if expected and asked == getattr(spec, "served_name", None) else asked


def describe(spec: Any, backend: str, serving: ServingConfig) -> dict[str, Any]:
    """What decides the generations (goes into config.json; no addresses or keys)."""
    d: dict[str, Any] = {"backend": backend}
    if backend == "openai":
        d["served_model_name"] = serving.served_model_name or getattr(spec, "served_name", None) or spec.path
        d["beam_search"] = has_beam_search(backend, serving)
    elif backend == "vllm":
        d["beam_search"] = True
        d["logprobs_mode"] = "raw_logprobs"
    return d


def make_generator(
    spec: Any,
    backend: str | None = None,
    serving: ServingConfig | dict[str, Any] | None = None,
    *,
    name: str | None = None,
    model_path: str | None = None,
    adapter: str | None = None,
    run_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 16,
    require_logprobs: bool = False,
    log_path: str | None = None,
    threads: int | str | None = None,
) -> Any:
    """A generator for ``spec`` on ``backend`` (see the module docstring).

    ``model_path`` overrides where the weights are (a fine-tuned full model); ``adapter``
    is a LoRA adapter directory (vLLM serves it with ``--enable-lora``; HF merges it in
    memory). ``run_dir``: the run's directory (the response cache's with ``--response-cache
    run``, and where an old ``generation_cache.sqlite`` is read from). ``threads``: the HF
    backend's CPU threads (:class:`~codedistill.generation.hf.HFGenerator`)."""
    if serving is None:
        serving = ServingConfig()
    elif isinstance(serving, dict):
        serving = ServingConfig(**serving)
    backend = resolve_backend(spec, backend)
    name = name or spec.alias
    cache_dir = response_cache_dir(serving, run_dir)
    legacy = legacy_response_cache(serving, run_dir)
    dtype = spec.dtype if dtype in (None, "auto") else dtype
    base_special = spec.prompt_style == "base"
    if backend == "openai":
        from codedistill.generation.openai_api import (
            OpenAIGenerator,
            OpenAISettings,
            Pricing,
            RetryPolicy,
            ServerFeatures,
        )

        if adapter:
            raise ConfigError(
                "a LoRA adapter cannot be attached to a remote OpenAI endpoint; use --backend vllm "
                "(it serves the adapter) or hf."
            )
        urls = serving.base_url or ([spec.base_url] if getattr(spec, "base_url", None) else [])
        if not urls:
            raise ConfigError(f"{spec.alias}: --backend openai needs --base-url (the server's /v1 address).")
        served_name = serving.served_model_name or getattr(spec, "served_name", None) or spec.path
        settings = OpenAISettings(
            name=name,
            prompt_style=spec.prompt_style,
            api_key_env=serving.api_key_env or getattr(spec, "api_key_env", None),
            concurrency=serving.concurrency,
            require_logprobs=require_logprobs,
            fallback_temperature=serving.fallback_temperature,
            cache_path=cache_dir,
            legacy_cache_path=legacy,
            model_id=f"openai:{served_name}",
            expected_model=expected_served_model(spec, serving),
            retry=RetryPolicy(max_retries=serving.max_retries, timeout=serving.request_timeout),
            server=ServerFeatures(
                max_n=serving.max_n if serving.max_n is not None else getattr(spec, "max_n", None),
                beam_search=has_beam_search(backend, serving),
            ),
            pricing=Pricing(serving.price_input_per_1m, serving.price_output_per_1m),
        )
        return OpenAIGenerator(served_name, urls, settings)
    from codedistill.models.registry import local_path

    path = model_path or local_path(spec)
    if backend == "vllm":
        from codedistill.generation.vllm import VLLMGenerator

        server_kwargs = dict(
            python=serving.vllm_python,
            dtype=dtype if dtype != "auto" else "auto",
            tensor_parallel_size=serving.tensor_parallel_size,
            data_parallel_size=serving.data_parallel_size,
            gpu_memory_utilization=serving.gpu_memory_utilization,
            max_model_len=serving.max_model_len,
            extra_args=serving.extra_args,
            startup_timeout=serving.startup_timeout,
            kv_cache_gib=serving.kv_cache_gib,
            cpu_reserved_cores=serving.cpu_reserved_cores,
            log_path=log_path,
        )
        return VLLMGenerator(
            str(path),
            name,
            served_name=serving.served_model_name or spec.alias,
            adapter=adapter,
            add_special_tokens=base_special,
            cache_path=str(cache_dir) if cache_dir else None,
            legacy_cache_path=str(legacy) if legacy else None,
            require_logprobs=require_logprobs,
            concurrency=max(serving.concurrency, 16),
            server_kwargs=server_kwargs,
            max_retries=min(serving.max_retries, 3),
            fallback_temperature=serving.fallback_temperature,
        )
    from codedistill.generation.hf import HFGenerator
    from codedistill.models.preflight import preflight

    if model_path is None:
        preflight(spec, device, dtype)  # unreachable hub / too large: one clear line, before any weights
    if adapter:
        from codedistill.generation.hf import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(str(path), device=device, dtype=dtype)
        model = merge_adapter(model, adapter)
        model.eval()
        return HFGenerator(
            model, tok, name=name, batch_size=batch_size, add_special_tokens=base_special, threads=threads
        )
    return HFGenerator.from_pretrained(
        str(path),
        name=name,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        add_special_tokens=base_special,
        threads=threads,
    )


def close_generator(gen: Any) -> None:
    """Stop what a generator holds (a vLLM server, client threads); no-op for HF."""
    close = getattr(gen, "close", None)
    if callable(close):
        close()


def generator_usage(gen: Any) -> dict[str, Any] | None:
    """Request/token counters of a served generator (None for HF)."""
    usage = getattr(gen, "usage", None)
    return usage() if callable(usage) else None


def check_context(gen: Any, prompts: Sequence[str], max_new_tokens: int, names: Sequence[str] = ()) -> None:
    """Before a phase sends anything: every prompt with ``max_new_tokens`` fits a served
    generator's context, else one ``ConfigError`` naming the problem and the fix (no-op for
    generators without a set context)."""
    check = getattr(gen, "check_context", None)
    if callable(check):
        check(prompts, max_new_tokens, names)


def requests_sent(gen: Any) -> int | None:
    """Requests a served generator has sent to its server so far (not those its response
    cache answered); None for an in-process generator, whose every call computes."""
    usage = generator_usage(gen)
    return None if usage is None else int(usage.get("requests_sent") or 0)


def computed_since(gen: Any, before: int | None) -> bool:
    """Whether ``gen`` computed anything since ``before = requests_sent(gen)``: False only for
    work its response cache answered in full (no time to learn from)."""
    now = requests_sent(gen)
    return now is None or before is None or now > before


_COUNTERS = ("requests_sent", "cache_hits", "retries_total", "prompt_tokens", "completion_tokens")


def add_counts(a: dict[str, int] | None, b: dict[str, int] | None) -> dict[str, int]:
    """Two ``{name: count}`` tallies as one."""
    out = dict(a or {})
    for k, v in (b or {}).items():
        out[k] = out.get(k, 0) + v
    return out


def merge_usage(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Two usage records of the same model (e.g. loaded in two phases) as one."""
    if not a:
        return dict(b)
    out = {**a, **{k: v for k, v in b.items() if k not in _COUNTERS}}
    for k in _COUNTERS:
        out[k] = (a.get(k) or 0) + (b.get(k) or 0)
    out["retries"] = {
        r: a.get("retries", {}).get(r, 0) + b.get("retries", {}).get(r, 0)
        for r in set(a.get("retries", {})) | set(b.get("retries", {}))
    }
    if a.get("cost_usd") is not None or b.get("cost_usd") is not None:
        out["cost_usd"] = (a.get("cost_usd") or 0.0) + (b.get("cost_usd") or 0.0)
    out["fallbacks"] = sorted(set(a.get("fallbacks", [])) | set(b.get("fallbacks", [])))
    out["notes"] = sorted(set(a.get("notes", [])) | set(b.get("notes", [])))
    out["served_models"] = add_counts(a.get("served_models"), b.get("served_models"))
    out["system_fingerprints"] = sorted(set(a.get("system_fingerprints", [])) | set(b.get("system_fingerprints", [])))
    return out


def check_served(spec: Any, backend: str, serving: ServingConfig | None = None) -> None:
    """Before any work: an API model has an endpoint and (for a remote one) its key, and a
    vLLM backend has its environment (ConfigError naming the fix otherwise)."""
    import os

    serving = serving or ServingConfig()
    if backend == "openai":
        from codedistill.generation.openai_api import is_local_url

        urls = serving.base_url or ([spec.base_url] if getattr(spec, "base_url", None) else [])
        if not urls:
            raise ConfigError(f"{spec.alias}: --backend openai needs --base-url (the server's /v1 address).")
        env = serving.api_key_env or getattr(spec, "api_key_env", None)
        if env and not os.environ.get(env) and not all(is_local_url(u) for u in urls):
            raise ConfigError(
                f"the API key for {spec.alias} ({', '.join(urls)}) is missing: set the environment variable "
                f"{env} (export {env}=...), or name another one with --api-key-env."
            )
    elif backend == "vllm":
        from codedistill.generation.vllm import check_vllm_python

        check_vllm_python(serving.vllm_python)
