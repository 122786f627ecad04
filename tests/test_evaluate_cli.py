"""`codedistill evaluate`: canonical solutions score 1.0; bad input names the line."""

import json
import subprocess
import sys
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
