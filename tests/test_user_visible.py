"""What the user sees: ``codedistill evaluate`` counts programs (it printed ``executing:
78606/396`` for 396 samples, the running count summed once per program), and no model load
prints transformers' "Loading weights" bar (it did on every load), while download bars stay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codedistill.data import load_problems


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=os.environ)


def test_evaluate_counts_programs_not_the_running_total(tmp_path):
    problems = load_problems("humaneval", "test", max_problems=3)
    rows = [{"task_id": p.task_id, "completion": c} for p in problems for c in ("    return None\n", "    pass\n")]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run(
        [sys.executable, "-m", "codedistill", "evaluate", str(samples), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("executing:")]
    assert len(lines) == 1 and lines[0].startswith("executing: 6/6 "), r.stderr  # not 21/6 (1+2+...+6)


@pytest.fixture(scope="module")
def tiny_target() -> str:
    from codedistill.models.tiny import ensure_tiny_models

    return str(ensure_tiny_models(("tiny-target",), progress=False)["tiny-target"])


def test_no_loading_bar_on_model_loads(tiny_target):
    # the bar is there when transformers loads the model on its own (so this test can fail) ...
    plain = _python(
        f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({tiny_target!r})"
    )
    assert plain.returncode == 0 and "Loading weights" in plain.stderr, plain.stderr[-2000:]
    # ... and not when codedistill loads it (for generation, training, EG-CFG), nor on a second
    # load; transformers' other bars and huggingface_hub's download bars stay on
    ours = _python(
        "import transformers.utils.logging as hl, huggingface_hub.utils as hu\n"
        "from codedistill.models.loading import load_causal_lm, load_tokenizer\n"
        f"load_tokenizer({tiny_target!r})\n"
        f"load_causal_lm({tiny_target!r}, 'cpu'); load_causal_lm({tiny_target!r}, 'cpu')\n"
        "from codedistill.training.settings import TrainSettings\n"
        "from codedistill.training.trainer import prepare_model\n"
        f"prepare_model({tiny_target!r}, TrainSettings(use_lora=True), seed=0, device='cpu')\n"
        "assert hl.is_progress_bar_enabled() and not hu.are_progress_bars_disabled()\n"
        "from transformers.utils.logging import tqdm\n"
        "list(tqdm(range(3), desc='other work'))\n"
    )
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert "Loading weights" not in ours.stderr and "other work" in ours.stderr, ours.stderr[-2000:]


@pytest.mark.slow
def test_no_loading_bar_in_a_baseline_run(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "codedistill",
            "baseline",
            "--model",
            "tiny-target",
            "--dataset",
            "synth",
            "-n",
            "1",
            "--max-problems",
            "2",
            "--max-new-tokens",
            "16",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Loading weights" not in r.stderr and "Loading weights" not in r.stdout, r.stderr[-2000:]
    assert (Path(tmp_path / "run") / "metrics.json").is_file()
