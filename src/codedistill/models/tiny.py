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
``AutoTokenizer.from_pretrained(path)`` load them.

**Shipped.** Built once from their specs by ``codedistill make-tiny-model``, the two models are
part of the package (``codedistill/assets/tiny/<name>/``: safetensors, tokenizer, config and
``codedistill_tiny.json`` with the spec, its hash and the build's provenance, ~4 MB each), so
every machine runs the very same weights (float training differs between CPUs) and nothing
is trained on first use. ``ensure_tiny_model(name)`` returns the shipped directory (read
only) when its spec hash is the current spec's; a spec without shipped files (a changed
spec, a test's custom ``TinySpec``) is built into a cache directory (atomic, file-locked)
and reused afterwards. ``resolve_model_path(name_or_path)`` maps a tiny name to its
directory and leaves anything else alone. ``rebuild_and_compare`` (the CLI's
``make-tiny-model``) trains a model again from its spec and compares it tensor by tensor
with the shipped files.
"""

from __future__ import annotations

import functools
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

from codedistill.data.synth import load_synth
from codedistill.models._tiny_train import encode_examples, train_lm, train_tokenizer

__all__ = [
    "SHIPPED_DIR",
    "TINY_BUILD_VERSION",
    "TINY_MODELS",
    "TinySpec",
    "build_tiny_model",
    "compare_tiny_models",
    "default_cache_dir",
    "ensure_tiny_model",
    "is_tiny_model",
    "rebuild_and_compare",
    "resolve_model_path",
    "ship_tiny_model",
    "shipped_tiny_model",
    "spec_hash",
    "tiny_spec",
    "weights_id",
]

# Bump when the training code changes in a way that changes the weights (invalidates caches).
TINY_BUILD_VERSION = 1
META_FILE = "codedistill_tiny.json"
# The shipped builds: codedistill/assets/tiny/<name>/ (package data, read only)
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny"


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
    fams = set(spec.train_families) if spec.train_families else None
    excluded = set(spec.exclude_templates)
    keep = [
        p
        for p in load_synth("train", seed=seed)
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


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def shipped_tiny_model(name: str | TinySpec, seed: int = 0) -> Path | None:
    """The shipped directory of ``name`` if the package carries a build of exactly this spec
    and seed (same spec hash), else None (a custom or changed spec is built instead)."""
    spec = _spec_of(name)
    path = SHIPPED_DIR / spec.name
    meta = _read_meta(path)
    if meta is None or meta.get("spec_hash") != spec_hash(spec, seed) or not (path / "model.safetensors").is_file():
        return None
    return path


def ensure_tiny_model(
    name: str | TinySpec,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    shipped: bool = True,
) -> Path:
    """The directory of the tiny model ``name``: the shipped one (see ``shipped_tiny_model``)
    unless ``shipped=False``, else a build in the cache, made on first use.

    A cached build lives in ``<cache_dir>/<name>-<spec hash>`` (default cache dir:
    ``default_cache_dir()``). Building happens in a temporary sibling directory that is
    renamed into place when complete, under a file lock, so concurrent callers build it
    once and never see a half-written model.
    """
    from filelock import FileLock

    spec = _spec_of(name)
    if shipped and (found := shipped_tiny_model(spec, seed)) is not None:
        return found
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


def ensure_tiny_models(
    names: tuple[str, ...] = ("tiny-source", "tiny-target"), progress: bool = True
) -> dict[str, Path]:
    """Build the missing ones side by side, one process (one thread) each, so that two
    builds on a 2-core machine take the time of one; then return every directory."""
    import subprocess
    import sys

    missing = [
        n
        for n in names
        if shipped_tiny_model(n) is None and not _is_built(default_cache_dir() / f"{n}-{spec_hash(_spec_of(n))}")
    ]
    if len(missing) > 1:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "codedistill", "make-tiny-model", n],
                stdout=None if progress else subprocess.DEVNULL,
                stderr=None if progress else subprocess.DEVNULL,
            )
            for n in missing
        ]
        for proc in procs:
            proc.wait()
    return {n: ensure_tiny_model(n, progress=progress) for n in names}


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """``tiny-source``/``tiny-target`` -> their shipped (or built) directory; any other name unchanged."""
    if is_tiny_model(name_or_path):
        return str(ensure_tiny_model(name_or_path, cache_dir=cache_dir))
    return name_or_path


def tiny_spec(name: str, **overrides: Any) -> TinySpec:
    """A copy of a registered spec with some fields changed (e.g. fewer steps in tests)."""
    return replace(_spec_of(name), **overrides)


# ----------------------------------------------------------------------------- shipping, comparing


def compare_tiny_models(built: str | os.PathLike[str], reference: str | os.PathLike[str]) -> dict[str, Any]:
    """Tensor by tensor: {identical, tensors, differing, max_abs_diff, worst_tensor,
    tokenizer_identical, config_identical}. ``identical`` means every tensor bit for bit
    and the same tokenizer and config."""
    from safetensors.torch import load_file

    a, b = Path(built), Path(reference)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    diffs: dict[str, float] = {}
    for k in sorted(set(wa) | set(wb)):
        if k not in wa or k not in wb or wa[k].shape != wb[k].shape:
            diffs[k] = float("inf")
        else:
            diffs[k] = float((wa[k].double() - wb[k].double()).abs().max()) if wa[k].numel() else 0.0
    differing = {k: d for k, d in diffs.items() if d != 0.0}
    worst = max(differing, key=lambda k: differing[k]) if differing else None

    def same(name: str) -> bool:
        fa, fb = a / name, b / name
        return fa.is_file() and fb.is_file() and fa.read_bytes() == fb.read_bytes()

    tok_same = same("tokenizer.json")
    cfg_same = same("config.json")
    return {
        "identical": not differing and tok_same and cfg_same,
        "tensors": len(diffs),
        "differing": len(differing),
        "max_abs_diff": max(diffs.values()) if diffs else 0.0,
        "worst_tensor": worst,
        "tokenizer_identical": tok_same,
        "config_identical": cfg_same,
    }


def describe_comparison(name: str, cmp: dict[str, Any]) -> str:
    """One plain sentence for the CLI."""
    if cmp["identical"]:
        return (
            f"{name}: identical to the shipped model ({cmp['tensors']} tensors bit for bit, same tokenizer and config)."
        )
    parts = [
        f"{cmp['differing']} of {cmp['tensors']} tensors differ (max abs diff "
        f"{cmp['max_abs_diff']:.3g}, in {cmp['worst_tensor']})"
        if cmp["differing"]
        else "all tensors equal"
    ]
    parts.append("same tokenizer" if cmp["tokenizer_identical"] else "the tokenizer differs")
    parts.append("same config" if cmp["config_identical"] else "the config differs")
    return (
        f"{name}: differs from the shipped model: {', '.join(parts)}. Not an error: float training "
        "differs between CPUs and thread counts; `tiny-source`/`tiny-target` keep loading the shipped files."
    )


def rebuild_and_compare(
    name: str | TinySpec,
    out: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    reference: str | os.PathLike[str] | None = None,
) -> tuple[Path, dict[str, Any] | None]:
    """Build ``name`` from its spec (into ``out``, or into the cache, reused if already
    built there) and compare it with ``reference`` (default: the shipped build of the same
    spec). Returns (build directory, comparison or None when there is nothing to compare)."""
    spec = _spec_of(name)
    if out is not None:
        path = build_tiny_model(spec, out, seed=seed, progress=progress)
    else:
        path = ensure_tiny_model(spec, seed=seed, progress=progress, shipped=False)
    ref = Path(reference) if reference is not None else shipped_tiny_model(spec, seed)
    return path, (compare_tiny_models(path, ref) if ref is not None else None)


def weights_id(path: str | os.PathLike[str]) -> str:
    """``<spec hash>-<sha256 of model.safetensors, 12 hex>`` of a tiny model directory: what
    identifies its weights wherever it lies (a shipped directory's name carries no hash)."""
    p = Path(path)
    meta = _read_meta(p) or {}
    st = (p / "model.safetensors").stat()
    return f"{meta.get('spec_hash', 'nospec')}-{_file_sha(str(p / 'model.safetensors'), st.st_mtime_ns, st.st_size)}"


@functools.lru_cache(maxsize=32)
def _file_sha(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def ship_tiny_model(built: str | os.PathLike[str], dest_root: str | os.PathLike[str] | None = None) -> Path:
    """Maintainers: copy a build (its model, tokenizer, config and metadata) into the
    package's shipped directory (``SHIPPED_DIR/<name>``), replacing what was there."""
    src = Path(built)
    meta = _read_meta(src)
    if meta is None:
        raise ValueError(f"{src} is not a tiny model build (no {META_FILE})")
    dest = Path(dest_root or SHIPPED_DIR) / meta["name"]
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            shutil.copy2(f, tmp / f.name)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest
