"""EG-CFG through an OpenAI-compatible server's top-k log-probs (a real HTTP stand-in serving
tiny-target; tests/standin_openai.py), end to end with the sandbox."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

pytestmark = pytest.mark.slow  # a real tiny model behind HTTP, two requests per guided token


@pytest.fixture(scope="module")
def served():
    from codedistill.generation.openai_api import OpenAIGenerator, OpenAISettings
    from standin_openai import StandIn

    s = StandIn("tiny-target", served_name="tiny-target", faults={}).start()
    gen = OpenAIGenerator("tiny-target", s.base_url, OpenAISettings(concurrency=2, require_logprobs=True))
    yield s, gen
    s.stop()


def test_served_egcfg_runs_end_to_end(served):
    from codedistill.data import load_problems
    from codedistill.egcfg.config import EGCFGConfig
    from codedistill.egcfg.served import ServedEGCFG
    from codedistill.egcfg.signal import prompt_builder
    from codedistill.prompts import PromptStyle, stops_for, to_program

    standin, gen = served
    style = PromptStyle("base")
    p0, p1 = load_problems("synth", "test", max_problems=2)
    stop = list(stops_for(p0, style))
    tp = lambda p, text: to_program(p, style, text)[1]  # noqa: E731
    # gamma = 0: token by token through top-k requests, exactly the model's greedy program
    plain = ServedEGCFG(gen, EGCFGConfig(gammas=[0.0], prompts={"default": ""}, max_lines=8), to_program=tp)
    try:
        completion, rec = plain.solve(p1, prompt_builder(p1, style), stop)
        greedy = standin.gen.sample([p1.prompt], n=1, temperature=0.0, max_new_tokens=96, stop=stop)[0][0].text
        assert completion.strip() == greedy.strip() and rec["requests"] > 5
    finally:
        plain.close()
    # gamma = 1: candidates from the server, traced in the sandbox, signal, guided tokens
    cfg = EGCFGConfig(
        gammas=[1.0],
        prompts={"default": ""},
        depths=[2],
        temperatures=[0.7],
        max_lines=4,
        candidate_max_tokens=32,
        trace_budget_tokens=400,
    )
    eg = ServedEGCFG(gen, cfg, to_program=tp, k=20)
    try:
        completion, rec = eg.solve(p0, prompt_builder(p0, style), stop, seed=3)
    finally:
        eg.close()
    (agent,) = rec["agents"]
    guided = [line for line in agent["lines"] if "candidates" in line]
    assert guided and all(line["signal_tokens"] > 0 for line in guided)
    assert "candidates" not in agent["lines"][0]  # the def line itself is plain (guidance starts there)
    assert rec["sandbox_executions"] >= len(guided) + 1 and rec["requests"] > 2 * len(guided)
    assert completion.startswith("def ") and rec["visible_passed"] in (True, False)


def test_baseline_method_egcfg_on_a_served_backend(served, tmp_path):
    """`codedistill baseline --method egcfg --backend openai --base-url ...`: EG-CFG through the
    server's top-k log-probs, its log and the EG-CFG report section in the run directory."""
    import json
    import subprocess

    standin, _ = served
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "codedistill",
        "baseline",
        "--model",
        "tiny-target",
        "--dataset",
        "synth",
        "--method",
        "egcfg",
        "--backend",
        "openai",
        "--base-url",
        standin.base_url,
        "--served-model-name",
        "tiny-target",
        "--response-cache",
        "run",  # every request reaches the stand-in (not answered by an earlier session's cache)
        "--max-problems",
        "2",
        "--max-new-tokens",
        "64",
        "--workers",
        "1",
        "--egcfg",
        json.dumps(
            {
                "prompts": {"default": ""},
                "gammas": [0.0, 1.0],
                "depths": [2],
                "temperatures": [0.7],
                "max_lines": 4,
                "candidate_max_tokens": 32,
            }
        ),
        "--output-dir",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(x) for x in (out / "egcfg_log.jsonl").read_text().splitlines()]
    assert [x["task_id"] for x in log] == ["synth/test/0", "synth/test/1"]
    assert all(x["requests"] > 0 and x["sandbox_executions"] >= 1 and x["guided"] for x in log)
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_problems"] == 2 and m["egcfg"]["records"] == 2 and m["egcfg"]["first_agent_pass@1"] is not None
    assert "What EG-CFG's pass@1 means" in (out / "report.md").read_text()
