"""Training labels and generation's kept text on the plan's four real tokenizer families.

The vocabularies are llama.cpp's vocabulary-only GGUF files (no weights) of DeepSeek-Coder
(byte-level BPE), Llama/CodeLlama (SentencePiece, ``llama-spm``), Qwen2 and StarCoder
(byte-level BPE), fetched once per machine by ``tests/vocabs.py`` (sha256-checked, never
committed) and loaded with ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` (needs the
``gguf`` package). Without them these tests skip, or fail with ``CODEDISTILL_REQUIRE_VOCABS=1``.

What must hold, for every family:
- the training labels are exactly the tokens of ``prompt + completion`` tokenized as one
  string after the prompt (what the target emits after its prompt), and the training
  context is exactly the prompt's own tokenization (what generation feeds the model);
  with SentencePiece the completion tokenized alone starts with ``▁def`` instead of ``def``;
- generation's kept text and kept-token count, decoding those very tokens after the prompt
  and cutting at the stop string, agree with the labels, and a tiny random model of the
  family's architecture scores the kept tokens exactly as the training loss does.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="pip install gguf (in the dev extra) to load GGUF vocabularies")

from codedistill.training.trainer import IGNORE_INDEX, collate, completion_loss, encode_example  # noqa: E402
from vocabs import FAMILIES, load_tokenizer  # noqa: E402

# the first run on a machine downloads the vocabularies (tests/vocabs.py) and converts them
# (about a minute); later runs load the cached tokenizer.json files
pytestmark = pytest.mark.slow

MBPP_PROMPT = (
    "You are an expert Python programmer, and here is your task: Write a function to find the "
    "shared elements from the given two lists. Your code should pass these tests:\n\n"
    "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"
    "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))\n[BEGIN]\n"
)
MBPP_PROGRAM = "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n"
HUMANEVAL_PROMPT = (
    "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
    '    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n    """\n'
)
HUMANEVAL_PROGRAM = (
    "    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n"
    "            if abs(a - b) < threshold:\n                return True\n    return False\n"
)
# (prompt, program, end marker the target is trained to emit, stop strings at generation)
CASES = {
    "mbpp": (MBPP_PROMPT, MBPP_PROGRAM, "[DONE]", ["[DONE]"]),
    "humaneval": (HUMANEVAL_PROMPT, HUMANEVAL_PROGRAM, "", ["\ndef ", "\nclass ", "\nif __name__"]),
}


# the one (family, case) where a token straddles the prompt/completion boundary
STRADDLES = ("starcoder", "humaneval")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, load_tokenizer(request.param)


def tiny_model(family: str, tok):
    """A 2-layer, hidden-32 random model of the family's architecture and vocabulary size."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Starcoder2Config,
        Starcoder2ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if family == "starcoder":
        return Starcoder2ForCausalLM(Starcoder2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()  # Llama/CodeLlama and DeepSeek-Coder


def labelled(f):
    return [t for t in f["labels"] if t != IGNORE_INDEX]


@pytest.mark.parametrize("case", sorted(CASES))
def test_labels_are_the_joint_tokenization_after_the_prompt(family, case):
    name, tok = family
    prompt, program, end, _ = CASES[case]
    completion = program + end
    f = encode_example(tok, prompt, completion, max_length=2048)
    p_ids = tok(prompt)["input_ids"]  # exactly what generation feeds the model
    joint = tok(prompt + completion)["input_ids"]
    assert f["input_ids"][: f["prompt_len"]] == p_ids
    assert f["labels"][: f["prompt_len"]] == [IGNORE_INDEX] * len(p_ids)
    if (name, case) != STRADDLES:
        # the prompt's own tokens are a prefix of the joint tokenization, so "the joint
        # tokens after the prompt" is well defined without offsets: they are the labels
        assert joint[: len(p_ids)] == p_ids and not f["straddled"]
        assert labelled(f) == joint[len(p_ids) :] + [tok.eos_token_id]
        assert f["input_ids"] == joint + [tok.eos_token_id]
    else:
        # StarCoder merges the prompt's final newline with the program's indentation
        # ("\n   "): the context stays the prompt's own tokens and the labels are that
        # token's completion part tokenized alone, then the joint tokens after it
        b = len(p_ids) - 1
        assert joint[:b] == p_ids[:b] and tok.convert_ids_to_tokens(joint[b : b + 1]) == ["ĊĠĠĠ"]
        assert f["straddled"]
        assert labelled(f) == tok("   ", add_special_tokens=False)["input_ids"] + joint[b + 1 :] + [tok.eos_token_id]
    # and the labels decode, after the prompt, to exactly the completion
    text = tok.decode(f["input_ids"][:-1], skip_special_tokens=True)
    assert text.endswith(completion) and text[: -len(completion)] == tok.decode(p_ids, skip_special_tokens=True)


def test_sentencepiece_completion_alone_differs_from_in_context():
    """The defect joint tokenization fixes: tokenized alone, the completion starts with
    a word-boundary token the model never emits after ``[BEGIN]\\n``."""
    tok = load_tokenizer("llama-spm")
    alone = tok(MBPP_PROGRAM, add_special_tokens=False)["input_ids"]
    p_ids = tok(MBPP_PROMPT)["input_ids"]
    after = tok(MBPP_PROMPT + MBPP_PROGRAM)["input_ids"][len(p_ids) :]
    assert tok.convert_ids_to_tokens(alone[:1]) == ["▁def"]
    assert tok.convert_ids_to_tokens(after[:1]) == ["def"]
    assert labelled(encode_example(tok, MBPP_PROMPT, MBPP_PROGRAM))[:-1] == after


@pytest.mark.parametrize("case", sorted(CASES))
def test_generation_keeps_the_labelled_tokens_and_text(family, case):
    """Generation emitting exactly the training labels (program, end marker, then more)
    keeps the program's text and a prefix of the labels, and a tiny random model of the
    family scores those kept tokens exactly as the training loss does."""
    from codedistill.generation.hf import HFGenerator

    name, tok = family
    prompt, program, end, stops = CASES[case]
    trailing = end + "\ndef unrelated():\n    pass\n"
    f = encode_example(tok, prompt, program + trailing, max_length=2048, add_eos=False)
    p_ids = f["input_ids"][: f["prompt_len"]]
    emitted = labelled(f)
    model = tiny_model(name, tok)
    gen = HFGenerator(model, tok, name=name)
    cand = gen._finish(list(emitted), stops, [0.0] * len(emitted), 0, hit_max=False, context_ids=p_ids)
    assert cand.text == program
    kept = cand.meta["token_ids"]
    assert cand.num_tokens == len(kept) and kept == emitted[: len(kept)]
    # as many tokens as the program's own joint tokenization; all but the last are the
    # same, the last may also begin the stop string (a merge such as "\n[" or "\n\n")
    prog = labelled(encode_example(tok, prompt, program, max_length=2048, add_eos=False))
    assert len(kept) == len(prog) and kept[:-1] == prog[:-1]
    # teacher-forced score of the kept tokens == -(training loss x tokens) on them
    score = gen.score_tokens([p_ids], [kept])[0]
    fk = {"input_ids": p_ids + kept, "labels": [IGNORE_INDEX] * len(p_ids) + kept}
    batch = collate([fk], tok.pad_token_id)
    with torch.no_grad():
        loss = completion_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert score == pytest.approx(-float(loss) * len(kept), rel=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_served_token_ids_keep_the_labelled_text(family, case):
    """vLLM's completions with ``return_tokens_as_token_ids``: the response's ``token_id:N``
    list (here the training labels, then more) is decoded after the prompt, exactly as the
    HF backend does; decoded alone, SentencePiece's first ``▁▁▁`` loses a space of indentation."""
    from codedistill.generation.openai_api import OpenAIGenerator, OpenAISettings, ServerFeatures

    name, tok = family
    prompt, program, end, stops = CASES[case]
    f = encode_example(tok, prompt, program + end + "\ndef unrelated():\n    pass\n", max_length=2048, add_eos=False)
    emitted = labelled(f)
    gen = OpenAIGenerator(
        "m",
        "http://127.0.0.1:9/v1",
        OpenAISettings(backend="vllm", server=ServerFeatures(token_ids=True)),
        tokenizer=tok,
    )
    choice = {
        "index": 0,
        "text": "(unused: the ids are decoded)",
        "finish_reason": "stop",
        "logprobs": {"tokens": [f"token_id:{t}" for t in emitted], "token_logprobs": [-0.5] * len(emitted)},
    }
    body = gen._body(prompt, 1, 0.0, 1.0, 256, stops, None)[1]
    cand = gen._candidate("completions", choice, stops, 0, gen._context_ids("completions", body))
    assert cand.text == program
    kept = cand.meta["token_ids"]
    prog = labelled(encode_example(tok, prompt, program, max_length=2048, add_eos=False))
    assert kept == emitted[: len(kept)] and len(kept) == len(prog) and kept[:-1] == prog[:-1]
    assert cand.logprob == pytest.approx(-0.5 * len(kept))
    if name == "llama-spm" and case == "humaneval":  # the defect this guards against
        assert tok.decode(emitted, skip_special_tokens=True).startswith("   for")


def test_egcfg_lines_decode_after_the_prompt_on_sentencepiece():
    """EG-CFG's line decoder on a Llama-vocabulary model that always emits ``▁▁▁▁`` (four
    spaces): every line and the completion are the text those ids add after the prompt (4
    spaces a token), not the ids decoded alone (the first token's space dropped)."""
    from codedistill.data.problem import Problem
    from codedistill.egcfg.agents import EGCFGSolver
    from codedistill.egcfg.config import AgentSpec, EGCFGConfig

    tok = load_tokenizer("llama-spm")
    model = tiny_model("llama-spm", tok)
    four = tok.convert_tokens_to_ids("▁▁▁▁")
    head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[four] = 10.0
    model.lm_head = head
    prefix = "def total(xs):\n"
    problem = Problem(
        task_id="toy/add",
        prompt=prefix,
        entry_point="total",
        code_prefix=prefix,
        tests=("assert total([1, 2]) == 3",),
        visible_tests=("assert total([1, 2]) == 3",),
    )
    solver = EGCFGSolver(
        model,
        tok,
        EGCFGConfig(max_lines=3, max_line_tokens=5, max_new_tokens=15, candidate_max_tokens=6, exec_workers=1),
    )
    try:
        for gamma in (0.0, 1.0):  # plain lines, and lines guided by real traces (of blank candidates)
            res = solver.decoder.decode_agent(
                problem, prefix, [], AgentSpec(temperature=0.7, depth=1, num_candidates=2, gamma=gamma), seed=0
            )
            assert res.token_ids == [four] * 15
            assert res.completion == " " * 60 == res.raw_text
            assert [line["text"] for line in res.lines] == [" " * 20] * 3
            assert tok.decode(res.token_ids, skip_special_tokens=True) == " " * 59  # decoded alone
    finally:
        solver.close()
