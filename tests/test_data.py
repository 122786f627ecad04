import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import codedistill
from codedistill.data import load_problems
from codedistill.data.mbpp import SOURCE_VAR, chosen_source, load_mbpp, packaged_dir
from codedistill.errors import DataError
from codedistill.resources import resource_path


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
    good = (packaged_dir() / "mbpp.jsonl").read_text().splitlines()[0]
    bad.write_text(good + "\n{not json\n")
    with pytest.raises(DataError, match=r"mbpp.jsonl:2: malformed JSON"):
        load_mbpp("full", bad)
    with pytest.raises(DataError, match="Unknown dataset"):
        load_problems("mbqq")


def test_mbpp_ships_with_the_package_with_its_notice_and_checksums():
    notice = (packaged_dir() / "NOTICE").read_text()
    assert "CC BY 4.0" in notice and "Austin" in notice and "google-research/google-research" in notice
    for name in ("mbpp.jsonl", "sanitized-mbpp.json"):
        digest = hashlib.sha256((packaged_dir() / name).read_bytes()).hexdigest()
        assert re.search(rf"{re.escape(name)} +sha256 {digest}\n", notice)


def test_mbpp_loads_offline_from_anywhere_without_datasets(tmp_path):
    """Outside the checkout, with the hub switched off: the packaged files, no `datasets`."""
    src = Path(codedistill.__file__).parents[1]
    code = (
        "import sys; from codedistill.data import load_problems; "
        "print(len(load_problems('mbpp', 'all')), len(load_problems('mbpp-sanitized', 'all')), "
        "'datasets' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != SOURCE_VAR}
    env.update(PYTHONPATH=str(src), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["974", "427", "False"]


def test_mbpp_source_is_package_unless_the_hub_is_asked_for(monkeypatch):
    monkeypatch.delenv(SOURCE_VAR, raising=False)
    assert chosen_source() == "package"
    monkeypatch.setenv(SOURCE_VAR, "hub")
    assert chosen_source() == "hub" and chosen_source("package") == "package"
    monkeypatch.setenv(SOURCE_VAR, "hf")
    with pytest.raises(DataError, match=f"'hf' \\(from {SOURCE_VAR}\\).*package or hub"):
        load_mbpp("full")
    # an explicit local copy wins over the hub setting
    monkeypatch.setenv(SOURCE_VAR, "hub")
    assert len(load_mbpp("sanitized", packaged_dir())) == 427


def test_resources_are_found_through_the_package():
    for name in ("ddp", "fsdp", "zero2", "zero3"):
        assert "distributed_type:" in resource_path(f"assets/accelerate/{name}.yaml").read_text()
    assert resource_path("data/files/evalplus/MbppPlus-v0.2.0.jsonl.gz").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="reinstall codedistill"):
        resource_path("assets/accelerate/nope.yaml")
