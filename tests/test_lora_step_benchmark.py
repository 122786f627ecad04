"""benchmarks/lora_step.py --tiny on the shipped tiny target: the full-logits and the lean
loss, each in its own process, report step times, peak RSS and load average, and their
losses agree (so the gemma-3-270m measurement it makes cannot rot; the other variants'
loss paths are tests/test_training_loss.py's)."""

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


def test_lora_step_benchmark_tiny(tmp_path):
    out = tmp_path / "lora_step.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "lora_step.py"),
            "--tiny",
            "--steps",
            "1",
            "--variants",
            "full,lean",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"full", "lean"} and rows["lean"]["loss_mode"] == "chunked fused"
    for r in rows.values():
        assert len(r["step_s"]) == 1 and r["step_s"][0] > 0 and r["peak_rss_process_gb"] > 0
        assert len(r["load_avg_1m"]) == 2
    assert report["loss_spread"] < 1e-5
    assert res.stdout.count("[load ") == 2 * 2  # a load average beside the time and the memory of each
