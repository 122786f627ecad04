"""The step-2 command: YAML config with flag overrides, early clear errors, and the seed
command itself on CPU with tiny-source -> tiny-target (MBPP and synth)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from codedistill.btp.config import BTPConfig, build_config, load_config_file
from codedistill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "step2_btp_finetune_experiment.py"
SEED_CMD = [
    "--source-model",
    "StarCoder2-15B",
    "--target-model",
    "StarCoder2-3B",
    "--mode",
    "finetune",
    "--dataset",
    "mbpp",
    "--max-problems",
    "100",
    "--num-beams",
    "5",
    "--n-iterations",
    "3",
    "--sampling-method",
    "power",
    "--sampling-alpha",
    "1.5",
    "--use-lora",
    "--output-dir",
    "./results/starcoder_experiment",
]


def _run(args, timeout=900):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_yaml_then_flags_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(
        "source_model: tiny-source\ntarget_model: tiny-target\nsampling-alpha: 2.5\n"
        "num_beams: 7\nuse_lora: true\neval_datasets: [humaneval]\n"
    )
    cfg = build_config(load_config_file(y), {"num_beams": 3, "sampling_alpha": None, "use_lora": False})
    assert cfg.num_beams == 3 and cfg.sampling_alpha == 2.5 and cfg.use_lora is False
    assert cfg.eval_datasets == ["humaneval"] and cfg.source_model == "tiny-source"
    assert cfg.p2_alpha == 0.2 and cfg.sampling_method == "power"  # defaults


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("btp_*.yaml")))
def test_shipped_configs_validate(name):
    cfg = build_config(load_config_file(ROOT / "configs" / name), {})
    assert isinstance(cfg, BTPConfig) and cfg.n_iterations >= 1


def test_plan_pairings_are_shipped():
    pairs = {
        (c.source_model, c.target_model)
        for c in (build_config(load_config_file(p), {}) for p in (ROOT / "configs").glob("btp_*.yaml"))
    }
    assert {
        ("StarCoder2-15B", "StarCoder2-3B"),
        ("Qwen2.5-Coder-32B", "Qwen2.5-Coder-7B"),
        ("CodeLlama-34B", "CodeLlama-7B"),
        ("DeepSeek-V3-0324", "DeepSeek-Coder-1.3B"),
        ("Qwen2.5-Coder-32B", "StarCoder2-3B"),
        ("tiny-source", "tiny-target"),
    } <= pairs


def test_unknown_keys_in_yaml_are_refused(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("num_beam: 5\n")
    with pytest.raises(ConfigError, match="num_beam"):
        build_config(load_config_file(y), {})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--source-model", "NoSuchModel-9B"], "Unknown model"),
        (["--sampling-method", "boltzmann"], "unknown sampling method"),
        (["--sampling-alpha", "-2"], "sampling_alpha"),
        (["--p2-alpha", "1.5"], "p2_alpha"),
        (["--dataset", "humaneval"], "training dataset"),
    ],
)
def test_bad_input_fails_fast_with_a_clear_error(tmp_path, flags, message):
    out = tmp_path / "run"
    args = [*SEED_CMD[:-1], str(out)]
    for i in range(0, len(flags), 2):
        j = args.index(flags[i]) if flags[i] in args else None
        if j is None:
            args += flags[i : i + 2]
        else:
            args[j + 1] = flags[i + 1]
    r = _run(args, timeout=600)  # a hang guard: the CLI imports torch first (minutes on a loaded machine)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (out / "config.json").exists()


def test_output_dir_of_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    base = [
        "--source-model",
        "tiny-source",
        "--target-model",
        "tiny-target",
        "--dataset",
        "synth",
        "--max-problems",
        "3",
        "--output-dir",
        str(out),
    ]
    from codedistill.btp.plan import ResolvedInputs
    from codedistill.runs import RunDir

    cfg = build_config(
        {},
        {
            "source_model": "tiny-source",
            "target_model": "tiny-target",
            "dataset": "synth",
            "max_problems": 3,
            "seed": 5,
            "output_dir": str(out),
        },
    )
    plan = ResolvedInputs(cfg)
    RunDir(out).open(
        {**cfg.experiment_dict(), "source_spec": plan.source_spec.to_dict(), "target_spec": plan.target_spec.to_dict()},
        kind="btp",
    )
    r = _run(base, timeout=600)
    assert r.returncode == 2 and "different run" in r.stderr and "seed" in r.stderr


def _tiny_seed_cmd(out: Path, dataset: str, iterations: str) -> list[str]:
    args = [*SEED_CMD[:-1], str(out)]
    args[args.index("StarCoder2-15B")] = "tiny-source"
    args[args.index("StarCoder2-3B")] = "tiny-target"
    args[args.index("100")] = "10"
    args[args.index("mbpp")] = dataset
    args[args.index("--n-iterations") + 1] = iterations
    # keep the held-out evaluation small on CPU (the full test split takes hours on 2 cores)
    return args + ["--eval-max-problems", "6", "--eval-num-samples", "2", "--max-new-tokens", "96"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset, iterations", [("mbpp", "3"), ("synth", "1")])
def test_seed_command_with_tiny_models_runs_on_cpu(tmp_path, dataset, iterations):
    out = tmp_path / "run"
    r = _run(_tiny_seed_cmd(out, dataset, iterations), timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    comp = json.loads((out / "comparison.json").read_text())
    e = comp["datasets"][dataset]
    assert e["n_problems"] == 6 and "pass@1" in e["target_after"] and "pass@1" in e["source"]
    assert comp["n_train_problems"] == 10 and comp["source_model"] == "tiny-source"
    n = int(iterations)
    assert (out / f"iter_{n}" / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "replay_buffer.jsonl").exists() and (out / "report.md").exists()
    assert f"{dataset}: target pass@1" in r.stdout
