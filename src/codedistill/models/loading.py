"""Loading a causal LM and its tokenizer: the one place for the dtype rule, the pad token
and merging a LoRA adapter, used by generation (``generation/hf.py``) and fine-tuning
(``training/``) alike.

dtype ``auto``: bfloat16 on a CUDA GPU that has it, float16 on one that does not, float32
on CPU (so training and generation run the same weights in the same precision).
"""

from __future__ import annotations

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
    a model larger than one GPU over all GPUs (``device_map='auto'``)."""
    from transformers import AutoModelForCausalLM

    hide_loading_bars()
    kwargs: dict[str, Any] = {"dtype": pick_dtype(dtype, device)}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if spread and device == "cuda":
        kwargs["device_map"] = "auto"
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.to(device)


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
