"""benchmarks/gemma_throughput.py in its tiny mode: every HF variant runs in its own
subprocess and the result block is printed, so the benchmark cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gemma_throughput_tiny_mode(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""}
    # the before variant from a src/ directory (CI checkouts may be shallow): this one
    cmd = [sys.executable, str(REPO / "benchmarks" / "gemma_throughput.py"), "--tiny", "--variants", "before,after"]
    cmd += ["--before-src", str(REPO / "src"), "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    before, after = report["results"]["before"], report["results"]["after"]
    for r in (before, after):
        assert r["backend"] == "hf" and r["dtype"] == "float32"
        assert 0 < r["tokens"] <= 2 * 16 and r["tokens_per_s"] > 0 and r["gen_s"] > 0
        assert r["peak_rss_bytes"] > 50 * 2**20 and r["server_peak_rss_bytes"] == 0
        assert len(r["loadavg_before"]) == 3 and "load average" in r["uptime"]
    # greedy: the same code gives the same completions, and the report says so
    assert before["texts"] == after["texts"] and len(after["texts"]) == 2
    assert "same completions as before: after 2/2" in res.stdout
    assert "| before |" in res.stdout and "| after |" in res.stdout and "uptime at end:" in res.stdout


def test_gemma_throughput_rejects_bad_input(tmp_path):
    bench = str(REPO / "benchmarks" / "gemma_throughput.py")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run([sys.executable, bench, "--variants", "after,fast"], capture_output=True, text=True, env=env)
    assert res.returncode != 0 and "unknown variant(s) ['fast']" in res.stderr
    res = subprocess.run(
        [sys.executable, bench, "--tiny", "--variants", "before", "--before-src", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode != 0 and "no codedistill package there" in res.stderr
