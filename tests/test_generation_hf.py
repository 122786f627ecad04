"""HF backend: reported log-probs equal a teacher-forced recomputation of the same tokens."""

import torch

from codedistill.generation.hf import HFGenerator
from codedistill.generation.postprocess import cut_at_stop, extract_code

PROMPTS = ["def add(a, b):\n", "You are an expert Python programmer, and here is your task:", "[BEGIN]\n"]


def recompute(model, tok, prompt: str, ids: list[int]) -> float:
    """One unbatched, unpadded forward pass over prompt + completion."""
    p = tok(prompt, return_tensors="pt")["input_ids"][0].tolist()
    x = torch.tensor([p + ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x).logits.float()[0, :-1], -1)
    return float(sum(lp[len(p) - 1 + i, t] for i, t in enumerate(ids)))


def test_sampled_logprobs_equal_teacher_forcing(random_lm):
    model, tok, _ = random_lm
    gen = HFGenerator(model, tok, batch_size=6)
    out = gen.sample(PROMPTS, n=3, temperature=1.3, top_p=0.9, max_new_tokens=24, stop=["\n\n"], seed=1)
    assert [len(c) for c in out] == [3, 3, 3]
    n_checked = 0
    for pi, cands in enumerate(out):
        for c in cands:
            assert c.num_tokens == len(c.meta["token_ids"])
            if c.num_tokens == 0:
                continue
            assert abs(c.logprob - recompute(model, tok, PROMPTS[pi], c.meta["token_ids"])) < 1e-4
            assert 0.0 < c.seq_prob <= 1.0
            n_checked += 1
    assert n_checked >= 6


def test_beam_logprobs_exclude_length_penalty(random_lm):
    model, tok, _ = random_lm
    gen = HFGenerator(model, tok, batch_size=8)
    for lp_pen in (0.0, 2.0):
        out = gen.beam_search(PROMPTS[:2], num_beams=4, max_new_tokens=16, length_penalty=lp_pen)
        for pi, cands in enumerate(out):
            assert len(cands) == 4
            for c in cands:
                want = recompute(model, tok, PROMPTS[pi], c.meta["token_ids"])
                assert abs(c.logprob - want) < 1e-4


def test_stop_string_cuts_text_and_tokens(random_lm):
    model, tok, _ = random_lm
    gen = HFGenerator(model, tok, batch_size=4)
    out = gen.sample(["def add(a, b):\n"], n=4, temperature=1.5, max_new_tokens=40, stop=["a"], seed=3)
    for c in out[0]:
        assert "a" not in c.text
        decoded = tok.decode(c.meta["token_ids"], skip_special_tokens=True)
        assert decoded.startswith(c.text)
        # one token fewer would no longer cover the kept text
        if c.num_tokens:
            assert len(tok.decode(c.meta["token_ids"][:-1], skip_special_tokens=True)) < len(c.text) or not c.text


def test_same_seed_same_samples(random_lm):
    model, tok, _ = random_lm
    gen = HFGenerator(model, tok, batch_size=4)
    a = gen.sample(PROMPTS[:2], n=2, temperature=1.0, max_new_tokens=12, seed=7)
    b = gen.sample(PROMPTS[:2], n=2, temperature=1.0, max_new_tokens=12, seed=7)
    assert [[c.text for c in x] for x in a] == [[c.text for c in x] for x in b]


def test_postprocess():
    assert cut_at_stop("x = 1\n[DONE]\nmore", ["[DONE]", "\nmore"]) == ("x = 1\n", True)
    assert cut_at_stop("abc", ["z"]) == ("abc", False)
    ans = "Here:\n```python\ndef f(x):\n    return x\n```\nand\n```python\ndef g():\n    pass\n```"
    assert extract_code(ans, "g") == "def g():\n    pass\n"
    assert extract_code(ans) == "def f(x):\n    return x\n"
    assert extract_code("Sure. def f(x): return 1\nThat is it.") == "Sure. def f(x): return 1\nThat is it."
    assert extract_code("Sure.\ndef f(x):\n    return 1\nThat is all.") == "def f(x):\n    return 1\n"


def test_chat_answers_become_programs():
    from codedistill.data import load_problems
    from codedistill.prompts import PromptStyle, to_program

    he = load_problems("humaneval", max_problems=1)[0]
    chat = PromptStyle("chat")
    answer = "Here you go:\n```python\ndef has_close_elements(numbers, threshold):\n    return False\n```\nDone."
    completion, program = to_program(he, chat, answer)
    assert program.startswith("from typing import List\n") and "return False" in program
    body_only = "```python\n    return False\n```"
    _, program = to_program(he, chat, body_only)
    assert program == he.prompt + "    return False\n"
    mb = load_problems("mbpp", "test", max_problems=1)[0]
    completion, program = to_program(mb, PromptStyle("base"), "def remove_Occ(s, c):\n    return s\n[DONE]\njunk")
    assert program == "def remove_Occ(s, c):\n    return s\n"
