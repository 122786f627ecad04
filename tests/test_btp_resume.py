"""kill -9 a BTP run mid-way (twice), restart the same command: it resumes (finished
phases not redone) and ends with the same comparison.json as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from codedistill.btp._testing import build_throwaway_pair  # noqa: E402
from codedistill.runs import read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "step2_btp_finetune_experiment.py"


def _cmd(src: Path, tgt: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--source-model",
        str(src),
        "--target-model",
        str(tgt),
        "--mode",
        "finetune",
        "--dataset",
        "synth",
        "--max-problems",
        "6",
        "--eval-max-problems",
        "4",
        "--num-beams",
        "3",
        "--n-iterations",
        "2",
        "--sampling-method",
        "rank",
        "--sampling-alpha",
        "1.0",
        "--generation",
        "beam",
        "--use-lora",
        "--lora-r",
        "4",
        "--eval-num-samples",
        "2",
        "--max-new-tokens",
        "24",
        "--chunk-size",
        "2",
        "--train-batch-size",
        "4",
        "--lr",
        "1e-3",
        "--workers",
        "2",
        "--output-dir",
        str(out),
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # same thread count in every process -> same float sums
    env["PYTHONHASHSEED"] = "0"
    return env


def _run_until(cmd: list[str], ready, timeout: float = 400) -> bool:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` holds. True if it was killed."""
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    t0 = time.time()
    try:
        while p.poll() is None:
            if ready():
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                return True
            if time.time() - t0 > timeout:
                raise TimeoutError("run did not reach the kill point")
            time.sleep(0.05)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    return False


@pytest.mark.slow
def test_kill9_and_resume_matches_uninterrupted(tmp_path):
    src, tgt = build_throwaway_pair(tmp_path / "models")
    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = subprocess.run(_cmd(src, tgt, ref), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    # kill 1: in the middle of the beam/testing phase of iteration 1
    vpath = out / "generations" / "source_beam.verdicts.jsonl"
    assert _run_until(_cmd(src, tgt, out), lambda: len(read_jsonl(vpath)) >= 2)
    n_beams_before = len(read_jsonl(out / "generations" / "source_beam.jsonl"))
    assert 2 <= n_beams_before and not (out / "iter_1" / "DONE").exists()
    # kill 2: iteration 1 finished, iteration 2 under way
    assert _run_until(_cmd(src, tgt, out), lambda: (out / "iter_2" / "draw.json").exists())
    assert (out / "iter_1" / "DONE").exists() and not (out / "comparison.json").exists()
    done1 = (out / "iter_1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    # finish
    r = subprocess.run(_cmd(src, tgt, out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr

    # nothing finished was redone: one record per problem, iteration 1's adapter untouched
    gens = read_jsonl(out / "generations" / "source_beam.jsonl")
    assert sorted(g["task_id"] for g in gens) == sorted({g["task_id"] for g in gens}) and len(gens) == 6
    assert len(read_jsonl(vpath)) == 6
    for stage in ("target_iter0", "source", "target_iter1", "target_iter2"):
        rows = read_jsonl(out / "eval" / stage / "synth" / "chunks.jsonl")
        generated = [t for r in rows for t in r["generated"]]
        assert len(generated) == 4 == len(set(generated))
    assert (out / "iter_1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == done1
    starts = read_jsonl(out / "starts.jsonl")
    assert [s["resumed"] for s in starts] == [False, True, True]

    # same results as the uninterrupted run
    assert json.loads((out / "comparison.json").read_text()) == json.loads((ref / "comparison.json").read_text())
    assert read_jsonl(out / "replay_buffer.jsonl") == read_jsonl(ref / "replay_buffer.jsonl")
    for k in (1, 2):
        a = json.loads((out / f"iter_{k}" / "draw.json").read_text())
        b = json.loads((ref / f"iter_{k}" / "draw.json").read_text())
        assert a == b
        la = [x["loss"] for x in read_jsonl(out / f"iter_{k}" / "train_log.jsonl")]
        lb = [x["loss"] for x in read_jsonl(ref / f"iter_{k}" / "train_log.jsonl")]
        assert la == lb
