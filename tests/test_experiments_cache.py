"""Generation cache and the loop's new settings: variants that only change replay or
training generate nothing new (counted by the loop in generated.jsonl and stats.json)."""

from __future__ import annotations

import json
import math

import pytest

from codedistill.btp.config import build_config
from codedistill.btp.loop import run_btp
from codedistill.btp.phases.replay import eligible, sequence_p
from codedistill.btp.plan import iteration_slices
from codedistill.btp.replay import ReplayEntry
from codedistill.data.problem import Problem
from codedistill.errors import ConfigError
from codedistill.runs import read_jsonl


def _entry(rate: float) -> ReplayEntry:
    return ReplayEntry(
        task_id="t",
        completion=f"x{rate}",
        program=f"x = {rate}",
        p=0.5,
        pass_rate=rate,
        tests_passed=int(rate * 3),
        tests_total=3,
        source="s",
        iteration=1,
    )


def test_min_pass_rate_filters_before_the_draw():
    es = [_entry(r) for r in (0.0, 1 / 3, 2 / 3, 1.0)]
    assert [e.pass_rate for e in eligible(es, 0.0)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert [e.pass_rate for e in eligible(es, 0.01)] == [1 / 3, 2 / 3, 1.0]  # zero-pass dropped
    assert [e.pass_rate for e in eligible(es, 2 / 3)] == [2 / 3, 1.0]
    assert [e.pass_rate for e in eligible(es, 1.0)] == [1.0]  # rejection-sampling fine-tuning


def test_raw_sequence_probability_is_the_product_of_token_probabilities():
    c = {"logprob": -6.0, "num_tokens": 12, "seq_prob": math.exp(-0.5)}
    assert sequence_p(c, "normalized") == pytest.approx(math.exp(-0.5))
    assert sequence_p(c, "raw") == pytest.approx(math.exp(-6.0))
    assert sequence_p({"logprob": float("nan"), "seq_prob": 0.3}, "raw") == 0.0


def test_iteration_slices_are_disjoint_and_cover_everything():
    ps = [Problem(task_id=f"t{i}", prompt="", tests=("assert True",), entry_point="f") for i in range(10)]
    sl = iteration_slices(ps, 3)
    assert [len(s) for s in sl] == [4, 3, 3]
    assert [p.task_id for s in sl for p in s] == [p.task_id for p in ps]
    with pytest.raises(ConfigError, match="at least n_iterations"):
        iteration_slices(ps[:2], 3)


def test_paper_protocol_is_greedy_pass_at_1():
    cfg = build_config({}, {"eval_protocol": "paper", "eval_num_samples": 10, "eval_temperature": 0.8})
    assert (cfg.eval_num_samples, cfg.eval_temperature, cfg.ks()) == (1, 0.0, [1])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from codedistill.btp._testing import build_throwaway_pair

    return build_throwaway_pair(tmp_path_factory.mktemp("exp_models"))


def _cfg(pair, out, cache, **kw):
    src, tgt = pair
    vals = dict(
        source_model=str(src),
        target_model=str(tgt),
        dataset="synth",
        max_problems=4,
        eval_max_problems=3,
        num_beams=2,
        n_iterations=1,
        use_lora=True,
        lora_r=4,
        lora_alpha=8,
        eval_num_samples=2,
        max_new_tokens=16,
        train_batch_size=4,
        learning_rate=1e-3,
        output_dir=str(out),
        chunk_size=2,
        workers=2,
        generation_cache=str(cache),
    )
    vals.update(kw)
    return build_config({}, vals)


@pytest.mark.slow
def test_replay_variant_generates_nothing_new_and_rerun_is_free(pair, tmp_path):
    cache = tmp_path / "cache"
    ref = run_btp(_cfg(pair, tmp_path / "ref", cache), log=lambda m: None)
    first = read_jsonl(tmp_path / "ref" / "generated.jsonl")
    assert len(first) == 1 and first[0]["generated"]["source_beam"] == 4 * 2
    assert first[0]["generated"]["eval/target_iter0"] == 3 * 2 and first[0]["generated"]["eval/source"] == 3 * 2

    # a replay-only variant: same source beams, verdicts and before/source evaluations
    var = run_btp(
        _cfg(pair, tmp_path / "uniform", cache, sampling_method="uniform", p_mode="raw", min_pass_rate=0.0),
        log=lambda m: None,
    )
    g = read_jsonl(tmp_path / "uniform" / "generated.jsonl")[-1]
    assert g["generated"]["source_beam"] == 0 and g["generated"]["eval/target_iter0"] == 0
    assert g["generated"]["eval/source"] == 0
    assert g["total"] == g["generated"]["eval/target_iter1"] == 3 * 2  # only the trained target is new
    st = json.loads((tmp_path / "uniform" / "iter_1" / "stats.json").read_text())
    assert st["generation"]["source"]["generated_new"] == 0 and st["sampling"]["p_mode"] == "raw"
    e_ref, e_var = ref["datasets"]["synth"], var["datasets"]["synth"]
    assert e_ref["target_before"] == e_var["target_before"] and e_ref["source"] == e_var["source"]
    assert read_jsonl(tmp_path / "ref" / "generations" / "source_beam.verdicts.jsonl") == read_jsonl(
        tmp_path / "uniform" / "generations" / "source_beam.verdicts.jsonl"
    )
    assert e_var["protocol"]["preset"] == "sampled" and e_var["protocol"]["split"] == "test"

    # a second invocation of a finished run generates nothing
    run_btp(_cfg(pair, tmp_path / "ref", cache), log=lambda m: None)
    assert read_jsonl(tmp_path / "ref" / "generated.jsonl")[-1]["total"] == 0


@pytest.mark.slow
def test_slices_give_each_iteration_fresh_problems_on_the_validation_split(pair, tmp_path):
    out = tmp_path / "run"
    comp = run_btp(
        _cfg(
            pair,
            out,
            tmp_path / "cache",
            n_iterations=2,
            iteration_problems="slices",
            eval_split="validation",
            min_pass_rate=0.0,
        ),
        log=lambda m: None,
    )
    assert comp["iteration_problem_counts"] == [2, 2] and comp["eval_split"] == "validation"
    s1 = json.loads((out / "iter_1" / "stats.json").read_text())
    s2 = json.loads((out / "iter_2" / "stats.json").read_text())
    assert s1["generation"]["source"]["generated_new"] == 2 * 2 == s2["generation"]["source"]["generated_new"]
    buf = read_jsonl(out / "replay_buffer.jsonl")
    by_iter = {
        1: {r["task_id"] for r in buf if r["iteration"] == 1},
        2: {r["task_id"] for r in buf if r["iteration"] == 2},
    }
    assert by_iter[1] and by_iter[2] and not (by_iter[1] & by_iter[2])
    from codedistill.data import load_problems

    val_ids = [p.task_id for p in load_problems("synth", "validation", max_problems=3)]
    assert [r["task_id"] for r in read_jsonl(out / "eval" / "target_iter0" / "synth" / "results.jsonl")][::2] == val_ids


def test_paper_protocol_and_validation_split_choose_the_eval_problems():
    from codedistill.btp.phases.evaluate import protocol_record
    from codedistill.btp.plan import ResolvedInputs

    base = dict(
        source_model="tiny-source",
        target_model="tiny-target",
        dataset="mbpp",
        max_problems=5,
        eval_max_problems=4,
        eval_datasets=["humaneval"],
        drop_overlap=True,
    )
    plan = ResolvedInputs(build_config({}, {**base, "eval_protocol": "paper"}))
    # the paper preset puts each benchmark's EvalPlus version beside it
    assert plan.eval_shots == {"mbpp": 3, "mbpp+": 3, "humaneval": 0, "humaneval+": 0}
    # MBPP+ held out whole, less its 108 tasks in MBPP's train split and the shots 2-4
    assert plan.eval_eligible["mbpp+"] == 378 - 108 - 3 and plan.eval_eligible["humaneval+"] == 164
    assert [p.task_id for p in plan.evals["mbpp+"]] == ["Mbpp/6", "Mbpp/7", "Mbpp/8", "Mbpp/9"]
    first = plan.evals["mbpp"][0]
    assert first.task_id.endswith("11") and first.prompt.count("[BEGIN]") == 4  # tasks 2, 3, 4 + the problem
    rec = protocol_record(plan, "mbpp")
    assert rec == {
        "preset": "paper",
        "shots": 3,
        "temperature": 0.0,
        "top_p": 0.95,
        "num_samples": 1,
        "split": "test",
        "n_problems": 4,
        "method": "plain",
    }
    plus = protocol_record(plan, "mbpp+")
    assert (plus["split"], plus["n_problems"], plus["n_eligible"]) == ("all", 4, 267)
    assert [(x["n"], x["task_ids"][:2]) for x in plus["excluded"]] == [
        (3, ["Mbpp/2", "Mbpp/3"]),
        (108, ["Mbpp/602", "Mbpp/603"]),
    ]
    val = ResolvedInputs(build_config({}, {**base, "eval_split": "validation"}))
    assert list(val.evals) == ["mbpp"] and val.skipped_evals == ["humaneval"]
    assert [int(p.task_id.split("/")[-1]) for p in val.evals["mbpp"]] == [511, 512, 513, 514]


def test_iteration_metrics_for_trackers(tmp_path):
    from codedistill.btp.tracking import flat_metrics, log_iteration

    m = {"synth": {"pass@1": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}, "n_problems": 3, "num_samples": 2}}
    assert flat_metrics(m) == {
        "eval/synth/pass@1": 0.5,
        "eval/synth/pass@1_ci_low": 0.4,
        "eval/synth/pass@1_ci_high": 0.6,
    }
    log_iteration([], tmp_path, 1, m)  # no tracker: nothing written
    assert not any(tmp_path.iterdir())
    # tensorboard is in the dev extra: offline, real event files, read back with its own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_iteration(["tensorboard"], tmp_path, 1, m)
    log_iteration(["tensorboard"], tmp_path, 2, {"synth": {"pass@1": {"value": 0.75, "ci_low": 0.5, "ci_high": 1.0}}})
    files = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert files
    got = {}
    for d in sorted({f.parent for f in files}):
        acc = EventAccumulator(str(d))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            got.setdefault(tag, []).extend((e.step, round(e.value, 6)) for e in acc.Scalars(tag))
    assert sorted(got["eval/synth/pass@1"]) == [(1, 0.5), (2, 0.75)]
