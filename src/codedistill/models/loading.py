"""Loading a causal LM and its tokenizer: the one place for the dtype rule, the pad token
and merging a LoRA adapter, used by generation (``generation/hf.py``) and fine-tuning
(``training/``) alike.

dtype ``auto``: bfloat16 on a CUDA GPU that has it, float16 on one that does not, float32
on CPU (so training and generation run the same weights in the same precision).

Memory on CPU: a float32 safetensors checkpoint asked for in bfloat16 or float16 is loaded
lazily in float32 (memory-mapped: nothing is read yet) and cast parameter by parameter, a
few MiB at a time, each float32 slice paged out of the process once copied
(:func:`cast_parameters_lean`). ``from_pretrained(dtype=bfloat16)`` instead holds every
float32 page it has read until the file is closed: for Gemma 3 270M, 1,072 MB of float32
beside the 536 MB of bfloat16 at the peak. Same parameters either way (the same float32 ->
bfloat16 rounding); floating buffers are given the dtypes ``from_pretrained`` would give them.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import mmap
import sys
import warnings
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(name: str, device: str) -> Any:
    """The torch dtype for a dtype name (``auto``: see the module docstring)."""
    import torch

    if name in ("float32", "fp32"):
        return torch.float32
    if name in ("bfloat16", "bf16"):
        return torch.bfloat16
    if name in ("float16", "fp16"):
        return torch.float16
    if name != "auto":
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_causal_lm(
    path: str | Path, device: str, dtype: str = "auto", spread: bool = False, trust_remote_code: bool = False
) -> Any:
    """``from_pretrained`` on ``device``; ``spread`` (with device ``cuda``) lets accelerate place
    a model larger than one GPU over all GPUs (``device_map='auto'``). On CPU a float32
    checkpoint wanted in a narrower dtype is cast lazily (the module docstring)."""
    from transformers import AutoModelForCausalLM

    hide_loading_bars()
    want = pick_dtype(dtype, device)
    if device == "cpu" and not trust_remote_code and _narrows_float32_checkpoint(path, want):
        lazy: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=_float32())
        return cast_parameters_lean(lazy, want)
    kwargs: dict[str, Any] = {"dtype": want}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if spread and device == "cuda":
        kwargs["device_map"] = "auto"
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.to(device)


def _float32() -> Any:
    import torch

    return torch.float32


def _narrows_float32_checkpoint(path: str | Path, want: Any) -> bool:
    """True when ``path`` is a local float32 safetensors checkpoint and ``want`` is a 16-bit
    float dtype (the case :func:`cast_parameters_lean` is for)."""
    import torch

    p = Path(path)
    if want not in (torch.bfloat16, torch.float16) or not p.is_dir() or not any(p.glob("*.safetensors")):
        return False
    try:
        from transformers import AutoConfig

        stored = getattr(AutoConfig.from_pretrained(str(p)), "dtype", None)
    except Exception:  # noqa: BLE001 - not a config transformers reads: the ordinary path decides
        return False
    return stored in (torch.float32, "float32")


#: bytes of float32 cast (and paged out) at a time by :func:`cast_parameters_lean`
CAST_CHUNK_BYTES = 16 * 2**20
_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages (clean file pages leave the process; no data is lost)


def _page_out(t: Any) -> None:
    """Ask the kernel to reclaim the whole pages of ``t``'s bytes (best effort, Linux only).

    ``MADV_PAGEOUT`` never loses data: a memory-mapped file's clean pages are dropped from the
    process (read again from the file if touched), anonymous pages without swap stay."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):  # pragma: no cover
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start, size = t.data_ptr(), t.numel() * t.element_size()
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        madvise(lo, hi - lo, _MADV_PAGEOUT)  # an old kernel's EINVAL: the pages just stay


def cast_parameters_lean(model: Any, dtype: Any) -> Any:
    """``model``'s floating parameters cast to ``dtype`` in place, :data:`CAST_CHUNK_BYTES` at
    a time, each source slice paged out once copied (peak: the new copies and one slice, not
    the whole float32 model). Tied parameters stay tied (one Parameter, cast once). Floating
    buffers get the dtype ``from_pretrained(dtype=...)`` gives them (some stay float32, e.g.
    rotary frequencies), read from the model built on the meta device."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            src = param.data
            if not src.is_floating_point() or src.dtype == dtype:
                continue
            new = torch.empty(src.shape, dtype=dtype, device=src.device)
            flat_src, flat_new = src.reshape(-1), new.view(-1)
            step = max(1, CAST_CHUNK_BYTES // src.element_size())
            for a in range(0, flat_src.numel(), step):
                piece = flat_src[a : a + step]
                flat_new[a : a + step].copy_(piece)
                _page_out(piece)
            param.data = new
            del src, flat_src
        _cast_buffers_like_from_pretrained(model, dtype)
    model.config.dtype = dtype
    release_freed_memory()
    return model


def _cast_buffers_like_from_pretrained(model: Any, dtype: Any) -> None:
    import torch

    try:
        with torch.device("meta"):
            ref = type(model)._from_config(copy.deepcopy(model.config), dtype=dtype)
        want = {name: b.dtype for name, b in ref.named_buffers()}
    except Exception:  # noqa: BLE001 - no meta build: leave the buffers as loaded
        return
    for module_name, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            target = want.get(full)
            if buf is not None and buf.is_floating_point() and target is not None and buf.dtype != target:
                persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(name, buf.to(target), persistent=persistent)


def release_freed_memory() -> None:
    """Collect garbage and hand glibc's freed heap back to the system (``malloc_trim``); a
    no-op elsewhere. Resident memory then says what is still in use."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)


def slim_tokenizer(tokenizer: Any) -> Any:
    """Drop the Python copies of the vocabulary and merges that transformers 5 keeps beside a
    Rust (``tokenizers``) tokenizer after building it (``_vocab``, ``_merges``: for Gemma 3,
    262,144 entries and 514,906 pairs, about 200 MB resident). Only where no method of the
    tokenizer's classes other than ``__init__`` reads them (whisper's ``save_vocabulary`` does;
    such a tokenizer keeps them). Encoding, decoding, ``get_vocab`` and ``save_pretrained``
    read the Rust tokenizer."""
    if getattr(tokenizer, "_tokenizer", None) is None:
        return tokenizer
    names = [n for n in ("_vocab", "_merges") if n in vars(tokenizer)]
    if not names:
        return tokenizer
    for cls in type(tokenizer).__mro__:
        for attr, fn in vars(cls).items():
            code = getattr(fn, "__code__", None)
            if attr != "__init__" and code is not None and any(n in code.co_names for n in names):
                return tokenizer
    for n in names:
        delattr(tokenizer, n)
    release_freed_memory()
    return tokenizer


def ensure_pad_token(tokenizer: Any) -> Any:
    """A tokenizer without a pad token pads with its EOS (or, without one, its UNK) token."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    return ensure_pad_token(AutoTokenizer.from_pretrained(str(path), **kwargs))


def merge_adapter(model: Any, adapter: str | Path) -> Any:
    """``model`` with the LoRA adapter saved in ``adapter`` folded into its weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


#: transformers' own bars over a model's weights (5.x; 4.x), drawn on every load of every model
LOADING_BARS = ("Loading weights", "Loading checkpoint shards")
_bars_hidden = False


def _no_loading_bar(previous: Any) -> Any:
    def hook(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if str(kwargs.get("desc") or "").startswith(LOADING_BARS):
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    return hook


def hide_loading_bars() -> None:
    """transformers' "Loading weights" bar off for this process (codedistill says itself what
    it loads; the bar is drawn in full on every load, even of a tiny model, into output that
    is not a terminal). Only that bar: downloads' bars (huggingface_hub) and the rest stay.
    Through ``transformers.utils.logging.set_tqdm_hook`` (transformers 5); idempotent."""
    global _bars_hidden
    if _bars_hidden:
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:  # pragma: no cover - transformers < 5: no hook; its bars stay
        return
    previous = set_hook(None)
    set_hook(_no_loading_bar(previous))
    _bars_hidden = True


def quiet_transformers() -> None:
    """transformers' and peft's notices that ask nothing of the user, silenced."""
    # transformers 5.x renamed gradient checkpointing; peft and TRL still use the old names on
    # every adapter load and GRPO step (a FutureWarning each, nothing for the user to do)
    warnings.filterwarnings(
        "ignore", category=FutureWarning, message=r"`(is_)?gradient_checkpointing\w*` is deprecated"
    )
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
