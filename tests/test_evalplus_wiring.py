"""HumanEval+ / MBPP+ wherever a dataset is named: `codedistill evaluate`, the one judging
function (evaluation.execute), bad input (unknown task ids, programs that print megabytes
or return unpicklable values, canonical solutions that fail on an input), and the reports
(report.md, HTML, cross-run table, matrix) with base and plus side by side and the leakage
guard's protocol line. The BTP run on MBPP evaluated on MBPP+ is in test_btp_e2e.py; the
verdicts against evalplus itself in test_evalplus_parity.py."""

from __future__ import annotations

import json
import subprocess
import sys
from html import unescape

import pytest

from codedistill.data import load_problems
from codedistill.data.evalplus import EvalPlusTask
from codedistill.data.problem import Problem
from codedistill.evaluation import execute, score
from codedistill.execution import SandboxPool
from codedistill.results import Estimate, PairedDifference
from html_tables import Tables


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def evaluate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "codedistill", "evaluate", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_evaluate_cli_on_mbpp_plus_reports_base_and_plus(tmp_path, cache):
    import os

    problems = {p.task_id: p for p in load_problems("mbpp+", "all")}
    p2, p3 = problems["Mbpp/2"], problems["Mbpp/3"]
    rows = [
        {"task_id": "Mbpp/2", "solution": p2.reference},  # EvalPlus's own sample shape
        {"task_id": "Mbpp/2", "program": "def similar_elements(a, b):\n    return None\n"},
        {"task_id": "Mbpp/3", "completion": p3.reference},
        {"task_id": "Mbpp/3", "program": "def is_not_prime(n):\n    return n in (1, 10, 35)\n"},
    ]
    s = tmp_path / "s.jsonl"
    s.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = evaluate(str(s), "--dataset", "mbpp+", "--workers", "2", env=dict(os.environ, CODEDISTILL_CACHE=str(cache)))
    assert p.returncode == 0, p.stderr[-2000:]
    res = [json.loads(line) for line in (tmp_path / "s_results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["base_passed"], r["plus_passed"], r["passed"]) for r in res] == [
        ("Mbpp/2", True, True, True),
        ("Mbpp/2", False, False, False),
        ("Mbpp/3", True, True, True),
        ("Mbpp/3", True, False, False),  # passes MBPP's three asserts (the base inputs), not the plus ones
    ]
    assert res[3]["result"].startswith("failed: plus input")
    m = json.loads(p.stdout)
    assert m["pass@1"]["value"] == m["plus"]["pass@1"]["value"] == 0.5
    assert m["base"]["pass@1"]["value"] == 0.75
    assert (m["n_problems"], m["num_samples"]) == (2, 2)
    assert "mbpp+ pass@1: base 0.750 [" in p.stderr and ", plus 0.500 [" in p.stderr
    assert not (tmp_path / "s_results.jsonl.tmp").exists()


def test_evalplus_dataset_names_and_the_judging_test_need_no_evalplus_import():
    """codedistill.data names the EvalPlus datasets (the releases' keys), and evaluation tells
    their problems apart without importing codedistill.data.evalplus for the others."""
    from codedistill.data import EVALPLUS_DATASETS
    from codedistill.data.evalplus import RELEASES
    from codedistill.evaluation import is_evalplus

    assert EVALPLUS_DATASETS == tuple(RELEASES)
    code = (
        "import sys, codedistill.evaluation as e; from codedistill.data import load_problems;"
        "p = load_problems('humaneval')[0]; print(e.is_evalplus(p), e.warm_targets_of('humaneval'),"
        "'codedistill.data.evalplus' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "[]", "False"], out.stdout + out.stderr
    plus = load_problems("humaneval+", max_problems=1)[0]
    assert is_evalplus(plus) and not is_evalplus(load_problems("humaneval", max_problems=1)[0])


def test_unknown_task_ids_are_all_named_with_the_dataset(tmp_path):
    s = tmp_path / "bad.jsonl"
    rows = [
        {"task_id": "Mbpp/2", "completion": "x"},
        {"task_id": "Mbpp/601", "completion": "x"},  # an MBPP task that is not in MBPP+
        {"task_id": "HumanEval/0", "completion": "x"},
        {"task_id": "Mbpp/601", "completion": "x"},
    ]
    s.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = evaluate(str(s), "--dataset", "mbpp+")
    assert p.returncode == 2
    assert (
        f"{s}:2: unknown task_id 'Mbpp/601' for dataset mbpp+ (2 unknown id(s) in all: 'Mbpp/601' (line 2), "
        "'HumanEval/0' (line 3); its 378 ids look like 'Mbpp/2'); check --dataset and --split."
    ) in " ".join(p.stderr.split())
    assert not (tmp_path / "bad_results.jsonl").exists()


def test_hostile_programs_get_per_sample_verdicts(cache):
    problems = {p.task_id: p for p in load_problems("mbpp+", "all")}
    p = problems["Mbpp/17"]  # square_perimeter(a) -> 4 * a
    ref, name = p.reference, p.entry_point
    programs = [
        ref,
        # megabytes on the program's own stdout, and straight to the process's fd 1
        f"import os, sys\nprint('x' * 5_000_000)\nos.write(1, b'y' * 3_000_000)\n"
        f"sys.__stdout__.write('z' * 3_000_000)\n{ref}",
        f"{ref}\n_inner = {name}\ndef {name}(*a):\n    print('w' * 1_000_000)\n    return _inner(*a)\n",
        f"def {name}(*a):\n    return (lambda: 1)\n",  # unpicklable return value
        f"def {name}(*a):\n    return (i for i in range(3))\n",  # a generator: unpicklable too
        "class Weird:\n    def __reduce__(self):\n        raise TypeError('no')\n"
        f"def {name}(*a):\n    return Weird()\n",
        f"def {name}(*a):\n    raise MemoryError\n",
        "def something_else(a):\n    return 4 * a\n",
    ]
    with SandboxPool(workers=2) as pool:
        rows = execute([(prog, p) for prog in programs], pool=pool)
    assert [(r["base_passed"], r["plus_passed"]) for r in rows] == [(True, True)] * 3 + [(False, False)] * 5
    assert all(r["passed"] == r["plus_passed"] for r in rows)
    assert [r["result"] for r in rows[3:6]] == ["failed: base input 0: wrong output"] * 3
    assert rows[6]["result"] == "failed: base input 0: raised MemoryError"
    assert rows[7]["result"] == "failed: NameError: the program defines no square_perimeter"


def _toy_problem() -> Problem:
    """A task whose canonical solution raises on one base input and returns an unpicklable
    value on one plus input: both inputs are dropped from its tests and the task is flagged."""
    canonical = (
        "def halve(x):\n"
        "    if x == 3:\n"
        "        raise ValueError('odd')\n"
        "    if x == 5:\n"
        "        return lambda: x\n"
        "    return x // 2\n"
    )
    task = EvalPlusTask("mbpp+", "Mbpp/9998", "halve", canonical, "", ((2,), (3,), (4,)), ((5,), (8,)), 0.0)
    return Problem("Mbpp/9998", "", "halve", (), meta={"evalplus": task})


def test_flagged_task_reaches_rows_and_summary(cache):
    p = _toy_problem()
    programs = ["def halve(x):\n    return x // 2\n", "def halve(x):\n    return x >> 1 if x < 6 else 0\n"]
    with SandboxPool(workers=1) as pool:
        rows = execute([(prog, p) for prog in programs], pool=pool)
    assert [(r["base_passed"], r["plus_passed"]) for r in rows] == [(True, True), (True, False)]
    flags = [
        "1 base input(s) dropped: the canonical solution raised ValueError",
        "1 plus input(s) dropped: the canonical output cannot be pickled",
    ]
    assert rows[0]["evalplus_flags"] == flags
    m = score([{"task_id": p.task_id, **r} for r in rows])
    assert m["evalplus_flagged_tasks"] == {"Mbpp/9998": flags}
    assert (m["base"]["pass@1"]["value"], m["pass@1"]["value"]) == (1.0, 0.5)


# ----------------------------------------------------------------------------- reports


def est(v: float) -> dict:
    return Estimate(v, v - 0.05, v + 0.05).to_dict()


def diff(before: float, after: float) -> dict:
    d = after - before
    return PairedDifference(1, 267, before, after, Estimate(d, d - 0.04, d + 0.04), 0.01).to_dict()


def mbpp_plus_comparison() -> dict:
    """comparison.json of a BTP run on MBPP evaluated on MBPP+ under the paper preset (the
    shape btp/phases/evaluate.py writes)."""
    excluded = [
        {"reason": "the 3-shot prompt's examples (MBPP tasks 2, 3, 4): it holds their solutions", "n": 3},
        {"reason": "in MBPP's train split (tasks 601-974), which this run trains on (mbpp)", "n": 108},
    ]
    before = {"pass@1": est(0.30), "base": {"pass@1": est(0.40)}, "plus": {"pass@1": est(0.30)}}
    after = {"pass@1": est(0.35), "base": {"pass@1": est(0.47)}, "plus": {"pass@1": est(0.35)}}
    return {
        "source_model": "tiny-source",
        "target_model": "tiny-target",
        "mode": "finetune",
        "train_dataset": "mbpp",
        "n_train_problems": 374,
        "n_iterations": 1,
        "seed": 0,
        "allow_overlap": False,
        "overlapping_train_problems": [],
        "eval_protocol": "paper",
        "datasets": {
            "mbpp+": {
                "n_problems": 267,
                "protocol": {
                    "preset": "paper",
                    "shots": 3,
                    "temperature": 0.0,
                    "top_p": 0.95,
                    "num_samples": 1,
                    "split": "all",
                    "n_problems": 267,
                    "method": "plain",
                    "excluded": excluded,
                    "n_eligible": 267,
                },
                "target_before": before,
                "target_after": after,
                "target_per_iteration": {"target_iter0": before, "target_iter1": after},
                "improvement": {"pass@1": diff(0.30, 0.35)},
                "improvement_base": {"pass@1": diff(0.40, 0.47)},
            }
        },
    }


PROTOCOL_LINE = (
    "Protocol: mbpp+ all split, 267 problems (267 of 378 kept; left out: 3 the 3-shot prompt's examples "
    "(MBPP tasks 2, 3, 4): it holds their solutions; 108 in MBPP's train split (tasks 601-974), which this "
    "run trains on (mbpp)), 3-shot, greedy; preset paper."
)


def test_btp_report_md_shows_base_and_plus_and_what_was_kept():
    from codedistill.btp.config import build_config
    from codedistill.report.btp_run import run_markdown

    cfg = {"config": build_config({}, {"dataset": "mbpp", "eval_protocol": "paper"}).model_dump()}
    comp = mbpp_plus_comparison()
    lines = run_markdown(cfg, comp, []).splitlines()
    assert PROTOCOL_LINE in lines
    assert "| model | base pass@1 | plus pass@1 |" in lines
    assert "| target before (tiny-target) | 0.400 [0.350, 0.450] | 0.300 [0.250, 0.350] |" in lines
    assert "| target after iteration 1 | 0.470 [0.420, 0.520] | 0.350 [0.300, 0.400] |" in lines
    assert (
        "- pass@1: base +0.070 [+0.030, +0.110], p(no improvement) = 0.010; "
        "plus +0.050 [+0.010, +0.090], p(no improvement) = 0.010"
    ) in lines
    verdict = next(line for line in lines if line.startswith("Not comparable"))
    assert "267 of the 378 test problems" in verdict and "108 in MBPP's train split" in verdict


def test_html_report_and_matrix_show_base_beside_plus(tmp_path):
    from codedistill.experiments.matrix import evalplus_cells, write_outputs
    from codedistill.report.build import render_report

    comp = mbpp_plus_comparison()
    run = tmp_path / "mx" / "runs" / "a"
    run.mkdir(parents=True)
    (run / "comparison.json").write_text(json.dumps(comp))
    (run / "config.json").write_text(json.dumps({"kind": "btp", "config": {"dataset": "mbpp"}}))
    row = {
        "config": "configs/a.yaml",
        "run_dir": str(run),
        "source": "tiny-source",
        "target": "tiny-target",
        "same_family": False,
        "dataset": "mbpp",
        "before": est(0.2),
        "after": est(0.25),
        "gain": diff(0.2, 0.25),
        "status": "done",
        "evalplus": evalplus_cells(comp),
    }
    write_outputs(tmp_path / "mx", [row])
    md = (tmp_path / "mx" / "matrix.md").read_text()
    assert (
        "| a.yaml | mbpp+ | 267 | 0.400 [0.350, 0.450] | 0.470 [0.420, 0.520] | +0.070 [+0.030, +0.110] | "
        "0.300 [0.250, 0.350] | 0.350 [0.300, 0.400] | +0.050 [+0.010, +0.090] |"
    ) in md
    html = render_report([run, tmp_path / "mx"], tmp_path / "rep")["html"].read_text()
    t = Tables()
    t.feed(html)
    assert t.tables["btp-passk-mbpp+"][0] == [
        "target before (tiny-target)",
        "0.400 [0.350, 0.450]",
        "0.300 [0.250, 0.350]",
    ]
    imps = {r[0]: r[3] for r in t.tables["btp-improvement-mbpp+"]}
    assert imps == {"base pass@1": "+0.070 [+0.030, +0.110]", "plus pass@1": "+0.050 [+0.010, +0.090]"}
    assert t.tables["matrix-evalplus"][0][1:] == [
        "mbpp+",
        "mbpp+ all (267 of 378 kept), 3-shot, greedy",
        "0.400 [0.350, 0.450]",
        "0.470 [0.420, 0.520]",
        "+0.070 [+0.030, +0.110]",
        "0.300 [0.250, 0.350]",
        "0.350 [0.300, 0.400]",
        "+0.050 [+0.010, +0.090]",
    ]
    cross = next(r for r in t.tables["cross-run"] if "mbpp+ all" in r[2])
    assert cross[3:9] == [
        "0.300 [0.250, 0.350]",
        "0.350 [0.300, 0.400]",
        "+0.050 [+0.010, +0.090]",
        "0.400 [0.350, 0.450]",
        "0.470 [0.420, 0.520]",
        "+0.070 [+0.030, +0.110]",
    ]
    assert PROTOCOL_LINE in " ".join(unescape(html).split())


def test_protocol_verdicts_of_the_evalplus_sets():
    from codedistill.report.protocol import Protocol, comparability

    he = comparability(Protocol("humaneval+", "test", 164, 0, 0.0))
    assert he.level == "yes" and "judged as evalplus judges" in he.describe()
    full = comparability(Protocol("mbpp+", "all", 378, 3, 0.0))
    assert full.level == "partly" and "EvalPlus's docstring prompt" in full.describe()
    assert comparability(Protocol("mbpp+", "all", 378, 0, 0.0)).level == "partly"
    sub = comparability(Protocol("mbpp+", "test", 224, 0, 0.0))
    assert sub.level == "no" and "published numbers are on all tasks of the release (--split all)" in sub.describe()


def test_mbpp_plus_guard_leaves_out_the_split_a_sweep_chose_on():
    """A sweep's trials are scored on MBPP's validation split (511-600); its best trial's
    test evaluation on MBPP+ leaves out MBPP+'s 39 tasks there, and its protocol line says
    so. What is left out is derived from the trials' config (scored_mbpp_splits)."""
    from codedistill.btp.config import build_config
    from codedistill.btp.phases.evaluate import protocol_record
    from codedistill.btp.plan import ResolvedInputs, scored_mbpp_splits
    from codedistill.data import heldout_problems
    from codedistill.experiments.sweep import OBJECTIVE_SPLIT
    from codedistill.report.protocol import btp_protocol

    def trials(**kw):
        return build_config({}, {"eval_split": OBJECTIVE_SPLIT, **kw})

    assert scored_mbpp_splits(trials(dataset="mbpp")) == ("validation",)
    assert scored_mbpp_splits(trials(dataset="synth")) == ()  # nothing of MBPP scored: nothing left out
    assert scored_mbpp_splits(trials(dataset="synth", eval_datasets=["mbpp+"])) == ("validation",)
    assert scored_mbpp_splits(build_config({}, {"dataset": "mbpp"})) == ("test",)

    chosen_on = scored_mbpp_splits(trials(dataset="mbpp"))
    kept, excluded = heldout_problems("mbpp+", "all", shots=3, trains_on="mbpp", chosen_on=chosen_on)
    assert len(kept) == 378 - 3 - 108 - 39 == 228
    assert [len(x["task_ids"]) for x in excluded] == [3, 108, 39]
    assert all(511 <= int(t.split("/")[1]) <= 600 for t in excluded[2]["task_ids"])
    assert not any(511 <= int(p.task_id.split("/")[1]) <= 600 for p in kept)
    # MBPP's own test split shares no task with its validation split: nothing more left out
    mbpp, mbpp_excluded = heldout_problems("mbpp", "test", trains_on="mbpp", chosen_on=chosen_on)
    assert (len(mbpp), mbpp_excluded) == (500, [])

    test_cfg = build_config({}, {"dataset": "mbpp", "eval_protocol": "paper", "max_problems": 5})
    plan = ResolvedInputs(test_cfg, chosen_on=chosen_on)
    rec = protocol_record(plan, "mbpp+")
    assert (rec["n_eligible"], [x["n"] for x in rec["excluded"]]) == (228, [3, 108, 39])
    assert "mbpp" not in plan.eval_excluded or not plan.eval_excluded["mbpp"]
    comp = {"eval_protocol": "paper", "datasets": {"mbpp+": {"n_problems": rec["n_problems"], "protocol": rec}}}
    line = "Protocol: " + btp_protocol({"config": test_cfg.model_dump()}, comp, "mbpp+").describe() + "."
    assert line == (
        "Protocol: mbpp+ all split, 228 problems (228 of 378 kept; left out: 3 the 3-shot prompt's examples "
        "(MBPP tasks 2, 3, 4): it holds their solutions; 108 in MBPP's train split (tasks 601-974), which this "
        "run trains on (mbpp); 39 in MBPP's validation split (tasks 511-600), on which this run's settings were "
        "chosen), 3-shot, greedy; preset paper."
    )
    # without chosen_on (an ordinary run on the test split) the 39 stay
    assert ResolvedInputs(test_cfg).eval_eligible["mbpp+"] == 267


def test_ablation_tables_show_base_beside_plus(tmp_path):
    """ablate.write_outputs on two finished variant runs (comparison.json and the last
    evaluation's results.jsonl, in the shapes the BTP loop writes) evaluated on MBPP and
    MBPP+: the MBPP+ table shows base beside plus, and the paired differences to the full
    method are computed from base_passed and passed respectively."""
    from codedistill.btp.config import build_config
    from codedistill.experiments.ablate import write_outputs
    from codedistill.report.build import render_report

    tasks = ["Mbpp/11", "Mbpp/12", "Mbpp/14", "Mbpp/16"]

    def plus_rows(base, plus):
        return [{"task_id": t, "passed": p, "base_passed": b, "plus_passed": p} for t, b, p in zip(tasks, base, plus)]

    def mbpp_rows(passed):
        return [{"task_id": f"{i}", "passed": p} for i, p in zip((11, 12), passed)]

    before = {"mbpp": mbpp_rows([False, False]), "mbpp+": plus_rows([True, False, False, False], [False] * 4)}
    finals = {
        "full": {
            "mbpp": mbpp_rows([True, False]),
            "mbpp+": plus_rows([True, True, True, False], [True, False, True, False]),
        },
        "uniform": {"mbpp": mbpp_rows([False, False]), "mbpp+": plus_rows([True, True, False, False], [False] * 4)},
    }
    out = tmp_path / "abl"
    results = {}
    for name, final in finals.items():
        run = out / "variants" / name
        datasets = {}
        for ds, rows in final.items():
            d = run / "eval" / "target_iter1" / ds
            d.mkdir(parents=True)
            (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            datasets[ds] = {
                "n_problems": len(rows),
                "target_before": score(before[ds]),
                "target_after": score(rows),
                "improvement": {},
            }
        results[name] = {"n_iterations": 1, "datasets": datasets}
        (run / "comparison.json").write_text(json.dumps(results[name]))
    ref = build_config(
        {}, {"dataset": "mbpp", "eval_protocol": "paper", "source_model": "tiny-source", "target_model": "tiny-target"}
    )
    rows = [
        {
            "name": n,
            "group": g,
            "description": n,
            "overrides": o,
            "kind": "btp",
            "cfg": ref,
            "run_name": n,
            "status": "pending",
        }
        for n, g, o in (("full", "reference", {}), ("uniform", "replay", {"sampling_method": "uniform"}))
    ]
    summary = write_outputs(out, "configs/x.yaml", ref, rows, results, {})
    full, uniform = summary["variants"]
    assert full["evalplus"]["mbpp+"]["diff"] is None
    assert uniform["evalplus"]["mbpp+"]["base"]["pass@1"]["value"] == 0.5
    assert uniform["evalplus"]["mbpp+"]["plus"]["pass@1"]["value"] == 0.0
    d = uniform["evalplus"]["mbpp+"]["diff"]
    assert (d["base"]["pass@1"]["diff"], d["plus"]["pass@1"]["diff"]) == (-0.25, -0.5)
    assert uniform["diff"]["pass@1"]["diff"] == -0.5  # the MBPP table as before
    md = (out / "ablation.md").read_text().splitlines()
    assert "| variant | dataset | tasks | base pass@1 | plus pass@1 | diff base pass@1 | diff plus pass@1 |" in md
    row = {line.split(" | ")[0]: line for line in md if "| mbpp+ |" in line}
    assert row["| full"].startswith("| full | mbpp+ | 4 | 0.750 [") and row["| full"].endswith(
        "| reference | reference |"
    )
    cells = row["| uniform"].strip("| ").split(" | ")
    assert cells[3].startswith("0.500 [") and cells[4] == "0.000 [0.000, 0.000]"
    assert cells[5].startswith("-0.250 [") and cells[6].startswith("-0.500 [")
    assert row["| target before training"].startswith("| target before training | mbpp+ | - | 0.250 [")

    (out / "variants" / "full" / "config.json").write_text(
        json.dumps({"kind": "btp", "config": {"dataset": "mbpp", "eval_protocol": "paper"}})
    )
    html = render_report([out], tmp_path / "rep")["html"].read_text()
    t = Tables()
    t.feed(html)
    table = {r[0]: r for r in t.tables["ablation-evalplus"]}
    assert table["full"][1:3] == ["mbpp+", "4"] and table["full"][5:] == ["reference", "reference"]
    assert table["uniform"][3:5] == [cells[3], cells[4]] and table["uniform"][5:] == [cells[5], cells[6]]
    assert table["target before BTP"][1:3] == ["mbpp+", "-"] and table["target before BTP"][3].startswith("0.250 [")
