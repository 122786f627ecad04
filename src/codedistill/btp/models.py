"""The generators a BTP run samples from: the source and the target after each iteration,
loaded lazily, one at a time in memory; :meth:`GeneratorCache.release` frees them (and
stops a vLLM server) before fine-tuning and at the end of a run."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from codedistill.btp.plan import ResolvedInputs
from codedistill.generation import close_generator, generator_usage, make_generator, merge_usage

Log = Callable[[str], None]

#: the models whose programs fill the replay buffer, per BTP mode
GENERATING_ROLES: dict[str, tuple[str, ...]] = {
    "finetune": ("source",),
    "self": ("target",),
    "mixed": ("source", "target"),
}


def generating_roles(mode: str) -> tuple[str, ...]:
    return GENERATING_ROLES[mode]


class GeneratorCache:
    """Lazy loading of the source and (current) target generators; one at a time in memory."""

    def __init__(self, inputs: ResolvedInputs, log: Log):
        self.inputs = inputs
        self.log = log
        self._loaded: dict[str, Any] = {}
        self.usage: dict[str, dict[str, Any]] = {}  # served generators' counters, by name

    def source(self) -> Any:
        if "source" not in self._loaded:
            self.release()
            spec = self.inputs.source_spec
            self.log(f"loading source {self.inputs.cfg.source_model} ({self.inputs.source_backend})")
            self._loaded["source"] = self._make("source", spec, spec.alias)
        return self._loaded["source"]

    def target(self, iteration: int) -> Any:
        """The target after ``iteration`` fine-tuning iterations (0 = the base model), loaded
        from the run directory: a LoRA adapter merged in memory (HF) or served next to the
        base (vLLM), or the fully fine-tuned weights."""
        key = f"target{iteration}"
        if key not in self._loaded:
            self.release()
            spec = self.inputs.target_spec
            if iteration == 0:
                self._loaded[key] = self._make("target", spec, spec.alias)
            else:
                it_dir = self.inputs.out / f"iter_{iteration}"
                model_path: str | None
                adapter: str | None = None
                if not self.inputs.cfg.use_lora:
                    model_path = str(it_dir / "model")
                elif self.inputs.serves_merged:  # the adapter folded in: no LoRA path in the server
                    model_path = str(it_dir / "merged")
                else:  # HF merges the adapter in memory; a server loads the base itself
                    model_path = None if self.inputs.target_backend != "hf" else self.inputs.target_path
                    adapter = str(it_dir / "adapter")
                self._loaded[key] = self._make(
                    "target", spec, f"{spec.alias}@iter{iteration}", model_path=model_path, adapter=adapter
                )
        return self._loaded[key]

    def release(self) -> None:
        """Close every loaded generator (a vLLM server is stopped: the GPU is free again),
        keeping served generators' usage counters."""
        for gen in self._loaded.values():
            u = generator_usage(gen)
            if u is not None:
                name = getattr(gen, "name", "model")
                self.usage[name] = merge_usage(self.usage.get(name), u)
            close_generator(gen)
        self._loaded.clear()
        gc.collect()
        _empty_cuda_cache()

    def _make(self, role: str, spec: Any, name: str, model_path: str | None = None, adapter: str | None = None) -> Any:
        cfg = self.inputs.cfg
        out = self.inputs.out
        backend = self.inputs.source_backend if role == "source" else self.inputs.target_backend
        return make_generator(
            spec,
            backend,
            cfg.serving,
            name=name,
            model_path=model_path,
            adapter=adapter,
            run_dir=str(out),
            device=cfg.device,
            dtype=self.inputs.dtype(spec),
            batch_size=cfg.gen_batch_size,
            require_logprobs=role in generating_roles(cfg.mode),
            log_path=str(out / "logs" / f"vllm_{name.replace('/', '_')}.log"),
        )


def _empty_cuda_cache() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
