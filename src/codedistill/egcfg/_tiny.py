"""Throwaway tiny model + tokenizer for EG-CFG's equality tests (random weights).

A 2-layer LlamaForCausalLM with random weights and a byte-level BPE tokenizer trained in
memory on a small Python corpus. Random weights are fine for equality tests (greedy /
guided decoding must match a reference token for token, whatever the model).
"""

from __future__ import annotations

import functools
import textwrap

CORPUS = [
    textwrap.dedent(
        """\
        def add(a, b):
            return a + b

        def is_even(n):
            if n % 2 == 0:
                return True
            return False

        def total(xs):
            s = 0
            for x in xs:
                s += x
            return s

        def reverse_words(text):
            words = text.split()
            return " ".join(reversed(words))

        assert add(1, 2) == 3
        assert is_even(4) == True
        assert total([1, 2, 3]) == 6
        """
    )
] * 20


@functools.lru_cache(maxsize=4)
def random_tiny_model(seed: int = 0, vocab_size: int = 300, layers: int = 2, hidden: int = 64):
    """(model, tokenizer): random-weight LlamaForCausalLM + locally trained BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=hf_tok.pad_token_id,
        eos_token_id=hf_tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Make the random model emit newlines now and then so line-by-line decoding has lines.
    with torch.no_grad():
        nl = [i for t, i in hf_tok.get_vocab().items() if "Ċ" in t]
        model.lm_head.weight[nl] *= 1.2
    return model, hf_tok
