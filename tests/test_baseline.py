"""Step 1 end to end on the embedded tiny models, and exact resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEP1 = REPO / "experiments" / "step1_baseline_experiment.py"


def step1(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(STEP1), "--output-dir", str(out), *args]


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_step1_mbpp_tiny_target_end_to_end(tmp_path):
    out = tmp_path / "mbpp"
    run_ok(
        step1(
            out,
            "--model-name",
            "tiny-target",
            "--dataset",
            "mbpp",
            "--max-problems",
            "20",
            "--num-samples",
            "2",
            "--max-new-tokens",
            "64",
        )
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_problems"] == 20 and metrics["num_samples"] == 2 and "pass@1" in metrics
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(samples) == len(results) == 40
    assert samples[0]["task_id"] == "Mbpp/11"
    for s in samples:
        assert {"completion", "program", "logprob", "seq_prob", "model"} <= set(s)
        assert 0.0 <= s["seq_prob"] <= 1.0
    for r in results:
        assert r["tests_total"] == 3 and 0 <= r["tests_passed"] <= 3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["model"] == "tiny-target" and cfg["provenance"]["packages"]["transformers"]
    assert "pass@1" in (out / "report.md").read_text()


@pytest.mark.slow
def test_kill9_resume_matches_uninterrupted_run(tmp_path):
    args = [
        "--model-name",
        "tiny-target",
        "--dataset",
        "synth",
        "--max-problems",
        "24",
        "--num-samples",
        "3",
        "--max-new-tokens",
        "96",
        "--seed",
        "5",
    ]
    ref = tmp_path / "ref"
    run_ok(step1(ref, *args))
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        step1(out, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    chunks = out / "chunks.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if chunks.exists() and len(chunks.read_text().splitlines()) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = [json.loads(line) for line in chunks.read_text().splitlines() if line.endswith("}")]
    done_before = {t for rec in first for t in rec["generated"]}
    assert 0 < len(done_before) < 24
    assert not (out / "metrics.json").exists()
    run_ok(step1(out, *args))
    recs = [json.loads(line) for line in chunks.read_text().splitlines()]
    generated = [t for rec in recs for t in rec["generated"]]
    assert len(generated) == len(set(generated)) == 24, "a finished problem was generated twice"
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())

    def rows(p):
        return [json.loads(line) for line in p.read_text().splitlines()]

    assert rows(out / "samples.jsonl") == rows(ref / "samples.jsonl")
    starts = (out / "starts.jsonl").read_text().splitlines()
    assert [json.loads(s)["resumed"] for s in starts] == [False, True]


def test_unknown_alias_is_a_clear_error(tmp_path):
    p = subprocess.run(
        step1(tmp_path / "x", "--model-name", "StarCoder9-1B", "--dataset", "synth"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert "Unknown model 'StarCoder9-1B'" in p.stderr and "StarCoder2-15B" in p.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_step1_on_mbpp_plus_reports_base_and_plus_and_leaves_the_shots_out(tmp_path):
    """`codedistill baseline --dataset mbpp+ --split all --shots 3`: the prompt's tasks 2-4
    are not evaluated (said in metrics.json and report.md), rows carry base_passed and
    plus_passed, and a rerun of the finished run reads them back unchanged."""
    out = tmp_path / "mbpp_plus"
    cmd = step1(
        out,
        "--model-name",
        "tiny-target",
        "--dataset",
        "mbpp+",
        "--split",
        "all",
        "--shots",
        "3",
        "--max-problems",
        "4",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "32",
    )
    run_ok(cmd)
    metrics = json.loads((out / "metrics.json").read_text())
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in results][::2] == ["Mbpp/6", "Mbpp/7", "Mbpp/8", "Mbpp/9"]
    assert all({"base_passed", "plus_passed"} <= set(r) and r["passed"] == r["plus_passed"] for r in results)
    assert metrics["excluded"] == [
        {
            "reason": "the 3-shot prompt's examples (MBPP tasks 2, 3, 4): it holds their solutions",
            "task_ids": ["Mbpp/2", "Mbpp/3", "Mbpp/4"],
        }
    ]
    assert set(metrics["base"]) == set(metrics["plus"]) == {"pass@1"}
    report = (out / "report.md").read_text()
    assert "| metric | base | base 95% CI | plus | plus 95% CI |" in report
    assert "- left out: 3 task(s) the 3-shot prompt's examples" in report
    run_ok(cmd)  # finished: everything read back from the run directory
    assert json.loads((out / "metrics.json").read_text()) == metrics
