"""``--source-backend`` / ``--target-backend``: each role's backend reaches its own phases.

A BTP run with the source (tiny-source) served through the OpenAI backend by the local
stand-in of DeepSeek's API (tests/standin_openai.py) and the target (tiny-target) on the
in-process HF backend: the server is asked only while the source works (its evaluation and
beam phase), never during the target's evaluations before and after fine-tuning, and every
request it counted is the source generator's own."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openai")
pytest.importorskip("peft")

from codedistill.btp.config import build_config  # noqa: E402
from codedistill.btp.loop import run_btp  # noqa: E402
from standin_openai import StandIn  # noqa: E402


@pytest.mark.slow
def test_source_served_target_in_process(tmp_path):
    with StandIn("tiny-source", served_name="tiny-source", faults={}) as standin:
        cfg = build_config(
            {},
            dict(
                source_model="tiny-source",
                target_model="tiny-target",
                source_backend="openai",
                target_backend="hf",
                serving={"base_url": [standin.base_url], "served_model_name": "tiny-source", "cache": False},
                dataset="synth",
                max_problems=3,
                eval_max_problems=2,
                num_beams=2,
                n_iterations=1,
                use_lora=True,
                lora_r=4,
                lora_alpha=8,
                epochs=1,
                eval_num_samples=1,
                max_new_tokens=24,
                train_batch_size=2,
                chunk_size=3,
                workers=1,
                output_dir=str(tmp_path / "run"),
            ),
        )
        events: list[tuple[str, int]] = []  # every log line with the server's POST count then
        run_btp(cfg, log=lambda m: events.append((m, standin.posts)))
        total, served = standin.posts, standin.served

    def posts_at(prefix: str) -> int:
        hits = [p for m, p in events if m.startswith(prefix)]
        assert hits, (prefix, [m for m, _ in events])
        return hits[0]

    out = tmp_path / "run"
    backends = json.loads((out / "config.json").read_text())["config"]["generation_backends"]
    assert backends["source"]["backend"] == "openai" and backends["target"]["backend"] == "hf"
    # the target's evaluation before BTP ran first, in process: the server saw nothing
    assert posts_at("loading source") == 0
    # the source's evaluation and beam phase asked the server ...
    after_source = posts_at("[iter 1] replay buffer")
    assert after_source > 0
    # ... and fine-tuning and the target's evaluation after it did not
    assert total == after_source
    # every request the server answered was the source generator's (HF generators count none;
    # the requests it refused, n=2 before the client's fall back to n=1, are not answers)
    usage = json.loads((out / "generation.json").read_text())["totals"]
    assert set(usage) == {"tiny-source"} and usage["tiny-source"]["requests_sent"] == served > 0
    comparison = json.loads((out / "comparison.json").read_text())["datasets"]["synth"]
    assert {"source", "target_before", "target_after"} <= set(comparison)
