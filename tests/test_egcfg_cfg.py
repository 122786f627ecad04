"""CFG decoding with two KV-cached streams vs model.generate and vs full recomputation."""

from __future__ import annotations

import math

import pytest
import torch

from codedistill.egcfg._tiny import random_tiny_model
from codedistill.egcfg.cfg import cfg_generate, reference_guided_logprobs

UNCOND = "def total(xs):\n"
COND = "# x = [1, 2]\n# s = 3\n# returned 3\ndef total(xs):\n"


@pytest.fixture(scope="module")
def tiny():
    return random_tiny_model()


def _hf_greedy(model, ids, n):
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def test_gamma0_equals_plain_greedy(tiny):
    model, tok = tiny
    u, c = tok.encode(UNCOND), tok.encode(COND)
    ref = _hf_greedy(model, u, 40)
    assert cfg_generate(model, u, None, strategy="greedy", max_new_tokens=40).tokens[0] == ref
    # gamma = 0 with a signal present is still the plain model
    assert cfg_generate(model, u, c, gamma=0.0, max_new_tokens=40).tokens[0] == ref


def test_gamma1_equals_greedy_on_conditional_prompt(tiny):
    model, tok = tiny
    u, c = tok.encode(UNCOND), tok.encode(COND)
    ref = _hf_greedy(model, c, 40)
    res = cfg_generate(model, u, c, gamma=1.0, strategy="greedy", max_new_tokens=40)
    assert res.tokens[0] == ref
    # and the plain-model logprob it reports is that of the unconditional prompt
    plain = _hf_greedy(model, u, 40)
    assert ref != plain  # the signal changes the greedy output on this model: the test can fail


def _max_err(model, res, u, c, gamma):
    err, checked = 0.0, 0
    for step in res.steps:
        for row, prefix in enumerate(step["prefixes"]):
            got = step["logprobs"][row]
            if not torch.isfinite(got).all():
                continue
            ref = reference_guided_logprobs(model, c + prefix, u + prefix, gamma)
            err = max(err, (ref - got).abs().max().item())
            checked += 1
    return err, checked


@pytest.mark.parametrize("gamma", [0.5, 3.0])
def test_cfg_logits_equal_full_recomputation_greedy(tiny, gamma):
    model, tok = tiny
    u, c = tok.encode(UNCOND), tok.encode(COND)
    res = cfg_generate(model, u, c, gamma=gamma, strategy="greedy", max_new_tokens=12, record_steps=True)
    err, checked = _max_err(model, res, u, c, gamma)
    assert checked == 12
    assert err < 1e-4
    # the guided greedy path is the argmax of the recomputed guided distribution at every step
    seq = res.tokens[0]
    for i in range(len(seq)):
        assert int(reference_guided_logprobs(model, c + seq[:i], u + seq[:i], gamma).argmax()) == seq[i]


@pytest.mark.parametrize("gamma", [0.5, 3.0])
def test_cfg_logits_equal_full_recomputation_beam(tiny, gamma):
    model, tok = tiny
    u, c = tok.encode(UNCOND), tok.encode(COND)
    res = cfg_generate(model, u, c, gamma=gamma, strategy="beam", num_sequences=3, max_new_tokens=10, record_steps=True)
    err, checked = _max_err(model, res, u, c, gamma)
    assert checked >= 3 * 9
    assert err < 1e-4
    # the beams were actually reordered at some step (row i's prefix not an extension of row i's)
    reordered = any(
        nxt["prefixes"][i][:-1] != cur["prefixes"][i]
        for cur, nxt in zip(res.steps[1:], res.steps[2:])
        for i in range(3)
    )
    assert reordered
    # returned beam scores are the recomputed guided log-probs of the returned sequences
    for seq, glp in zip(res.tokens, res.guided_logprob):
        ref = sum(
            float(reference_guided_logprobs(model, c + seq[:i], u + seq[:i], gamma)[seq[i]]) for i in range(len(seq))
        )
        assert abs(ref - glp) < 1e-3
    assert res.scores == sorted(res.scores, reverse=True)
    # per-token plain log-probs follow the beams through reordering too
    for seq, toks in zip(res.tokens, res.token_plain_logprobs):
        ref = [float(reference_guided_logprobs(model, None, u + seq[:i], 0.0)[seq[i]]) for i in range(len(seq))]
        assert max(abs(a - b) for a, b in zip(ref, toks)) < 1e-4


def test_cfg_sampling_logits_and_plain_logprob(tiny):
    model, tok = tiny
    u, c = tok.encode(UNCOND), tok.encode(COND)
    g = torch.Generator().manual_seed(3)
    res = cfg_generate(
        model,
        u,
        c,
        gamma=3.0,
        strategy="sample",
        num_sequences=3,
        temperature=0.9,
        max_new_tokens=8,
        record_steps=True,
        generator=g,
    )
    err, checked = _max_err(model, res, u, c, 3.0)
    assert checked == 3 * 8 and err < 1e-4
    assert len({tuple(t) for t in res.tokens}) > 1
    # plain_logprob is the unconditional model's log-prob of the sampled tokens
    for seq, plp in zip(res.tokens, res.plain_logprob):
        ref = sum(float(reference_guided_logprobs(model, None, u + seq[:i], 0.0)[seq[i]]) for i in range(len(seq)))
        assert abs(ref - plp) < 1e-3
    # same seed, same samples
    again = cfg_generate(
        model,
        u,
        c,
        gamma=3.0,
        strategy="sample",
        num_sequences=3,
        temperature=0.9,
        max_new_tokens=8,
        generator=torch.Generator().manual_seed(3),
    )
    assert again.tokens == res.tokens


def test_stop_fn_ends_rows_and_drops_them(tiny):
    model, tok = tiny
    u, c = tok.encode(UNCOND), tok.encode(COND)
    stop = lambda ids: len(ids) >= 3  # noqa: E731
    res = cfg_generate(
        model,
        u,
        c,
        gamma=1.0,
        strategy="sample",
        num_sequences=2,
        temperature=1.0,
        max_new_tokens=20,
        stop_fn=stop,
        generator=torch.Generator().manual_seed(0),
    )
    assert [len(t) for t in res.tokens] == [3, 3]
    assert res.finished == [True, True]
    assert res.forward_passes == 3  # prefill + 2 steps, cond and uncond batched together


def test_topk_cfg_equals_exact_cfg_on_the_full_vocabulary_and_approximates_it_on_top_k():
    from codedistill.egcfg.cfg import guided_logprobs
    from codedistill.egcfg.topk import _topk, agreement_on_steps, guided_token, topk_cfg

    g = torch.Generator().manual_seed(0)
    steps = [(torch.randn(50, generator=g) * 3, torch.randn(50, generator=g) * 3) for _ in range(40)]
    for lc, lu in steps[:5]:
        for gamma in (0.0, 0.5, 1.0, 3.0):
            exact = guided_logprobs(lc, lu, gamma)[0]
            full = topk_cfg(_topk(lc.log_softmax(-1), 50), _topk(lu.log_softmax(-1), 50), gamma)
            assert max(abs(full[t] - float(exact[t])) for t in range(50)) < 1e-4  # k = V: exact
    res = agreement_on_steps(steps, gammas=(0.5, 3.0), ks=(1, 50))
    assert res["gamma=0.5,k=50"]["agree"] == res["gamma=3.0,k=50"]["agree"] == 1.0
    assert res["gamma=3.0,k=1"]["agree"] < 1.0  # top-1 each side cannot follow CFG everywhere
    # the union: a token only the conditional side ranks (signal says so) can win with gamma > 1
    cond, uncond = {1: math.log(0.9), 2: math.log(0.1)}, {3: math.log(0.6), 2: math.log(0.4)}
    assert guided_token(cond, uncond, 0.0) == 3 and guided_token(cond, uncond, 1.0) == 1
    assert guided_token(cond, uncond, 3.0, missing="kth") == 1
    assert guided_token(cond, uncond, 3.0, missing="zero") == 2  # upstream's zero fill keeps the intersection
    lp = topk_cfg(cond, uncond, 3.0)
    assert set(lp) == {1, 2, 3} and abs(sum(math.exp(v) for v in lp.values()) - 1) < 1e-9


# --------------------------------------------------------------------------- prefix caches
def _tiny_sliding(tok):
    """A random Gemma 3 text model whose sliding window (6) is shorter than the prompts."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gemma3-sliding"])
@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_prefix_cached_streams_equal_full_recomputation(tiny, arch, strategy):
    """Prompts prefilled from cached prefixes, cond and uncond in streams of their own: every
    step's guided log-probs are those of a full forward pass without a cache (a sliding window
    shorter than the prompt included), and the tokens are those of the padded batch."""
    from codedistill.egcfg.cfg import PrefixCache

    model, tok = tiny
    if arch != "llama":
        model = _tiny_sliding(tok)
    u, c = tok.encode(UNCOND), tok.encode(COND)
    kw: dict = dict(gamma=3.0, strategy=strategy, num_sequences=1 if strategy == "greedy" else 3, max_new_tokens=8)
    if strategy == "sample":
        kw["temperature"] = 0.9
    prefixes = PrefixCache(model)
    res = cfg_generate(
        model, u, c, record_steps=True, prefixes=prefixes, generator=torch.Generator().manual_seed(3), **kw
    )
    err, checked = _max_err(model, res, u, c, 3.0)
    assert checked >= 8 and err < 1e-4
    plain = cfg_generate(model, u, c, generator=torch.Generator().manual_seed(3), **kw)
    assert res.tokens == plain.tokens
    assert max(abs(a - b) for a, b in zip(res.guided_logprob, plain.guided_logprob)) < 1e-3


def test_prefix_cache_prefills_only_what_is_new(tiny):
    """EG-CFG's next line: the uncond prompt is the last call's context plus its tokens, the
    cond prompt shares the text before the signal; only the new positions go through the model."""
    from codedistill.egcfg.cfg import PrefixCache

    model, tok = tiny
    shared = tok.encode("# examples\n" + "def add(a, b):\n    return a + b\n" * 6)
    u = shared + tok.encode("def total(xs):\n")
    c = shared + tok.encode("# x = [1, 2]\n# s = 3\n") + tok.encode("def total(xs):\n")
    prefixes = PrefixCache(model)
    first = cfg_generate(model, u, c, gamma=1.0, max_new_tokens=6, prefixes=prefixes)
    # the shared prefix once, then each prompt's own tail: fewer positions than both prompts
    assert first.rows_tokens - 2 * (len(first.tokens[0]) - 1) == len(shared) + (len(u) - len(shared)) + (
        len(c) - len(shared)
    )
    u2, c2 = u + first.tokens[0], c + first.tokens[0]
    second = cfg_generate(model, u2, c2, gamma=1.0, max_new_tokens=6, prefixes=prefixes)
    prompt_positions = second.rows_tokens - 2 * (len(second.tokens[0]) - 1)
    assert prompt_positions == 1 + (len(c2) - len(shared))  # uncond: its last token only
    assert prefixes.reused_tokens >= len(shared) + len(u2) - 1
    ref = cfg_generate(model, u2, c2, gamma=1.0, max_new_tokens=6)
    assert second.tokens == ref.tokens
