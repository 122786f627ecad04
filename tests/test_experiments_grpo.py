"""The GRPO baseline: TRL's GRPOTrainer on the training problems, reward = the sandbox
pass rate, as many sampled programs as BTP's beam phase; evaluated like a BTP variant."""

from __future__ import annotations

import json

import pytest

from codedistill.btp.config import build_config
from codedistill.runs import read_jsonl


@pytest.mark.slow
def test_grpo_samples_as_many_programs_as_the_beam_phase_and_is_evaluated(tmp_path, capsys):
    from codedistill.btp._testing import build_throwaway_pair
    from codedistill.experiments.grpo import run_grpo

    src, tgt = build_throwaway_pair(tmp_path / "models")
    cfg = build_config(
        {},
        dict(
            source_model=str(src),
            target_model=str(tgt),
            dataset="synth",
            max_problems=4,
            eval_max_problems=2,
            num_beams=2,
            eval_num_samples=2,
            max_new_tokens=12,
            use_lora=True,
            lora_r=4,
            lora_alpha=8,
            learning_rate=1e-3,
            chunk_size=2,
            workers=2,
            eval_source=False,
            output_dir=str(tmp_path / "grpo"),
            generation_cache=str(tmp_path / "cache"),
        ),
    )
    lines: list[str] = []
    comp = run_grpo(cfg, log=lines.append)
    out = tmp_path / "grpo"
    # TRL's per-step metrics go to a file, one summary line to the log, nothing to the console
    steps = read_jsonl(out / "iter_1" / "grpo_log.jsonl")
    assert [s["step"] for s in steps if "reward" in s] == [1]  # 4 problems x 2 programs = one step of 8
    assert any(line.startswith("[grpo] 1 step, 8 programs sampled and tested (0 passed)") for line in lines), lines
    printed = capsys.readouterr()
    assert "'loss'" not in printed.out + printed.err and "gradient_checkpointing" not in printed.err
    samples = read_jsonl(out / "iter_1" / "grpo_samples.jsonl")
    assert len(samples) == 4 * 2  # problems x beams, each run in the sandbox
    assert {s["task_id"] for s in samples} == {f"synth/train/{i}" for i in range(4)} or len(
        {s["task_id"] for s in samples}
    ) == 4
    assert all(0.0 <= s["pass_rate"] <= 1.0 for s in samples)
    st = json.loads((out / "iter_1" / "stats.json").read_text())
    assert st["budget"] == {"num_generations": 2, "problems": 4, "programs": 8}
    assert st["training"]["steps"] >= 1
    assert (out / "iter_1" / "adapter" / "adapter_config.json").exists()
    e = comp["datasets"]["synth"]
    assert set(e["target_per_iteration"]) == {"target_iter0", "target_iter1"} and comp["method"] == "grpo"
    assert read_jsonl(out / "generated.jsonl")[-1]["generated"]["target_grpo"] == 8
    # a second invocation: nothing generated, nothing retrained
    mtime = (out / "iter_1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    run_grpo(cfg, log=lambda m: None)
    assert read_jsonl(out / "generated.jsonl")[-1]["total"] == 0
    assert (out / "iter_1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_grpo_budget_equals_the_programs_btp_generates():
    from codedistill.experiments.grpo import grpo_budget

    assert grpo_budget(build_config({}, {"num_beams": 5}), 600) == {
        "num_generations": 5,
        "problems": 600,
        "programs": 3000,
    }
    # sampled programs are drawn afresh each iteration: GRPO makes as many passes
    s = grpo_budget(build_config({}, {"generation": "sample", "num_samples": 4, "n_iterations": 3}), 10)
    assert s == {"num_generations": 4, "problems": 10, "programs": 120, "rounds": 3}
    assert (
        grpo_budget(
            build_config(
                {}, {"generation": "sample", "num_samples": 4, "n_iterations": 3, "iteration_problems": "slices"}
            ),
            10,
        )["programs"]
        == 40
    )
