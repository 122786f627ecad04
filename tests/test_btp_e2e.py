"""BTP end to end on CPU with throwaway tiny models: every output exists and loads;
bad input fails before expensive work; train/eval overlap is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from codedistill.btp._testing import build_throwaway_pair  # noqa: E402
from codedistill.btp.config import BTPConfig, build_config  # noqa: E402
from codedistill.btp.loop import run_btp  # noqa: E402
from codedistill.btp.plan import ResolvedInputs, find_near_duplicates, find_overlap  # noqa: E402
from codedistill.data.mbpp import packaged_dir  # noqa: E402
from codedistill.errors import ConfigError  # noqa: E402
from codedistill.runs import read_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_throwaway_pair(tmp_path_factory.mktemp("btp_models"))


def small_cfg(pair, out, **kw) -> BTPConfig:
    src, tgt = pair
    vals = dict(
        source_model=str(src),
        target_model=str(tgt),
        dataset="synth",
        max_problems=4,
        eval_max_problems=4,
        num_beams=3,
        n_iterations=2,
        use_lora=True,
        lora_r=4,
        lora_alpha=8,
        eval_num_samples=2,
        max_new_tokens=24,
        train_batch_size=4,
        learning_rate=1e-3,
        sampling_method="power",
        sampling_alpha=1.5,
        output_dir=str(out),
        chunk_size=2,
        workers=2,
        merge=True,
    )
    vals.update(kw)
    return build_config({}, vals)


@pytest.fixture(scope="module")
def run_dir(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("btp_e2e") / "run"
    comparison = run_btp(small_cfg(pair, out), log=lambda m: None)
    return out, comparison


def test_comparison_and_report(run_dir):
    out, comparison = run_dir
    on_disk = json.loads((out / "comparison.json").read_text())
    assert on_disk == json.loads(json.dumps(comparison))
    e = on_disk["datasets"]["synth"]
    assert e["n_problems"] == 4
    for key in ("target_before", "target_after", "source"):
        m = e[key]["pass@1"]
        assert 0.0 <= m["ci_low"] <= m["value"] <= m["ci_high"] <= 1.0
    assert set(e["target_per_iteration"]) == {"target_iter0", "target_iter1", "target_iter2"}
    imp = e["improvement"]["pass@1"]
    assert imp["n_problems"] == 4 and imp["ci_low"] <= imp["diff"] <= imp["ci_high"]
    assert imp["diff"] == pytest.approx(imp["after"] - imp["before"])
    report = (out / "report.md").read_text()
    assert "pass@1" in report and "target before" in report and "paired bootstrap" in report
    assert "WARNING" not in report  # no --allow-overlap


def test_buffer_generations_and_stats(run_dir, pair):
    out, _ = run_dir
    buf = read_jsonl(out / "replay_buffer.jsonl")
    keys = [(r["task_id"], r["key"]) for r in buf]
    assert len(keys) == len(set(keys)) and 1 <= len(buf) <= 4 * 3
    for r in buf:
        assert 0 <= r["p"] <= 1 and 0 <= r["pass_rate"] <= 1 and r["tests_total"] == 3
        assert r["source"] == "src" and r["iteration"] == 1  # beams are deterministic: nothing new in iter 2
    gens = read_jsonl(out / "generations" / "source_beam.jsonl")
    assert len(gens) == 4 and all(len(g["candidates"]) == 3 for g in gens)
    for k in (1, 2):
        st = json.loads((out / f"iter_{k}" / "stats.json").read_text())
        p2 = st["buffer"]["p2value"]
        assert sum(p2["histogram"]["counts"]) == len(buf) and p2["mean"] is not None
        assert set(p2["quantiles"]) >= {"q00", "q50", "q100"}
        assert sum(st["buffer"]["pass_rate"]["histogram"]["counts"]) == len(buf)
        s = st["sampling"]
        assert s["draws"] == len(buf) and sum(s["draws_per_problem"]["counts"].values()) == s["draws"]
        assert 1 <= s["unique_programs_drawn"] <= len(buf)
        assert 0 <= s["share_zero_pass_drawn"] <= 1 and 0 <= s["share_fully_passing_drawn"] <= 1
        assert 1 <= s["effective_sample_size"] <= s["draws"]
        assert sum(s["p2value_drawn"]["histogram"]["counts"]) == s["draws"]  # one P2Value per draw
        tr = st["training"]
        assert len(tr["losses"]) == tr["steps"] >= 1 and all(l > 0 for l in tr["losses"])
        assert "synth" in st["eval"]
        assert (out / f"iter_{k}" / "DONE").exists()
    assert json.loads((out / "iter_2" / "train.json").read_text())["init_from"].endswith("iter_1/adapter")


def test_checkpoints_load(run_dir, pair):
    out, _ = run_dir
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tgt = pair
    tok = AutoTokenizer.from_pretrained(tgt)
    x = torch.tensor([tok("def f(x):")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tgt)
    with torch.no_grad():
        y0 = base(input_ids=x).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tgt), str(out / "iter_2" / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(out / "iter_2" / "merged")
    with torch.no_grad():
        y1 = peft(input_ids=x).logits
        y2 = merged(input_ids=x).logits
    assert not torch.allclose(y0, y1)  # training changed the model
    assert torch.allclose(y1, y2, atol=1e-4)  # merged == base + adapter


def test_plots_are_pngs(run_dir):
    out, _ = run_dir
    import matplotlib.image as mpimg

    for name in ("p2value_hist.png", "pass_at_k_synth.png", "loss_curve.png"):
        p = out / "plots" / name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100


def test_rerun_of_finished_run_is_a_noop_and_other_config_is_refused(run_dir, pair):
    out, comparison = run_dir
    mtime = (out / "iter_1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = run_btp(small_cfg(pair, out), log=lambda m: None)
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(comparison))
    assert (out / "iter_1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="different run"):
        run_btp(small_cfg(pair, out, seed=1), log=lambda m: None)


def test_bad_input_is_refused_early(pair, tmp_path):
    with pytest.raises(ConfigError, match="Unknown model"):
        ResolvedInputs(small_cfg(pair, tmp_path / "a", source_model="NoSuchModel-9B"))
    with pytest.raises(ConfigError, match="sampling method"):
        small_cfg(pair, tmp_path / "b", sampling_method="boltzmann")
    with pytest.raises(ConfigError, match="sampling_alpha"):
        small_cfg(pair, tmp_path / "c", sampling_alpha=-1)
    with pytest.raises(ConfigError, match="p2_alpha"):
        small_cfg(pair, tmp_path / "d", p2_alpha=1.5)
    with pytest.raises(ConfigError, match="training dataset"):
        small_cfg(pair, tmp_path / "e", dataset="humaneval")
    assert not (tmp_path / "a").exists()


def _mbpp_with_leak(tmp_path: Path) -> Path:
    src = packaged_dir() / "mbpp.jsonl"
    rows = [json.loads(l) for l in src.read_text().splitlines() if l.strip()]
    by_id = {r["task_id"]: r for r in rows}
    by_id[601] = {**by_id[11], "task_id": 601}  # a test problem copied into train
    p = tmp_path / "mbpp.jsonl"
    p.write_text("".join(json.dumps(by_id[i]) + "\n" for i in sorted(by_id)))
    return p


def test_overlap_is_refused_unless_allowed_and_then_reported_in_bold(pair, tmp_path):
    data = _mbpp_with_leak(tmp_path)
    kw = dict(dataset="mbpp", data_path=str(data), max_problems=2, eval_max_problems=2)
    with pytest.raises(ConfigError, match="allow-overlap"):
        ResolvedInputs(small_cfg(pair, tmp_path / "r1", **kw))
    plan = ResolvedInputs(small_cfg(pair, tmp_path / "r2", allow_overlap=True, **kw))
    assert plan.overlap == ["Mbpp/601"]
    # the real MBPP splits are disjoint
    from codedistill.data import load_problems

    real = packaged_dir() / "mbpp.jsonl"
    tr, te = load_problems("mbpp", "train", data_path=real), load_problems("mbpp", "test", data_path=real)
    # MBPP's standard split leaks one problem (704 == 248: same description and reference)
    assert find_overlap(tr, te) == ["Mbpp/704"]
    assert find_overlap(tr[:100], te) == []  # the seed command's --max-problems 100 is clean
    dropped = ResolvedInputs(small_cfg(pair, tmp_path / "r3", drop_overlap=True, **kw))
    assert dropped.overlap == [] and dropped.dropped == ["Mbpp/601"]
    assert "Mbpp/601" not in [p.task_id for p in dropped.train]
    # MBPP's four same-description pairs are listed, not refused
    assert ["Mbpp/602", "Mbpp/217"] in find_near_duplicates(tr, te)
    from codedistill.report.btp_run import run_markdown

    fake = {
        "source_model": "s",
        "target_model": "t",
        "mode": "finetune",
        "allow_overlap": True,
        "overlapping_train_problems": plan.overlap,
        "n_train_problems": len(plan.train),
        "datasets": {},
    }
    assert "**WARNING: --allow-overlap" in run_markdown({"config": plan.cfg.model_dump()}, fake, [])


def test_mixed_mode_sampling_generation_and_is_weights(pair, tmp_path):
    """mode=mixed: source and the current target both feed the buffer; sampled (not beam)
    generation; greedy replay; importance weights; full fine-tuning checkpoints."""
    out = tmp_path / "mixed"
    cfg = small_cfg(
        pair,
        out,
        mode="mixed",
        generation="sample",
        num_samples=2,
        n_iterations=2,
        sampling_method="rank",
        sampling_alpha=1.0,
        is_weights=True,
        is_beta=0.5,
        replay_size=5,
        use_lora=False,
        merge=False,
        eval_source=False,
        learning_rate=1e-4,
    )
    comp = run_btp(cfg, log=lambda m: None)
    assert "source" not in comp["datasets"]["synth"]
    buf = read_jsonl(out / "replay_buffer.jsonl")
    assert {r["source"] for r in buf} >= {"src"} and any(r["source"].startswith("tgt") for r in buf)
    assert {r["iteration"] for r in buf} == {1, 2}  # samples differ per iteration: new programs
    assert any(r["source"] == "tgt@iter1" for r in buf)  # iteration 2 sampled the fine-tuned target
    assert (out / "generations" / "source_iter1.jsonl").exists() and (
        out / "generations" / "target_iter2.jsonl"
    ).exists()
    st = json.loads((out / "iter_2" / "stats.json").read_text())
    assert st["sampling"]["draws"] == 5 and st["sampling"]["method"] == "rank"
    w = json.loads((out / "iter_2" / "draw.json").read_text())["is_weights"]
    assert len(w) == 5 and max(w) == pytest.approx(1.0) and min(w) > 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "iter_2" / "model") is not None
    assert not (out / "iter_2" / "adapter").exists()


def test_humaneval_as_extra_eval_set(pair, tmp_path):
    plan = ResolvedInputs(small_cfg(pair, tmp_path / "he", eval_datasets=["humaneval"], eval_max_problems=3))
    assert list(plan.evals) == ["synth", "humaneval"]
    assert len(plan.evals["humaneval"]) == 3 and plan.overlap == []


@pytest.mark.slow
def test_btp_on_mbpp_evaluated_on_mbpp_plus_reports_what_it_kept(pair, tmp_path):
    """The paper preset on an MBPP-trained run puts MBPP+ beside MBPP; MBPP+ is held out
    whole less its 108 tasks in MBPP's train split and the 3-shot prompt's tasks 2-4
    (378 - 108 - 3 = 267 kept), judged as EvalPlus judges, base and plus side by side."""
    out = tmp_path / "mbpp_plus"
    cfg = small_cfg(
        pair,
        out,
        dataset="mbpp",
        max_problems=4,
        n_iterations=1,
        eval_protocol="paper",
        eval_max_problems=8,
        eval_source=False,
    )
    comp = run_btp(cfg, log=lambda m: None)
    assert list(comp["datasets"]) == ["mbpp", "mbpp+"]
    e = comp["datasets"]["mbpp+"]
    proto = e["protocol"]
    assert (proto["split"], proto["shots"], proto["n_eligible"], proto["n_problems"]) == ("all", 3, 267, 8)
    assert [x["n"] for x in proto["excluded"]] == [3, 108]
    assert proto["excluded"][0]["task_ids"] == ["Mbpp/2", "Mbpp/3", "Mbpp/4"]
    assert all(601 <= int(t.split("/")[1]) <= 974 for t in proto["excluded"][1]["task_ids"])
    rows = read_jsonl(out / "eval" / "target_iter0" / "mbpp+" / "results.jsonl")
    assert [r["task_id"] for r in rows] == [
        "Mbpp/6",
        "Mbpp/7",
        "Mbpp/8",
        "Mbpp/9",
        "Mbpp/11",
        "Mbpp/12",
        "Mbpp/14",
        "Mbpp/16",
    ]
    assert all(r["passed"] == r["plus_passed"] and (r["base_passed"] or not r["plus_passed"]) for r in rows)
    for stage in ("target_before", "target_after"):
        assert set(e[stage]["base"]) == set(e[stage]["plus"]) == {"pass@1"}
        assert e[stage]["plus"]["pass@1"] == e[stage]["pass@1"]
    assert set(e["improvement_base"]) == set(e["improvement"]) == {"pass@1"}
    assert "excluded" not in comp["datasets"]["mbpp"]["protocol"]
    md = (out / "report.md").read_text()
    assert (
        "Protocol: mbpp+ all split, 8 problems (first 8 of the 267 of 378 kept; left out: 3 the 3-shot prompt's "
        "examples (MBPP tasks 2, 3, 4): it holds their solutions; 108 in MBPP's train split (tasks 601-974), "
        "which this run trains on (mbpp)), 3-shot, greedy; preset paper."
    ) in md
    assert "| model | base pass@1 | plus pass@1 |" in md
