"""``tiny-source`` and ``tiny-target``: two small causal LMs trained locally on synth.

Nothing can be downloaded in the project's default world and a random model solves
nothing, so the project brings a competent *source* and a clearly weaker, teachable
*target*, each built from a config in a few minutes on CPU:

* ``tiny-source``: a Llama (RoPE, RMSNorm, SwiGLU) trained on all synth skill families.
* ``tiny-target``: a StarCoder2 (another family: LayerNorm, GELU MLP, biases; a Qwen2
  was dropped because transformers loads its own Qwen2Tokenizer for that model type, which
  re-splits our BPE) with its own byte-level BPE tokenizer (768 tokens, trained on a
  different slice of synth, as a cross-family pair would have), trained on the same task
  family with a third of the source's steps (400 vs 1200): it writes the right shapes but
  copies constants and names less reliably (greedy pass@1 0.47 vs 0.85 on test[:100]).
  Fine-tuning on the source's tested programs is what BTP gives it. The knobs ``steps``,
  ``exclude_templates``, ``train_families``, ``n_train`` and size set its weakness.

  An earlier target was never shown 19 of the 44 templates instead. BTP could not teach
  it those templates: even the *reference* programs of 800 train problems of those
  templates moved it from 0/51 to 3/51 on them while its other templates collapsed
  (40/49 -> 8/49), so a ~1M-parameter model does not learn a new template from a few
  examples per template; an under-trained one does get better with more correct programs
  (reference programs: 0.47 -> 0.67 greedy).

Copying constants from the prompt into the program is what these models find hard: it
appears abruptly, between ~600 and ~1200 steps (batch 16) for the source, between 300
(greedy pass@1 0.09) and 400 steps (0.47) for the target. Far fewer steps give a model
that writes the right shape with wrong constants (pass@1 near 0), whatever its size.

Both are saved like hub checkpoints, so ``AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` load them. ``ensure_tiny_model(name)`` builds on
first use into a cache directory (atomic, file-locked) and reuses it afterwards;
``resolve_model_path(name_or_path)`` maps a tiny name to its built directory and leaves
anything else alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "TINY_BUILD_VERSION",
    "TINY_MODELS",
    "TinySpec",
    "build_tiny_model",
    "default_cache_dir",
    "ensure_tiny_model",
    "is_tiny_model",
    "resolve_model_path",
    "spec_hash",
    "tiny_spec",
]

# Bump when the training code changes in a way that changes the weights (invalidates caches).
TINY_BUILD_VERSION = 1
META_FILE = "codedistill_tiny.json"


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines a tiny model (with the seed).

    Architecture: ``arch`` ("llama" or "qwen2"), sizes, ``max_position_embeddings``
    (RoPE, so a long MBPP prompt costs no parameters). Tokenizer: byte-level BPE of
    ``vocab_size`` trained on ``tokenizer_problems`` synth train problems drawn with
    ``tokenizer_seed``. Training: ``steps`` AdamW steps of ``batch_size`` on the first
    ``n_train`` synth train problems of ``train_families`` (None = all), loss on the
    completion only.
    """

    name: str
    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    vocab_size: int = 1024
    tokenizer_seed: int = 0
    tokenizer_problems: int = 2000
    train_families: tuple[str, ...] | None = None
    exclude_templates: tuple[str, ...] = ()
    n_train: int = 2000
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    prompt_loss_weight: float = 0.0
    max_len: int = 512
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train_families"] = list(self.train_families) if self.train_families else None
        d["exclude_templates"] = list(self.exclude_templates)
        return d


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-source": TinySpec(
        name="tiny-source",
        arch="llama",
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=384,
        vocab_size=1024,
        tokenizer_seed=0,
        tokenizer_problems=2000,
        train_families=None,
        exclude_templates=(),
        n_train=2000,
        steps=1200,
        batch_size=16,
        lr=5e-3,
        warmup=40,
        prompt_loss_weight=0.3,
        description="competent source: Llama, all synth families and templates",
    ),
    "tiny-target": TinySpec(
        name="tiny-target",
        arch="starcoder2",
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=384,
        vocab_size=768,
        tokenizer_seed=1,
        tokenizer_problems=1200,
        train_families=None,
        exclude_templates=(),
        n_train=2000,
        steps=400,
        batch_size=16,
        lr=5e-3,
        warmup=40,
        prompt_loss_weight=0.3,
        description="weaker, teachable target: StarCoder2 with its own 768-token tokenizer, trained "
        "with a third of the source's steps",
    ),
}


def is_tiny_model(name: str) -> bool:
    return name in TINY_MODELS


def _spec_of(name_or_spec: str | TinySpec) -> TinySpec:
    if isinstance(name_or_spec, TinySpec):
        return name_or_spec
    try:
        return TINY_MODELS[name_or_spec]
    except KeyError:
        raise ValueError(f"unknown tiny model {name_or_spec!r}; expected one of {sorted(TINY_MODELS)}") from None


def spec_hash(spec: TinySpec, seed: int = 0) -> str:
    """Short hash of (spec, seed, build version): the cache key of a built model."""
    blob = json.dumps({"spec": spec.to_dict(), "seed": seed, "v": TINY_BUILD_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$CODEDISTILL_CACHE/tiny`` if set, else ``~/.cache/codedistill/tiny``."""
    root = os.environ.get("CODEDISTILL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "codedistill") / "tiny"


def _make_config(spec: TinySpec, tokenizer: Any) -> Any:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if spec.arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if spec.arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common, use_sliding_window=False)
    if spec.arch == "starcoder2":
        from transformers import Starcoder2Config

        return Starcoder2Config(**common, sliding_window=None, use_bias=True)
    if spec.arch == "mistral":
        from transformers import MistralConfig

        return MistralConfig(**common, sliding_window=None)
    raise ValueError(f"unknown tiny arch {spec.arch!r}")


def _train_problems(spec: TinySpec, seed: int) -> list[Any]:
    """The first ``n_train`` synth train problems (of the 2000) in the spec's families and
    not of its excluded templates (fewer if the filter leaves fewer)."""
    from codedistill.data.synth import load_synth

    fams = set(spec.train_families) if spec.train_families else None
    excluded = set(spec.exclude_templates)
    keep = [
        p for p in load_synth("train", seed=seed)
        if (fams is None or p.meta["family"] in fams) and p.meta["template"] not in excluded
    ]
    return keep[: spec.n_train]


def _set_determinism(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except Exception:  # pragma: no cover - older torch
        pass


def build_tiny_model(
    name: str | TinySpec,
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    progress: bool = True,
    num_threads: int | None = 1,
) -> Path:
    """Train the tiny model ``name`` (or a custom ``TinySpec``) and save it to ``out_dir``.

    Writes the model (``save_pretrained``), its tokenizer, a generation config (eos/pad)
    and ``codedistill_tiny.json`` (spec, seed, train stats, wall time). Deterministic for
    a given seed on a given machine (same thread count).

    ``num_threads`` (default 1) is torch's intra-op thread count during the build: on a
    shared 2-core machine one thread was ~5x faster than two (no spinning at OpenMP
    barriers while other processes hold a core), and it makes the weights independent of
    the machine's core count. ``None`` keeps torch's default.
    """
    import torch

    prev = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _build(name, out_dir, seed, progress)
    finally:
        torch.set_num_threads(prev)


def _build(name: str | TinySpec, out_dir: str | os.PathLike[str], seed: int, progress: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from codedistill.data.synth import load_synth
    from codedistill.models._tiny_train import encode_examples, train_lm, train_tokenizer

    spec = _spec_of(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _set_determinism(seed)

    # The tokenizer sees its own corpus: a different slice of synth (and vocab size) per model.
    tok_problems = load_synth("train", n=spec.tokenizer_problems, seed=spec.tokenizer_seed)
    tok_texts = [p.prompt + p.reference for p in tok_problems]
    tokenizer = train_tokenizer(tok_texts, spec.vocab_size)

    train = _train_problems(spec, seed)
    examples = encode_examples(tokenizer, train, spec.max_len)

    config = _make_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    stats = train_lm(
        model,
        examples,
        pad_id=tokenizer.pad_token_id,
        steps=spec.steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        warmup=spec.warmup,
        weight_decay=spec.weight_decay,
        seed=seed,
        progress=progress,
        desc=f"building {spec.name}",
        prompt_loss_weight=spec.prompt_loss_weight,
    )

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    check_tokenizer_roundtrip(out, tokenizer, [p.prompt + p.reference for p in train[:50]])
    meta = {
        "name": spec.name,
        "spec": spec.to_dict(),
        "spec_hash": spec_hash(spec, seed),
        "seed": seed,
        "build_version": TINY_BUILD_VERSION,
        "n_params": n_params,
        "vocab_size": len(tokenizer),
        "n_train_examples": len(examples),
        "mean_example_tokens": sum(len(i) for i, _ in examples) / max(1, len(examples)),
        "train": stats,
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "machine": platform.machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def check_tokenizer_roundtrip(path: Path, trained: Any, texts: list[str]) -> None:
    """``AutoTokenizer.from_pretrained(path)`` must encode exactly as the tokenizer the model
    was trained with. transformers maps some model types to their own tokenizer class with
    its own pre-tokenizer (seen: ``qwen2`` -> Qwen2Tokenizer splits ``"\\n    "`` that our
    BPE merged), which would silently feed the model token sequences it never saw."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(path)
    for t in texts:
        a = trained(t, add_special_tokens=False)["input_ids"]
        b = loaded(t, add_special_tokens=False)["input_ids"]
        if a != b:
            raise RuntimeError(
                f"{path}: AutoTokenizer loads {type(loaded).__name__}, which tokenizes differently from "
                f"the trained tokenizer (e.g. {t[:60]!r}); pick another tiny arch."
            )


def _is_built(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / "config.json").is_file()


def ensure_tiny_model(
    name: str | TinySpec, cache_dir: str | os.PathLike[str] | None = None, seed: int = 0, progress: bool = True
) -> Path:
    """The directory of the built tiny model ``name``, building it on first use.

    The model lives in ``<cache_dir>/<name>-<spec hash>`` (default cache dir:
    ``default_cache_dir()``). Building happens in a temporary sibling directory that is
    renamed into place when complete, under a file lock, so concurrent callers build it
    once and never see a half-written model.
    """
    from filelock import FileLock

    spec = _spec_of(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{spec.name}-{spec_hash(spec, seed)}"
    if _is_built(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if _is_built(final):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            build_tiny_model(spec, tmp, seed=seed, progress=progress)
            if final.exists():  # a broken leftover (no meta file): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_tiny_models(names: tuple[str, ...] = ("tiny-source", "tiny-target"), progress: bool = True) -> dict[str, Path]:
    """Build the missing ones side by side, one process (one thread) each, so that two
    builds on a 2-core machine take the time of one; then return every directory."""
    import subprocess
    import sys

    missing = [n for n in names if not _is_built(default_cache_dir() / f"{n}-{spec_hash(_spec_of(n))}")]
    if len(missing) > 1:
        procs = [subprocess.Popen([sys.executable, "-m", "codedistill", "make-tiny-model", n],
                                  stdout=None if progress else subprocess.DEVNULL,
                                  stderr=None if progress else subprocess.DEVNULL) for n in missing]
        for proc in procs:
            proc.wait()
    return {n: ensure_tiny_model(n, progress=progress) for n in names}


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """``tiny-source``/``tiny-target`` -> their built directory; any other name unchanged."""
    if is_tiny_model(name_or_path):
        return str(ensure_tiny_model(name_or_path, cache_dir=cache_dir))
    return name_or_path


def tiny_spec(name: str, **overrides: Any) -> TinySpec:
    """A copy of a registered spec with some fields changed (e.g. fewer steps in tests)."""
    return replace(_spec_of(name), **overrides)


