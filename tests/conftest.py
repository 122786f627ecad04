"""Shared fixtures: real (tiny) models and tokenizers built locally, no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import vocabs

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # the real vocabularies stay in the machine's cache (fetched once per machine, not per checkout)
    os.environ.setdefault(vocabs.DIR_VAR, str(vocabs.cache_dir()))
    # tiny models whose spec is not shipped (changed specs) are built once into this cache
    os.environ.setdefault("CODEDISTILL_CACHE", str(REPO / ".cache" / "codedistill"))


def pytest_collection_finish(session):
    """Slow tests use the embedded tiny models. They are shipped with the package, so this
    builds nothing; only a changed spec without re-shipped files is built here (both side by
    side, one process each, before the first test)."""
    if any(item.get_closest_marker("slow") for item in session.items):
        from codedistill.models.tiny import ensure_tiny_models

        ensure_tiny_models(progress=False)


@pytest.fixture(scope="session")
def random_lm(tmp_path_factory):
    """A randomly initialised 2-layer Llama with a locally trained byte-level BPE
    tokenizer, saved and re-loaded with save_pretrained/from_pretrained like a hub model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("random_lm")
    corpus = [
        "def add(a, b):\n    return a + b\n",
        "assert add(1, 2) == 3\n[DONE]\n",
        "You are an expert Python programmer, and here is your task: Write a function.\n",
        "for i in range(10):\n    x = x * 2 - i\n",
        "[BEGIN]\nimport math\n",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(out), out
