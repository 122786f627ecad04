"""BTP teaches: on synth, tiny-source's tested beams, replayed by P2Value priority, raise
tiny-target's held-out pass@1 by a clear margin (CPU, a few minutes).

This exercises everything at once: the source's beams are re-rendered in the target's
prompt format and re-tokenized with the target's own tokenizer (the two tiny models have
different vocabularies), the loss covers the program only, the LoRA adapter is the only
thing trained, and the sampler favours passing programs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from codedistill.btp.config import build_config, load_config_file  # noqa: E402
from codedistill.btp.loop import run_btp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="not yet: on this session's tiny pair, fine-tuning tiny-target on tiny-source's tested "
    "programs lowered its held-out pass@1 in every setting tried (0.394 -> 0.310 LoRA lr 3e-3; "
    "0.338 power alpha 8; 0.338 greedy top-300; 0.356 full fine-tuning), see the issue note. "
    "strict: the day it passes, this marker must go.",
)
def test_btp_raises_tiny_target_pass_at_1_on_synth(tmp_path):
    cfg = build_config(load_config_file(ROOT / "configs" / "btp_tiny.yaml"), {"output_dir": str(tmp_path / "run")})
    t0 = time.time()
    comp = run_btp(cfg, log=print)
    elapsed = time.time() - t0
    e = comp["datasets"]["synth"]
    before, after, src = (e[k]["pass@1"]["value"] for k in ("target_before", "target_after", "source"))
    imp = e["improvement"]["pass@1"]
    print(json.dumps({"before": e["target_before"]["pass@1"], "after": e["target_after"]["pass@1"],
                      "source": e["source"]["pass@1"], "improvement": imp, "seconds": round(elapsed, 1)}))
    assert src > before + 0.15, "the source must be clearly better than the target for this test to mean anything"
    assert imp["diff"] >= 0.15
    assert imp["ci_low"] > 0.05  # paired bootstrap over the 100 held-out problems
    assert after == pytest.approx(before + imp["diff"])
    st = json.loads((tmp_path / "run" / "iter_1" / "stats.json").read_text())
    # the sampler favoured passing programs over the buffer's base rate
    assert st["sampling"]["share_fully_passing_drawn"] > st["buffer"]["share_fully_passing"]
    assert st["training"]["last_loss"] < st["training"]["first_loss"]
