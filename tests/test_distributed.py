"""The training phase under ``accelerate launch``: a real 2-process data-parallel run on
CPU (gloo) of the embedded tiny target, against the single-process run with the same
global batch and against an independent reference (a plain PyTorch loop written here:
the same order, importance-weighted loss, AdamW, schedule and clipping, no Trainer);
QLoRA's clear error on CPU; the launch command and configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from codedistill.errors import ConfigError  # noqa: E402
from codedistill.models.loading import load_tokenizer  # noqa: E402
from codedistill.training.launch import (  # noqa: E402
    CONFIG_DIR,
    NAMED_CONFIGS,
    launch_command,
    run_launched,
    write_job,
)
from codedistill.training.settings import TrainExample, TrainSettings  # noqa: E402
from codedistill.training.trainer import collate, encode_example, prepare_model, train  # noqa: E402

# The same global batch (8) and order on 1 and 2 processes: each optimizer step's loss is
# the token mean over the global batch either way; only the float summation order differs
# (two half-batch gradients all-reduced vs one), measured below 1e-5 relative on the
# development machine; the test allows 1e-3.
LOSS_RTOL = 1e-3


def _examples(n: int = 32) -> list[TrainExample]:
    return [
        TrainExample(
            "You are an expert Python programmer, and here is your task: Write a function to add "
            f"{k} to a number. Your code should pass these tests:\n\nassert add_{k}(1) == {1 + k}\n[BEGIN]\n",
            f"def add_{k}(x):\n    return x + {k}\n[DONE]",
            weight=1.0 if k % 3 else 0.5,  # importance weights on the loss, across processes too
        )
        for k in range(n)
    ]


SETTINGS = TrainSettings(
    learning_rate=3e-3,
    epochs=2,
    batch_size=8,
    use_lora=True,
    lora_r=8,
    lora_alpha=16,
    lora_dropout=0.0,
    warmup_ratio=0.1,
    max_length=256,
)


def reference_training(model, tok, examples, settings: TrainSettings, seed: int) -> list[float]:
    """What the training phase must do, written without transformers' Trainer: epoch e's
    order is the e-th randperm of a generator seeded with ``seed``; each step's loss is
    sum_i w_i * (token NLL of example i's completion) / the step's completion tokens, from
    the full logits; torch's AdamW with linear warmup and decay; gradients clipped."""
    import math

    feats = [encode_example(tok, e.prompt, e.completion, settings.max_length) for e in examples]
    weights = torch.tensor([e.weight for e in examples])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    total = math.ceil(len(feats) / settings.batch_size) * settings.epochs
    warm = int(settings.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else max(0.0, (total - t) / max(1, total - warm))
    )
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(feats), generator=gen).tolist()
        for i in range(0, len(order), settings.batch_size):
            rows = order[i : i + settings.batch_size]
            b = collate([feats[r] for r in rows], tok.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            target = b["labels"][:, 1:]
            labelled = target != -100
            nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            loss = (nll * labelled * weights[rows].unsqueeze(1)).sum() / labelled.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    model.eval()
    return losses


@pytest.fixture(scope="module")
def tiny_target() -> Path:
    from codedistill.models.tiny import ensure_tiny_models

    return Path(ensure_tiny_models(("tiny-target",), progress=False)["tiny-target"])


@pytest.mark.slow
def test_two_process_data_parallel_matches_single_process(tiny_target, tmp_path):
    tok = load_tokenizer(tiny_target)
    model = prepare_model(tiny_target, SETTINGS, seed=7, device="cpu")
    single = train(model, tok, _examples(), SETTINGS, seed=7).losses
    assert len(single) == 8  # 32 examples / batch 8 x 2 epochs

    job = write_job(
        tmp_path / "job",
        base=tiny_target,
        settings=SETTINGS,
        examples=_examples(),
        seed=7,
        device="cpu",
        dtype="auto",
        init_from=None,
        out_dir=tmp_path / "iter_1",
    )
    res = run_launched(job, num_processes=2)
    assert res["num_processes"] == 2 and res["distributed_type"] == "MULTI_CPU"
    assert res["steps"] == len(single)
    assert res["losses"] == pytest.approx(single, rel=LOSS_RTOL)
    assert res["losses"][-1] < res["losses"][0]
    # both equal the reference loop, which weights each example's loss by its weight (1/3 of
    # the examples at 0.5): a run that dropped the weights would have other losses and weights
    reference = prepare_model(tiny_target, SETTINGS, seed=7, device="cpu")
    expected = reference_training(reference, tok, _examples(), SETTINGS, seed=7)
    unweighted = reference_training(
        prepare_model(tiny_target, SETTINGS, seed=7, device="cpu"),
        tok,
        [TrainExample(e.prompt, e.completion) for e in _examples()],
        SETTINGS,
        seed=7,
    )
    assert res["losses"] == pytest.approx(expected, rel=LOSS_RTOL)
    assert single == pytest.approx(expected, rel=LOSS_RTOL)
    assert abs(unweighted[0] - expected[0]) > 20 * LOSS_RTOL * expected[0]
    # exactly one adapter, written once (by the main process)
    assert sorted(p.name for p in (tmp_path / "iter_1").iterdir()) == ["adapter"]
    files = sorted(p.name for p in (tmp_path / "iter_1" / "adapter").iterdir())
    assert files.count("adapter_model.safetensors") == 1 and "adapter_config.json" in files
    # and it is the trained adapter: it reproduces the single-process model's outputs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_target), str(tmp_path / "iter_1" / "adapter")
    )
    x = torch.tensor([tok(_examples()[0].prompt)["input_ids"]])
    with torch.no_grad():
        out = loaded(input_ids=x).logits
        assert torch.allclose(out, model(input_ids=x).logits, atol=1e-3)
        assert torch.allclose(out, reference(input_ids=x).logits, atol=1e-3)


def test_qlora_on_cpu_is_a_clear_error(tiny_target):
    s = TrainSettings(use_lora=True, load_in_4bit=True)
    with pytest.raises(ConfigError, match="CUDA GPU.*drop --load-in-4bit"):
        prepare_model(tiny_target, s, seed=0, device="cpu")
    with pytest.raises(ConfigError, match="--use-lora"):
        prepare_model(tiny_target, TrainSettings(use_lora=False, load_in_4bit=True), seed=0, device="cuda")


def test_launch_command_and_configs(tmp_path):
    for name in NAMED_CONFIGS:
        assert (CONFIG_DIR / f"{name}.yaml").is_file()
    cmd = launch_command(tmp_path / "job.json", 2)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[-3:] == ["-m", "codedistill.training.launch", str(tmp_path / "job.json")]
    cmd = launch_command(tmp_path / "job.json", 4, "fsdp", device="cuda")
    assert cmd[cmd.index("--config_file") + 1] == str(CONFIG_DIR / "fsdp.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    with pytest.raises(ConfigError, match="ddp, fsdp, zero2, zero3"):
        launch_command(tmp_path / "job.json", 2, "zero4")
    # accelerate shards (FSDP, DeepSpeed) only over accelerators: on CPU a clear error, not silent DDP
    for name in ("fsdp", "zero2", "zero3"):
        with pytest.raises(ConfigError, match="needs GPUs.*ddp"):
            launch_command(tmp_path / "job.json", 2, name, device="cpu")
    assert "--config_file" in launch_command(tmp_path / "job.json", 2, "ddp", device="cpu")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ConfigError, match=r"pip install 'codedistill\[deepspeed\]'"):
            launch_command(tmp_path / "job.json", 2, "zero3", device="cuda")


def test_report_to_needs_its_package(tiny_target):
    import importlib.util

    tok = load_tokenizer(tiny_target)
    with pytest.raises(ConfigError, match="unknown --report-to"):
        train(None, tok, _examples(2), TrainSettings(report_to=["neptune"]), seed=0)
    for name in ("tensorboard", "wandb", "mlflow"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(ConfigError, match=f"pip install {name}"):
                train(None, tok, _examples(2), TrainSettings(report_to=[name]), seed=0)
    json.dumps(TrainSettings().__dict__)  # settings travel to launched processes as JSON


@pytest.mark.slow
def test_btp_num_processes_launches_its_training_phase(tmp_path):
    """`codedistill btp --num-processes 2`: generation in this process, each fine-tuning
    phase under accelerate launch; the second iteration continues the first's adapter."""
    from typer.testing import CliRunner

    from codedistill.btp._testing import build_throwaway_pair
    from codedistill.btp.cli import btp_app

    src, tgt = build_throwaway_pair(tmp_path / "models")
    out = tmp_path / "run"
    res = CliRunner().invoke(
        btp_app,
        [
            "--source-model",
            str(src),
            "--target-model",
            str(tgt),
            "--dataset",
            "synth",
            "--max-problems",
            "4",
            "--eval-max-problems",
            "2",
            "--num-beams",
            "2",
            "--n-iterations",
            "2",
            "--use-lora",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--eval-num-samples",
            "1",
            "--max-new-tokens",
            "16",
            "--train-batch-size",
            "4",
            "--no-eval-source",
            "--workers",
            "1",
            "--merge",
            "--num-processes",
            "2",
            "--output-dir",
            str(out),
        ],
    )
    assert res.exit_code == 0, (res.output[-3000:], repr(res.exception))
    for k in (1, 2):
        info = json.loads((out / f"iter_{k}" / "train.json").read_text())
        assert info["num_processes"] == 2 and info["distributed_type"] == "MULTI_CPU"
        assert (out / f"iter_{k}" / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / f"iter_{k}" / "merged" / "model.safetensors").is_file()
        assert len((out / f"iter_{k}" / "train_log.jsonl").read_text().splitlines()) == info["steps"] > 0
    assert json.loads((out / "iter_2" / "train.json").read_text())["init_from"].endswith("iter_1/adapter")
