"""`codedistill compare BEFORE AFTER`: paired pass@k of two runs' results.jsonl."""

import json

from typer.testing import CliRunner

from codedistill.cli import app
from codedistill.metrics import pass_at_k


def write_results(d, passes: dict[str, list[bool]]) -> None:
    d.mkdir()
    rows = [{"task_id": t, "sample_index": i, "passed": p} for t, ps in passes.items() for i, p in enumerate(ps)]
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_gives_the_paired_pass_at_k_of_two_runs(tmp_path):
    before = {"A": [True] + [False] * 9, "B": [False] * 10, "C": [True] * 10, "only_before": [True] * 10}
    after = {"A": [True] * 3 + [False] * 7, "B": [True] + [False] * 9, "C": [True] * 10}
    write_results(tmp_path / "b", before)
    write_results(tmp_path / "a", after)
    r = CliRunner().invoke(
        app, ["compare", str(tmp_path / "b"), str(tmp_path / "a"), "--out", str(tmp_path / "c.json")]
    )
    assert r.exit_code == 0, r.output
    rec = {x["k"]: x for x in json.loads((tmp_path / "c.json").read_text())["pass_at_k"]}
    assert sorted(rec) == [1, 5, 10]  # n = 10 samples each
    for k in (1, 5, 10):  # the shared problems only (A, B, C), unbiased pass@k per problem
        want_b = (pass_at_k(10, 1, k) + 0 + 1) / 3
        want_a = (pass_at_k(10, 3, k) + pass_at_k(10, 1, k) + 1) / 3
        assert rec[k]["n_problems"] == 3
        assert abs(rec[k]["before"] - want_b) < 1e-12 and abs(rec[k]["after"] - want_a) < 1e-12
        assert abs(rec[k]["value"] - (want_a - want_b)) < 1e-12
        assert rec[k]["ci_low"] <= rec[k]["value"] <= rec[k]["ci_high"]
    assert "pass@1 on 3 problems: 0.367 -> 0.467, change +0.100" in r.output


def test_compare_names_the_fix_for_a_directory_without_results(tmp_path):
    write_results(tmp_path / "b", {"A": [True]})
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["compare", str(tmp_path / "b"), str(tmp_path / "empty")])
    # (the console entry point prints a ConfigError as one line; here it is the exception)
    assert "no results.jsonl (give the output directory of a baseline run)" in str(r.exception)
    write_results(tmp_path / "other", {"Z": [True]})
    r = CliRunner().invoke(app, ["compare", str(tmp_path / "b"), str(tmp_path / "other")])
    assert "share no problem" in str(r.exception)
