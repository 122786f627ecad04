"""BTP with ``--generation egcfg`` end to end on the shipped tiny models (CPU): EG-CFG's agents
write the source's programs, every agent's final program is a candidate (with its plain
log-prob, for P2Value), they are tested, replayed and trained on, and the target is
evaluated before and after."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from codedistill.btp.config import build_config  # noqa: E402
from codedistill.btp.loop import run_btp  # noqa: E402
from codedistill.runs import read_jsonl  # noqa: E402

SMALL = {
    "gammas": [0.0, 1.0],  # the greedy agent (gamma 0) and a guided one
    "prompts": {"default": ""},
    "depths": [2],
    "temperatures": [0.7],
    "early_stop": False,  # tiny-source's greedy program often passes: run the guided agent too
    "max_lines": 6,
    "max_line_tokens": 24,
    "candidate_max_tokens": 32,
    "trace_budget_tokens": 256,
    "exec_workers": 2,
}


@pytest.mark.slow
def test_btp_with_the_egcfg_sampler(tmp_path):
    out = tmp_path / "run"
    cfg = build_config(
        {},
        dict(
            source_model="tiny-source",
            target_model="tiny-target",
            dataset="synth",
            generation="egcfg",
            egcfg=SMALL,
            max_problems=3,
            eval_max_problems=2,
            eval_num_samples=1,
            eval_source=False,
            n_iterations=1,
            use_lora=True,
            lora_r=4,
            lora_alpha=8,
            epochs=1,
            train_batch_size=2,
            max_new_tokens=96,
            chunk_size=3,
            workers=2,
            output_dir=str(out),
        ),
    )
    run_btp(cfg, log=lambda m: None)

    gens = read_jsonl(next((out / "generations").glob("source*.jsonl")))
    logs = [r for p in (out / "generations").glob("*.egcfg_log.jsonl") for r in read_jsonl(p)]
    assert len(gens) == 3 and len(logs) == 3
    by_task = {r["task_id"]: r for r in logs}
    guided_ran = 0
    for g in gens:
        rec = by_task[g["task_id"]]
        agents = [a for a in rec["agents"] if a["finish_reason"] != "cancelled"]
        # one candidate per agent that ran (not only the winner), with the agent's plain log-prob
        assert len(g["candidates"]) == len(agents) == rec["agents_run"] == 2
        assert [c["logprob"] for c in g["candidates"]] == [a["plain_logprob"] for a in agents]
        assert [c["num_tokens"] for c in g["candidates"]] == [a["num_tokens"] for a in agents]
        assert all(a["completion"].strip() in c["program"] for c, a in zip(g["candidates"], agents))
        guided_ran += sum(a["counters"]["sandbox_executions"] for a in rec["agents"] if a["spec"]["gamma"] != 0)
    assert guided_ran >= 1  # execution guidance ran candidates in the sandbox
    # every candidate tested, the buffer filled from them, one fine-tuning, before and after
    buf = read_jsonl(out / "replay_buffer.jsonl")
    programs = {c["program"] for g in gens for c in g["candidates"]}
    assert buf and all(r["origin"] == "egcfg" and r["program"] in programs for r in buf)
    stats = json.loads((out / "iter_1" / "stats.json").read_text())
    assert stats["training"]["steps"] >= 1
    synth = json.loads((out / "comparison.json").read_text())["datasets"]["synth"]
    assert {"target_before", "target_after"} <= set(synth)
