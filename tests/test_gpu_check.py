"""benchmarks/gpu_check.py on toy shapes, on CPU: every phase runs, so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_phase_on_tiny_shapes(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["tiny"] and report["device"].startswith("CPU")
    phases = {(r["model"], r["phase"]) for r in report["results"]}
    for model in ("DeepSeek-Coder-1.3B", "StarCoder2-3B"):
        assert {(model, p) for p in ("hf_generate", "lora_step", "lora_step_gc")} <= phases
    for r in report["results"]:
        assert r["seconds"] > 0 and r["peak_gb"] > 0 and r["preflight_gb"] > 0
        if r["phase"] == "hf_generate":
            assert r["tokens"] == 2 * 8 or 0 < r["tokens"] <= 2 * 8  # EOS may end a random model early
        else:
            assert r["trainable_params"] > 0 and r["loss"] > 0
    assert "| hf_generate |" in res.stdout  # the table


def test_shipped_configs_give_the_published_sizes():
    """The eight registry architectures, counted by preflight from the shipped config.json files."""
    from importlib.resources import files

    from codedistill.models.preflight import count_parameters
    from codedistill.models.registry import REGISTRY

    root = files("codedistill").joinpath("assets", "model_configs")
    sizes = {}
    for alias, spec in REGISTRY.items():
        if spec.tiny or spec.family == "gemma":
            continue
        sizes[alias] = count_parameters(json.loads(root.joinpath(f"{alias}.json").read_text()))
    assert len(sizes) == 8
    assert sizes["DeepSeek-Coder-1.3B"] == 1_346_471_936
    for alias, n in sizes.items():
        assert abs(n / 1e9 - REGISTRY[alias].size_b) / REGISTRY[alias].size_b < 0.1, (alias, n)
