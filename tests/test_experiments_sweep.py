"""`codedistill sweep`: Optuna TPE on the validation split with a journal-file storage; a
sweep killed with kill -9 mid-trial resumes that trial's run directory; a rerun of a
finished sweep generates nothing; the best trial is evaluated once on the test split."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from codedistill.runs import read_jsonl

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "step4_hparam_search.py"


def test_search_space_and_storage(tmp_path):
    import optuna

    from codedistill.btp.config import build_config
    from codedistill.experiments.sweep import make_storage, search_space, suggest

    cfg = build_config({}, {"use_lora": True, "learning_rate": 1e-3, "epochs": 2})
    space = search_space(cfg, 100)
    assert set(space) == {"sampling_alpha", "p2_alpha", "replay_size", "learning_rate", "lora_r", "epochs", "num_beams"}
    assert space["replay_size"]["choices"] == [50, 100, 200] and space["epochs"]["high"] == 4
    assert "num_beams" not in search_space(build_config({}, {"generation": "sample"}), 100)
    store, name = make_storage(tmp_path, None)
    assert name == f"journal:{tmp_path / 'optuna_journal.log'}"
    study = optuna.create_study(storage=store, study_name="s", sampler=optuna.samplers.TPESampler(seed=0))
    t = study.ask()
    p = suggest(t, space)
    assert 0.5 <= p["sampling_alpha"] <= 12 and p["num_beams"] in (3, 5) and p["replay_size"] in (50, 100, 200)
    # the journal file is the storage: a second process (here: a second storage object) sees the trial
    again = optuna.load_study(study_name="s", storage=make_storage(tmp_path, None)[0])
    assert again.trials[0].params == p


def test_places_count_over_workers_retries_keep_theirs_and_a_late_trial_is_surplus():
    """Real Optuna trials (in-memory study) as workers leave them: --trials 3."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from codedistill.experiments.sweep import holders, retried, root, surplus

    study = optuna.create_study()
    x = {"x": FloatDistribution(0, 1)}
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, params={"x": 0.1}, distributions=x))  # 0
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.2}, distributions=x))  # 1: killed
    retry = create_trial(
        state=TrialState.RUNNING,  # 2: trial 1 again, same run directory
        params={"x": 0.2},
        distributions=x,
        user_attrs={"run_number": 1},
        system_attrs={"failed_trial": 1, "retry_history": [1]},
    )
    study.add_trial(retry)
    study.add_trial(create_trial(state=TrialState.RUNNING))  # 3: a new trial
    study.add_trial(create_trial(state=TrialState.RUNNING))  # 4: asked at the same moment as 3
    trials = study.get_trials()
    assert retried(trials) == {1} and [root(t) for t in trials] == [0, 1, 1, 3, 4]
    assert [t.number for t in holders(trials)] == [0, 2, 3, 4]
    assert not surplus(trials, 3, 3) and surplus(trials, 4, 3)  # one of the two keeps the last place
    assert not surplus(trials, 2, 3)  # a retry keeps its original's place
    assert not surplus(trials, 4, 4)
    # a failure for real (not retried) holds its place
    study.add_trial(create_trial(state=TrialState.FAIL))  # 5
    assert surplus(study.get_trials(), 5, 4) and len(holders(study.get_trials())) == 5


@pytest.mark.slow
def test_a_resumed_study_proposes_new_parameters(tmp_path):
    """Real Optuna journal storage: open, run one startup trial, open again as a restarted
    process would, ask again: not the first trial's parameters (a bare-seed sampler repeats them)."""

    from codedistill.experiments.sweep import make_storage, open_study

    store, _ = make_storage(tmp_path, None)
    first = open_study("s", store, seed=0, n_trials=8)
    t = first.ask()
    x = t.suggest_float("x", 0, 1)
    first.tell(t, x)
    store2, _ = make_storage(tmp_path, None)
    again = open_study("s", store2, seed=0, n_trials=8).ask()
    assert again.suggest_float("x", 0, 1) != x


@pytest.mark.slow
def test_sweep_killed_mid_trial_resumes_and_rerun_generates_nothing(tmp_path):
    from codedistill.btp._testing import build_throwaway_pair

    src, tgt = build_throwaway_pair(tmp_path / "models")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        yaml.safe_dump(
            dict(
                source_model=str(src),
                target_model=str(tgt),
                dataset="synth",
                max_problems=4,
                eval_max_problems=2,
                num_beams=2,
                n_iterations=1,
                use_lora=True,
                lora_r=4,
                lora_alpha=8,
                eval_num_samples=2,
                max_new_tokens=12,
                train_batch_size=4,
                learning_rate=1e-3,
                epochs=1,
                chunk_size=2,
                workers=2,
                eval_source=False,
            )
        )
    )
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(SCRIPT), str(cfg), "--trials", "2", "--output-dir", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    # kill -9 once trial 0 has tested its first beams (its run directory is half done)
    deadline = time.time() + 600
    marker = out / "trials" / "0" / "generations" / "source_beam.verdicts.jsonl"
    while time.time() < deadline and not (marker.exists() and marker.stat().st_size > 0):
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "trials" / "0" / "comparison.json").exists()

    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "sweep.json").read_text())
    states = [t["state"] for t in s["trials"]]
    assert states.count("COMPLETE") == 2 and s["trials"][0]["state"] == "FAIL" and s["trials"][0]["interrupted"]
    resumed = next(t for t in s["trials"] if t["state"] == "COMPLETE" and t["run_dir"] == "trials/0")
    assert resumed["params"] == s["trials"][0]["params"]  # same parameters, same run directory
    # a new trial after the restart is a new point: a seeded sampler restarted from its seed
    # proposed trial 0's parameters again (seen in a demo-size sweep)
    fresh = [t for t in s["trials"] if t["state"] == "COMPLETE" and t["run_dir"] != "trials/0"]
    assert fresh and all(t["params"] != s["trials"][0]["params"] for t in fresh)
    starts = read_jsonl(out / "trials" / "0" / "starts.jsonl")
    assert [x["resumed"] for x in starts] == [False, True]
    assert (
        read_jsonl(out / "trials" / "0" / "generated.jsonl")[-1]["generated"]["source_beam"]
        < 4 * s["trials"][0]["params"]["num_beams"]
    )
    assert s["objective"] == "validation pass@1" and s["storage"].startswith("journal:")
    best = s["best"]
    assert best["value"] == max(t["value"] for t in s["trials"] if t["state"] == "COMPLETE")
    assert set(best["test_metrics"]) == {"pass@1"} and 0 <= best["test_metrics"]["pass@1"]["value"] <= 1
    test_comp = json.loads((out / best["test_run_dir"] / "comparison.json").read_text())
    assert test_comp["eval_split"] == "test"
    assert json.loads((out / best["run_dir"] / "comparison.json").read_text())["eval_split"] == "validation"
    assert yaml.safe_load((out / "best.yaml").read_text())["sampling_alpha"] == best["params"]["sampling_alpha"]
    assert (out / "plots" / "sweep_history.png").read_bytes()[:4] == b"\x89PNG"
    assert "| trial | state | value |" in (out / "sweep.md").read_text()

    # a third invocation runs nothing: no new trial, no trial rerun, no second test evaluation
    starts = {d: len(read_jsonl(d / "generated.jsonl")) for d in (out / "trials").iterdir()}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s2 = json.loads((out / "sweep.json").read_text())
    assert len(s2["trials"]) == len(s["trials"]) and s2["best"]["test_metrics"] == best["test_metrics"]
    assert {d: len(read_jsonl(d / "generated.jsonl")) for d in (out / "trials").iterdir()} == starts
    assert "nothing to run" in r.stderr + r.stdout
    test_gen = read_jsonl(out / best["test_run_dir"] / "generated.jsonl")
    assert len(test_gen) == 1 and test_gen[0]["generated"]["eval/target_iter1"] > 0
    assert "source_beam" not in test_gen[0]["generated"]  # the trial's adapter was evaluated, not retrained
