"""What BTP's fine-tuning asks of transformers' Trainer, pinned on the real Trainer with the
shipped tiny target: the data order (a seeded permutation per epoch, through the public
``train_sampling_strategy="sequential"`` and the dataset's ``set_epoch``), the optimizer
(``optim="adamw_torch"``), the learning-rate schedule (our ``create_scheduler``), the
methods we override still having the signatures we override; and the importance-sampling
weights through the Trainer: a weight-0 example contributes nothing, and the step's gradient
is the weighted sum of the examples' own gradients (computed here without the Trainer)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from codedistill.models.loading import load_tokenizer  # noqa: E402
from codedistill.training.settings import TrainExample, TrainSettings  # noqa: E402
from codedistill.training.trainer import encode_example, prepare_model, train  # noqa: E402


@pytest.fixture(scope="module")
def target() -> tuple[Path, object]:
    from codedistill.models.tiny import ensure_tiny_models

    path = Path(ensure_tiny_models(("tiny-target",), progress=False)["tiny-target"])
    return path, load_tokenizer(path)


def _example(k: int, weight: float = 1.0, body: str = "x") -> TrainExample:
    return TrainExample(
        f"Write a function to add {k} to a number.\nassert add_{k}(1) == {1 + k}\n[BEGIN]\n",
        f"def add_{k}(x):\n    return {body} + {k}\n[DONE]",
        weight=weight,
    )


LORA = TrainSettings(
    learning_rate=3e-3,
    epochs=3,
    batch_size=2,
    use_lora=True,
    lora_r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    warmup_ratio=0.0,
    max_length=256,
)


class _Record(TrainerCallback):
    """Each optimizer step's learning rate and (optionally) gradients, before the step."""

    def __init__(self, grads: bool = False):
        self.lrs: list[float] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.want_grads = grads

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kw):
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))
        if self.want_grads:
            self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def test_the_overridden_methods_and_the_public_arguments_we_rely_on_exist():
    """A transformers upgrade that renames these would silently drop our loss or schedule."""
    assert list(inspect.signature(Trainer.compute_loss).parameters) == [
        "self",
        "model",
        "inputs",
        "return_outputs",
        "num_items_in_batch",
    ]
    assert list(inspect.signature(Trainer.create_scheduler).parameters)[:3] == [
        "self",
        "num_training_steps",
        "optimizer",
    ]
    fields = TrainingArguments.__dataclass_fields__
    assert "train_sampling_strategy" in fields and fields["optim"] is not None
    assert (
        TrainingArguments(output_dir="x", train_sampling_strategy="sequential").train_sampling_strategy == "sequential"
    )


def test_data_order_optimizer_and_schedule(target):
    path, tok = target
    examples = [_example(k) for k in range(7)]
    s = dataclasses.replace(LORA, epochs=3, batch_size=2, warmup_ratio=0.25, weight_decay=0.01)
    model = prepare_model(path, s, seed=11, device="cpu")
    seen: list[list[int]] = []  # the examples (by k) of each batch, in the order the model saw them
    ids_of = {tuple(encode_example(tok, e.prompt, e.completion, 256)["input_ids"]): k for k, e in enumerate(examples)}

    def record(module, args, kwargs):
        rows = []
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]):
            rows.append(ids_of[tuple(ids[mask.bool()].tolist())])
        seen.append(rows)

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    rec = _Record()
    try:
        result = train(model, tok, examples, s, seed=11, callbacks=[rec])
    finally:
        hook.remove()
    # order: epoch e is the e-th randperm of a generator seeded with the seed, in batches of 2
    gen = torch.Generator().manual_seed(11)
    expected = []
    for _ in range(3):
        order = torch.randperm(7, generator=gen).tolist()
        expected += [order[i : i + 2] for i in range(0, 7, 2)]
    assert seen == expected and len({tuple(b) for b in seen}) > 4  # the epochs differ
    # schedule: linear warmup from (1/warm) of the peak on the first step, then linear decay
    total, warm = 12, 3
    lam = [(t + 1) / warm if t < warm else (total - t) / (total - warm) for t in range(total)]
    assert result.steps == total and rec.lrs == pytest.approx([3e-3 * x for x in lam], rel=1e-12)
    # optimizer: torch's AdamW over exactly the trainable parameters
    opt = result.trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    assert type(opt) is torch.optim.AdamW
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in in_opt} == trainable and len(in_opt) == len(trainable)
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and g["initial_lr"] == 3e-3
    assert [g["weight_decay"] for g in opt.param_groups if g["params"]] == [0.01]  # LoRA weights: all decayed


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_weight_zero_example_contributes_nothing(target):
    """{A w=1, B w=0} and {A w=1, C w=0}, B and C of the same token counts but other text:
    the same parameters to the last bit. With weight 1 the same pairs train apart (so B and C
    do carry a signal that the weight 0 removes)."""
    path, tok = target
    A, B, C = _example(3), _example(5, body="x"), _example(5, body="a")
    lens = [
        (len(f["input_ids"]), f["prompt_len"])
        for f in (encode_example(tok, e.prompt, e.completion, 256) for e in (B, C))
    ]
    assert lens[0] == lens[1] and B.completion != C.completion

    def trained(examples):
        m = prepare_model(path, LORA, seed=2, device="cpu")
        r = train(m, tok, examples, LORA, seed=2)
        return _trainable(m), r.losses

    pa, la = trained([A, dataclasses.replace(B, weight=0.0)])
    pb, lb = trained([A, dataclasses.replace(C, weight=0.0)])
    assert la == lb and len(la) == 3
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    qa, _ = trained([A, B])
    qb, _ = trained([A, C])
    assert any(not torch.equal(qa[n], qb[n]) for n in qa)


def test_the_step_gradient_is_the_weighted_sum_of_the_examples_gradients(target):
    """One full fine-tuning step on {A w=1, B w=0.25, C w=0} (no clipping): the gradient the
    Trainer hands the optimizer equals sum_i w_i * grad(sum of A_i's token NLL) / N, each
    example's gradient computed alone here with plain autograd (no padding, no Trainer)."""
    path, tok = target
    examples = [_example(2, 1.0), _example(13, 0.25, body="x * 1"), _example(7, 0.0, body="(x)")]
    s = TrainSettings(learning_rate=1e-3, epochs=1, batch_size=3, use_lora=False, warmup_ratio=0.0, max_grad_norm=0.0)
    rec = _Record(grads=True)
    train(prepare_model(path, s, seed=0, device="cpu"), tok, examples, s, seed=0, callbacks=[rec])
    assert len(rec.grads) == 1
    got = rec.grads[0]

    ref_model = prepare_model(path, s, seed=0, device="cpu")
    per_example, n_tokens = [], 0
    for e in examples:
        f = encode_example(tok, e.prompt, e.completion, s.max_length)
        ids = torch.tensor([f["input_ids"]])
        P = f["prompt_len"]
        ref_model.zero_grad()
        logp = torch.log_softmax(ref_model(input_ids=ids).logits[0].float(), -1)
        nll = -sum(logp[t - 1, f["input_ids"][t]] for t in range(P, len(f["input_ids"])))
        nll.backward()
        per_example.append({n: p.grad.detach().clone() for n, p in ref_model.named_parameters() if p.grad is not None})
        n_tokens += len(f["input_ids"]) - P
    names = sorted(got)
    assert names == sorted(per_example[0])

    def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([grads[n].flatten() for n in names])

    expected = sum(e.weight * flat(g) for e, g in zip(examples, per_example)) / n_tokens
    unweighted = sum(flat(g) for g in per_example) / n_tokens
    err = float((flat(got) - expected).norm() / expected.norm())
    assert err < 1e-4, err
    assert float((unweighted - expected).norm() / expected.norm()) > 0.1  # dropped weights would show
