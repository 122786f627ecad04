"""Throwaway tiny source/target pairs for BTP's plumbing tests (seconds to build).

They are the project's tiny architectures (Llama source, Qwen2 target, each with its own
locally trained BPE tokenizer) shrunk and barely trained: they exercise every code path
(cross-tokenizer prompts, beams, LoRA, resume) without teaching anything. The learning
test uses the real ``tiny-source``/``tiny-target``.
"""

from __future__ import annotations

from pathlib import Path


def build_throwaway_pair(root: str | Path) -> tuple[Path, Path]:
    from codedistill.models.tiny import build_tiny_model, tiny_spec

    root = Path(root)
    small = dict(
        steps=3, hidden_size=32, num_layers=1, intermediate_size=64, tokenizer_problems=200, n_train=64, batch_size=8
    )
    src, tgt = root / "src", root / "tgt"
    if not (src / "config.json").exists():
        build_tiny_model(tiny_spec("tiny-source", **small), src, progress=False)
    if not (tgt / "config.json").exists():
        build_tiny_model(tiny_spec("tiny-target", **small), tgt, progress=False)
    return src, tgt
