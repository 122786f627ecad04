"""HumanEval+ / MBPP+: codedistill's judge against ``evalplus.evaluate`` (0.3.1) itself.

The parity test writes one samples file per dataset (canonical solutions, programs that
print, mutants that fail only plus inputs, wrong programs, programs that never return),
runs ``evalplus.evaluate`` on it in a subprocess against the shipped data (unpacked, only
the chosen tasks, through ``HUMANEVAL_OVERRIDE_PATH`` / ``MBPP_OVERRIDE_PATH``; no network)
and requires codedistill's base and plus verdicts to equal evalplus's, sample by sample.
Allowed timing differences: none arise here, because no sample runs near its limit (the
programs that time out loop forever; the others finish in milliseconds). Limits above
the 1 s minimum would differ with the machine that measured the canonical times.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from codedistill.data import load_problems
from codedistill.data.evalplus import evalplus_task, release_path
from codedistill.errors import DataError
from codedistill.evalplus_judge import EvalPlusJudge

HUMANEVAL_TASKS = [
    "HumanEval/0",
    "HumanEval/2",
    "HumanEval/4",
    "HumanEval/13",
    "HumanEval/16",
    "HumanEval/32",
    "HumanEval/53",
    "HumanEval/116",
]
MBPP_TASKS = ["Mbpp/2", "Mbpp/3", "Mbpp/17", "Mbpp/124", "Mbpp/267", "Mbpp/558", "Mbpp/581", "Mbpp/737"]


def plus_only_mutant(problem) -> str:
    """The canonical program, except that on any input that is not a base input it
    returns a wrong value: it passes base and fails plus."""
    task = evalplus_task(problem)
    base = base64.b64encode(pickle.dumps([tuple(x) for x in task.base_input])).decode()
    name = task.entry_point
    return (
        f"{task.canonical_program}\n"
        "import base64 as _b, pickle as _p\n"
        f"_BASE = {{repr(x) for x in _p.loads(_b.b64decode({base!r}))}}\n"
        f"_orig = {name}\n"
        f"def {name}(*args):\n"
        "    key = repr(tuple(args))\n"
        "    out = _orig(*args)\n"
        "    return out if key in _BASE else ('wrong', out)\n"
    )


def samples_for(problem) -> list[tuple[str, str]]:
    ref, name = problem.reference, problem.entry_point
    programs = [
        ref,
        "print('x' * 2_000_000)\n" + ref,
        f"{ref}\n_inner = {name}\ndef {name}(*a):\n    print('y' * 100_000)\n    return _inner(*a)\n",
        plus_only_mutant(problem),
        f"def {name}(*args):\n    return None\n",
        f"def {name}(*args):\n    raise ValueError('no')\n",
        f"def {name}(*args):\n    while True:\n        pass\n",
        f"def {name}(*args):\n    return lambda: 1\n",
    ]
    return [(problem.task_id, p) for p in programs]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_judge_on_three_tasks(cache):
    problems = {p.task_id: p for p in load_problems("humaneval+", "test")}
    chosen = [problems[t] for t in ("HumanEval/0", "HumanEval/13", "HumanEval/53")]
    samples = [s for p in chosen for s in samples_for(p)]
    with EvalPlusJudge(chosen, workers=2) as judge:
        verdicts = judge.judge(samples)
        with pytest.raises(DataError, match=r"'HumanEval/999'.*'Nope/1'"):
            judge.judge([("HumanEval/999", "x = 1"), ("Nope/1", "x = 1"), ("HumanEval/0", "")])
    got = [(v.base_passed, v.plus_passed) for v in verdicts]
    per_task = [
        (True, True),
        (True, True),
        (True, True),
        (True, False),
        (False, False),
        (False, False),
        (False, False),
        (False, False),
    ]
    assert got == per_task * 3
    by_kind = verdicts[:8]
    assert by_kind[3].result.startswith("failed: plus input")
    assert by_kind[4].result == "failed: base input 0: wrong output"
    assert by_kind[5].result == "failed: base input 0: raised ValueError"
    assert by_kind[6].result.startswith("timed out: base input 0 (limit 1.00 s)")
    assert all(v.passed == v.plus_passed for v in verdicts)
    assert list((cache / "evalplus" / "HumanEvalPlus-v0.1.10").glob("HumanEval_13.*.pkl"))


def _write_subset(dataset: str, task_ids: list[str], path: Path) -> None:
    wanted = set(task_ids)
    with gzip.open(release_path(dataset), "rt", encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        for line in f:
            if line.strip() and json.loads(line)["task_id"] in wanted:
                out.write(line)


def _evalplus_verdicts(dataset: str, task_ids: list[str], samples, tmp_path: Path):
    data = tmp_path / f"{dataset}-data.jsonl"
    _write_subset(dataset, task_ids, data)
    sample_file = tmp_path / f"{dataset}-samples.jsonl"
    sample_file.write_text("".join(json.dumps({"task_id": t, "solution": s}) + "\n" for t, s in samples))
    name = "humaneval" if dataset == "humaneval+" else "mbpp"
    env = dict(
        os.environ,
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
        HUMANEVAL_OVERRIDE_PATH=str(data),
        MBPP_OVERRIDE_PATH=str(data),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "evalplus.evaluate",
            "--dataset",
            name,
            "--samples",
            str(sample_file),
            "--parallel",
            "2",
        ],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=600,
    )
    results = json.loads((tmp_path / f"{dataset}-samples_eval_results.json").read_text())
    seen: dict[str, int] = {}
    out = []
    for t, _ in samples:
        r = results["eval"][t][seen.setdefault(t, 0)]
        seen[t] += 1
        out.append((r["base_status"] == "pass", r["base_status"] == "pass" and r["plus_status"] == "pass"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dataset,task_ids", [("humaneval+", HUMANEVAL_TASKS), ("mbpp+", MBPP_TASKS)])
def test_verdicts_equal_evalplus(dataset, task_ids, cache, tmp_path):
    pytest.importorskip("evalplus", reason="make setup installs it (requirements-evalplus.txt)")
    problems = {p.task_id: p for p in load_problems(dataset, "all")}
    chosen = [problems[t] for t in task_ids]
    samples = [s for p in chosen for s in samples_for(p)]
    with EvalPlusJudge(chosen, workers=2) as judge:
        ours = [(v.base_passed, v.plus_passed) for v in judge.judge(samples)]
    theirs = _evalplus_verdicts(dataset, task_ids, samples, tmp_path)
    diffs = [(t, i % 8, o, e) for i, ((t, _), o, e) in enumerate(zip(samples, ours, theirs)) if o != e]
    assert not diffs
    assert any(b and not p for b, p in ours), "a plus-only mutant must pass base only"


def test_datasets_keep_mbpp_numbers_and_splits():
    from collections import Counter

    mbpp = load_problems("mbpp+", "all")
    assert Counter(p.split for p in mbpp) == {"test": 224, "train": 108, "validation": 39, "prompt": 7}
    assert len(load_problems("mbpp+", "train")) == 108
    assert len(load_problems("humaneval+", "test")) == 164
    p = next(p for p in mbpp if p.task_id == "Mbpp/124")
    assert isinstance(evalplus_task(p).base_input[0][1], complex)
    with pytest.raises(DataError, match="only a test split"):
        load_problems("humaneval+", "train")


def test_canonical_overrunning_the_cap_gets_a_longer_cap_then_is_kept_or_dropped(cache):
    """Reference cap 0.5 s, so the longer cap is 5 s: the canonical solution sleeps 2 s on
    input 4 (kept, its reference time is the cap, so its limit is 4 x 0.5 = 2 s) and 30 s
    on input 3 (dropped); the task is flagged with both reasons."""
    from codedistill.data.evalplus import EvalPlusTask
    from codedistill.data.problem import Problem
    from codedistill.evalplus_judge import long_cap, time_limits

    assert long_cap(0.5) == 5.0 and long_cap(20.0) == 200.0 and long_cap(60.0) == 200.0
    canonical = (
        "import time\n"
        "def double(x):\n"
        "    if x == 3:\n"
        "        time.sleep(30)\n"
        "    if x == 4:\n"
        "        time.sleep(2)\n"
        "    return 2 * x\n"
    )
    task = EvalPlusTask("mbpp+", "Mbpp/9999", "double", canonical, "", ((1,), (3,), (4,)), ((2,),), 0.0)
    problem = Problem("Mbpp/9999", "", "double", (), meta={"evalplus": task})
    programs = [
        "def double(x):\n    return x + x\n",
        "def double(x):\n    return x\n",
        "def double(x):\n    return 0 if x == 4 else x + x\n",  # wrong on the kept slow input only
        "import time\ndef double(x):\n    if x == 4:\n        time.sleep(4)\n    return x + x\n",
    ]
    with EvalPlusJudge([problem], workers=1, reference_cap_s=0.5) as judge:
        verdicts = judge.judge([("Mbpp/9999", p) for p in programs])
        ref = judge.references["Mbpp/9999"]
        assert judge.flags == {
            "Mbpp/9999": [
                "1 base input(s) dropped: the canonical solution overran 5 s (the 0.5 s reference cap, extended)",
                "1 base input(s) kept: the canonical solution overran the 0.5 s reference cap and finished "
                "within 5 s; its reference time is the cap",
            ]
        }
    assert ref.keep == {"base": [0, 2], "plus": [0]}
    assert ref.times["base"][1] == 0.5 and time_limits(ref.times["base"]) == [1.0, 2.0]
    assert [(v.base_passed, v.plus_passed) for v in verdicts] == [(True, True)] + [(False, False)] * 3
    assert verdicts[2].result == "failed: base input 1: wrong output"
    assert verdicts[3].result.startswith("timed out: base input 1 (limit 2.00 s)")
    cached = list((cache / "evalplus" / "MbppPlus-v0.2.0").glob("Mbpp_9999.*.pkl"))
    assert len(cached) == 1
    with EvalPlusJudge([problem], workers=1, reference_cap_s=0.5) as again:  # read back, not recomputed
        again.prepare(["Mbpp/9999"])
        assert again.flags == judge.flags and again.references["Mbpp/9999"].times == ref.times


@pytest.mark.slow
@pytest.mark.parametrize("dataset,task_ids", [("humaneval+", HUMANEVAL_TASKS[:3]), ("mbpp+", MBPP_TASKS[:3])])
def test_evaluate_cli_rows_equal_evalplus_eval_results(dataset, task_ids, cache, tmp_path):
    """`codedistill evaluate SAMPLES --dataset humaneval+|mbpp+` on EvalPlus's own sample
    shape (task_id + solution): row by row, base_passed / plus_passed equal evalplus's
    base_status / plus_status in its eval_results.json, and the summary's base and plus
    pass@1 are their means."""
    pytest.importorskip("evalplus", reason="make setup installs it (requirements-evalplus.txt)")
    problems = {p.task_id: p for p in load_problems(dataset, "all")}
    samples = [s for t in task_ids for s in samples_for(problems[t])]
    sample_file = tmp_path / "cli-samples.jsonl"
    sample_file.write_text("".join(json.dumps({"task_id": t, "solution": s}) + "\n" for t, s in samples))
    p = subprocess.run(
        [sys.executable, "-m", "codedistill", "evaluate", str(sample_file), "--dataset", dataset, "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, CODEDISTILL_CACHE=str(cache)),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "cli-samples_results.jsonl").read_text().splitlines()]
    ours = [(r["base_passed"], r["plus_passed"]) for r in rows]
    theirs = _evalplus_verdicts(dataset, task_ids, samples, tmp_path)
    assert [r["task_id"] for r in rows] == [t for t, _ in samples]
    assert ours == theirs
    metrics = json.loads(p.stdout)
    n = len(samples)
    assert metrics["base"]["pass@1"]["value"] == pytest.approx(sum(b for b, _ in theirs) / n)
    assert (
        metrics["plus"]["pass@1"]["value"] == metrics["pass@1"]["value"] == pytest.approx(sum(x for _, x in theirs) / n)
    )
