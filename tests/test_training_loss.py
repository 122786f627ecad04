"""The memory-lean completion loss (codedistill.training.loss) against the full-logits
reference: the same value and gradients on the shipped tiny models, with LoRA, on a Gemma 3
architecture with its final logit softcapping; the LM head never sees more positions than a
chunk; a model whose logits are not its head on its decoder falls back to its own logits."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from codedistill.models.loading import load_tokenizer  # noqa: E402
from codedistill.training.loss import CompletionLoss, completion_loss  # noqa: E402
from codedistill.training.trainer import collate, encode_example  # noqa: E402

WEIGHTS = [1.0, 0.5, 0.25, 2.0]


def _pairs() -> list[tuple[str, str]]:
    return [
        (
            f"You are an expert Python programmer, and here is your task: Write a function to add {k} "
            f"to a number.{' Keep it short.' * (k % 3)} Your code should pass these tests:\n\n"
            f"assert add_{k}(1) == {1 + k}\n[BEGIN]\n",
            f"def add_{k}(x):\n" + "    y = x\n" * k + f"    return x + {k}\n[DONE]",
        )
        for k in range(4)
    ]


@pytest.fixture(scope="module")
def shipped() -> dict[str, Path]:
    from codedistill.models.tiny import ensure_tiny_models

    return {k: Path(v) for k, v in ensure_tiny_models(("tiny-source", "tiny-target"), progress=False).items()}


def _batch(tok) -> dict:
    feats = [encode_example(tok, p, c, max_length=512) for p, c in _pairs()]
    assert len({len(f["input_ids"]) for f in feats}) >= 3  # padded rows, prompts of different lengths
    b = collate(feats, tok.pad_token_id)
    b["weights"] = torch.tensor(WEIGHTS)
    return b


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, b, mode: str | None, chunk_elements: int, fused: bool | None = None, saved: list | None = None):
    """(reference loss, lean loss, the loss computer): values and every gradient agree.
    ``saved``: gets the size of every tensor the lean loss's forward keeps for backward."""
    model.zero_grad()
    ref = completion_loss(
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"], b["weights"]
    )
    ref.backward()
    g_ref = _grads(model)
    model.zero_grad()
    lean = CompletionLoss(model, chunk_elements=chunk_elements, mode=mode, fused=fused)
    sizes = saved if saved is not None else []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = lean(model, b["input_ids"], b["attention_mask"], b["labels"], b["weights"])
    loss.backward()
    g = _grads(model)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
    assert g.keys() == g_ref.keys() and g
    for n in g:
        scale = float(g_ref[n].abs().max()) + 1e-12
        assert float((g[n] - g_ref[n]).abs().max()) <= 1e-4 * scale, n
    return float(ref.detach()), float(loss.detach()), lean


@pytest.mark.parametrize("name", ["tiny-target", "tiny-source"])
def test_chunked_loss_equals_the_full_logits_loss_on_the_tiny_models(shipped, name):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(shipped[name], dtype=torch.float32)
    b = _batch(load_tokenizer(shipped[name]))
    ref, loss, lean = _compare(model, b, None, 1 << 24)
    assert lean.mode == "chunked" and lean.checked and lean.fused  # a plain linear head
    # several chunks, fused and (each recomputed in backward) not: the same numbers
    for fused in (True, False):
        _, loss_c, _ = _compare(model, b, None, 7 * model.config.vocab_size, fused=fused)
        assert loss_c == pytest.approx(ref, rel=1e-5)
    # the in-forward (FSDP/DeepSpeed) and full modes too
    _compare(model, b, "last_k", 1 << 24)
    _compare(model, b, "full", 1 << 24)
    # the weights are in it: unweighted is another number
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert abs(float(completion_loss(logits, b["labels"]).detach()) - ref) > 0.05 * ref


def test_chunked_loss_under_lora(shipped):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(shipped["tiny-target"], dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    with torch.no_grad():  # a nonzero B, so that every adapter weight has a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    b = _batch(load_tokenizer(shipped["tiny-target"]))
    _, _, lean = _compare(model, b, None, 5 * base.config.vocab_size)
    assert lean.mode == "chunked"
    assert all("lora_" in n for n, p in model.named_parameters() if p.grad is not None)


def _tiny_gemma3(softcap: float | None):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(1)
    cfg = Gemma3TextConfig(
        vocab_size=3000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=8,
        max_position_embeddings=256,
        final_logit_softcapping=softcap,
        initializer_range=1.0,  # logits of several units, where a cap of 5 bites
        pad_token_id=0,
    )
    return Gemma3ForCausalLM(cfg).float()


def _random_batch(vocab: int, lengths: list[int], prompt: list[int]) -> dict:
    g = torch.Generator().manual_seed(5)
    T = max(lengths)
    ids = torch.zeros((len(lengths), T), dtype=torch.long)
    labels = torch.full((len(lengths), T), -100, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for i, (L, P) in enumerate(zip(lengths, prompt)):
        ids[i, :L] = torch.randint(1, vocab, (L,), generator=g)
        labels[i, P:L] = ids[i, P:L]
        mask[i, :L] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": torch.tensor(WEIGHTS)}


@pytest.mark.parametrize("fused", [True, False])
def test_gemma3_softcapping_is_applied_and_no_full_logits_are_kept(fused):
    model = _tiny_gemma3(softcap=5.0)  # a small cap, so that capping changes the loss a lot
    V, H = model.config.vocab_size, model.config.hidden_size
    b = _random_batch(V, [40, 33, 25, 40], [10, 20, 5, 30])
    n_completion = int((b["labels"][:, 1:] != -100).sum())
    rows: list[int] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: rows.append(out.reshape(-1, V).shape[0]))
    saved: list[int] = []
    try:
        ref, loss, lean = _compare(model, b, None, 6 * V, fused=fused, saved=saved)
    finally:
        handle.remove()
    assert lean.mode == "chunked" and lean.softcap == 5.0 and lean.fused == fused
    # what the lean forward keeps for backward: nothing of [positions, vocabulary] (the head's
    # weight gradient, V x H, where it trains; the 4 x V logits of the last positions)
    assert max(saved) <= max(V * H, 4 * V) < n_completion * V
    if not fused:  # the head module ran on at most 6 positions at once (a chunk), also when
        # recomputed in backward; besides the reference's full sequence and the last positions
        assert rows.count(4 * 40) == 1 and max(r for r in rows if r != 4 * 40) <= 6
        assert sum(r for r in rows if r <= 6) >= 2 * n_completion
    # without the cap the loss is another number: the cap is what made them equal
    uncapped = _tiny_gemma3(softcap=None)
    uncapped.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = uncapped(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        other = completion_loss(logits, b["labels"], b["weights"])
    assert abs(float(other) - ref) > 0.1


def test_lora_on_the_head_itself_takes_the_recomputing_path(shipped):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(shipped["tiny-source"], dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    b = _batch(load_tokenizer(shipped["tiny-source"]))
    _, _, lean = _compare(model, b, None, 5 * base.config.vocab_size)
    assert lean.mode == "chunked" and not lean.fused


def test_a_model_whose_logits_are_not_its_head_falls_back_to_its_own_logits():
    from transformers import Gemma3ForCausalLM

    class Scaled(Gemma3ForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kw):
            out = super().forward(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **kw
            )
            out.logits = out.logits * 2.0
            return out

    model = Scaled(_tiny_gemma3(softcap=None).config).float()
    b = _random_batch(model.config.vocab_size, [20, 12, 16, 9], [4, 6, 3, 2])
    with pytest.warns(UserWarning, match="not its LM head"):
        _, _, lean = _compare(model, b, None, 1 << 24)
    assert lean.mode == "last_k"
