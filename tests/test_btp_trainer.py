"""BTP trainer: completion-only loss masking on real token ids, a real LoRA step,
determinism, saving/loading the adapter."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from codedistill.training.settings import TrainExample, TrainSettings  # noqa: E402
from codedistill.training.trainer import (  # noqa: E402
    IGNORE_INDEX,
    collate,
    completion_loss,
    encode_example,
    prepare_model,
    save_trained,
    train,
)

CORPUS = [
    "You are an expert Python programmer, and here is your task: Write a function to add "
    f"{k} to a number. Your code should pass these tests:\n\nassert add_{k}(1) == {1 + k}\n[BEGIN]\n"
    f"def add_{k}(x):\n    return x + {k}\n[DONE]"
    for k in range(30)
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=tr)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, tok


PROMPT = CORPUS[3].split("[BEGIN]\n")[0] + "[BEGIN]\n"
COMPLETION = "def add_3(x):\n    return x + 3\n[DONE]"


def test_prompt_tokens_carry_no_label(tiny):
    _, tok = tiny
    f = encode_example(tok, PROMPT, COMPLETION, max_length=512)
    p_ids = tok(PROMPT)["input_ids"]
    c_ids = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    assert len(p_ids) > 10 and len(c_ids) > 3
    assert f["input_ids"] == p_ids + c_ids + [tok.eos_token_id]
    assert f["labels"][: len(p_ids)] == [IGNORE_INDEX] * len(p_ids)
    assert f["labels"][len(p_ids) :] == c_ids + [tok.eos_token_id]
    labelled = [t for t in f["labels"] if t != IGNORE_INDEX]
    assert tok.decode(labelled, skip_special_tokens=True) == COMPLETION


def test_truncation_keeps_prompt_masked(tiny):
    _, tok = tiny
    n_p = len(tok(PROMPT)["input_ids"])
    f = encode_example(tok, PROMPT, COMPLETION, max_length=n_p + 2)
    assert f["truncated"] and len(f["input_ids"]) == n_p + 2
    assert sum(t != IGNORE_INDEX for t in f["labels"]) == 2


def test_completion_loss_has_no_gradient_on_prompt_positions(tiny):
    path, tok = tiny
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    f = encode_example(tok, PROMPT, COMPLETION, max_length=512)
    batch = collate([f], tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"]).logits.detach().requires_grad_(True)
    loss = completion_loss(logits, batch["labels"])
    loss.backward()
    g = logits.grad[0].abs().sum(-1)  # per position
    P = f["prompt_len"]
    # logits at position t predict token t+1: positions < P-1 predict prompt tokens
    assert torch.all(g[: P - 1] == 0)
    assert torch.all(g[P - 1 : len(f["input_ids"]) - 1] > 0)
    # and the value equals the mean CE over the completion tokens (incl. EOS) only
    lp = torch.log_softmax(logits.detach()[0].float(), -1)
    ids = f["input_ids"]
    manual = -sum(lp[t - 1, ids[t]] for t in range(P, len(ids))) / (len(ids) - P)
    assert float(loss.detach()) == pytest.approx(float(manual), rel=1e-5)


def test_importance_weights_scale_the_loss(tiny):
    path, tok = tiny
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    f = encode_example(tok, PROMPT, COMPLETION, max_length=512)
    batch = collate([f, f], tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = completion_loss(logits, batch["labels"])
    half = completion_loss(logits, batch["labels"], torch.tensor([0.5, 0.5]))
    assert float(half) == pytest.approx(0.5 * float(full), rel=1e-5)


def _examples():
    return [TrainExample(c.split("[BEGIN]\n")[0] + "[BEGIN]\n", c.split("[BEGIN]\n")[1]) for c in CORPUS[:16]]


def test_lora_steps_lower_loss_touch_only_adapter_and_are_deterministic(tiny, tmp_path):
    path, tok = tiny
    s = TrainSettings(
        learning_rate=1e-2,
        epochs=4,
        batch_size=4,
        use_lora=True,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        warmup_ratio=0.0,
    )
    m1 = prepare_model(path, s, seed=3, device="cpu")
    base_before = {n: p.detach().clone() for n, p in m1.named_parameters() if "lora_" not in n}
    r1 = train(m1, tok, _examples(), s, seed=3)
    assert r1.steps == 16 and len(r1.losses) == 16
    assert sum(r1.losses[-4:]) < 0.9 * sum(r1.losses[:4])
    for n, p in m1.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in m1.named_parameters())
    # same seed -> identical curve; other seed -> different
    m2 = prepare_model(path, s, seed=3, device="cpu")
    r2 = train(m2, tok, _examples(), s, seed=3)
    assert r2.losses == r1.losses
    m3 = prepare_model(path, s, seed=4, device="cpu")
    r3 = train(m3, tok, _examples(), s, seed=4)
    assert r3.losses != r1.losses
    # saved adapter loads with PeftModel.from_pretrained and gives the same outputs
    out = save_trained(m1, tok, tmp_path / "iter_1", use_lora=True)
    assert (out / "adapter_model.safetensors").exists()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(out))
    x = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, m1(input_ids=x).logits, atol=1e-5)
    # continuing from the saved adapter keeps training it (is_trainable)
    m4 = prepare_model(path, s, seed=5, device="cpu", init_from=out)
    assert any(p.requires_grad for n, p in m4.named_parameters() if "lora_" in n)


@pytest.mark.slow
def test_gradient_checkpointing_same_curve_and_one_summary_line(tiny):
    """Gradient checkpointing recomputes activations: the same loss curve, bit for bit.
    Off a terminal the progress is one summary line (loss first -> last, tokens/s)."""
    import dataclasses

    path, tok = tiny
    s = TrainSettings(
        learning_rate=1e-2,
        epochs=1,
        batch_size=4,
        use_lora=True,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        warmup_ratio=0.0,
    )
    lines: list[str] = []
    plain = train(prepare_model(path, s, seed=3, device="cpu"), tok, _examples(), s, seed=3, log=lines.append)
    gc = dataclasses.replace(s, gradient_checkpointing=True)
    ckpt = train(prepare_model(path, gc, seed=3, device="cpu"), tok, _examples(), gc, seed=3)
    assert len(plain.losses) == 4 and ckpt.losses == plain.losses
    assert len(lines) == 1 and lines[0].startswith("fine-tuned 4 steps") and "tokens/s" in lines[0]
    assert f"{plain.losses[0]:.4f} -> {plain.losses[-1]:.4f}" in lines[0] and plain.tokens_per_second > 0
