from pathlib import Path

import pytest

from codedistill.data import load_problems
from codedistill.data.mbpp import load_mbpp
from codedistill.errors import DataError

MBPP_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp"


def test_mbpp_standard_splits():
    sizes = {s: len(load_problems("mbpp", s)) for s in ("prompt", "test", "validation", "train")}
    assert sizes == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    test = load_problems("mbpp", "test")
    assert test[0].task_id == "Mbpp/11" and test[-1].task_id == "Mbpp/510"
    san = load_problems("mbpp-sanitized", "all")
    assert len(san) == 427 and len(load_problems("mbpp-sanitized", "test")) == 257


def test_mbpp_prompt_is_the_papers_format():
    p = load_problems("mbpp", "test", max_problems=1)[0]
    assert p.prompt.startswith("You are an expert Python programmer, and here is your task: ")
    assert all(t.strip() in p.prompt for t in p.tests) and p.prompt.endswith("[BEGIN]\n")
    assert p.entry_point == "remove_Occ" and p.code_prefix == ""
    three = load_problems("mbpp", "test", max_problems=1, shots=3)[0]
    assert three.prompt.count("[BEGIN]") == 4 and three.prompt.count("[DONE]") == 3
    assert three.prompt.endswith(p.prompt)


def test_mbpp_setup_code_kept():
    p = {q.task_id: q for q in load_problems("mbpp", "test")}["Mbpp/367"]
    assert "root = Node(1)" in p.test_setup


def test_humaneval_all_164():
    ps = load_problems("humaneval")
    assert len(ps) == 164 and ps[0].task_id == "HumanEval/0"
    assert ps[0].program(ps[0].reference_completion()) == ps[0].reference
    assert ps[0].tests == ("check(has_close_elements)",)


def test_missing_and_malformed_files_name_path_and_fix(tmp_path):
    with pytest.raises(DataError, match="not found.*--data-path"):
        load_mbpp("full", tmp_path / "nope")
    bad = tmp_path / "mbpp.jsonl"
    good = (MBPP_DIR / "mbpp.jsonl").read_text().splitlines()[0]
    bad.write_text(good + "\n{not json\n")
    with pytest.raises(DataError, match=r"mbpp.jsonl:2: malformed JSON"):
        load_mbpp("full", bad)
    with pytest.raises(DataError, match="Unknown dataset"):
        load_problems("mbqq")
