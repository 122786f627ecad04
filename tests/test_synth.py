"""The synth dataset: deterministic, disjoint splits, MBPP-format prompts, passing references."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from codedistill.data.problem import Problem
from codedistill.data.synth import (
    SYNTH_FAMILIES,
    SYNTH_SPLIT_SIZES,
    SYNTH_STOP,
    TEMPLATES,
    load_synth,
    split_of_key,
)


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Problem]]:
    return {s: load_synth(s) for s in SYNTH_SPLIT_SIZES}


def test_sizes_and_ids(splits: dict[str, list[Problem]]) -> None:
    assert SYNTH_SPLIT_SIZES == {"train": 2000, "validation": 200, "test": 200}
    for split, probs in splits.items():
        assert len(probs) == SYNTH_SPLIT_SIZES[split]
        assert [p.task_id for p in probs] == [f"synth/{split}/{i}" for i in range(len(probs))]
        assert all(p.split == split and p.dataset == "synth" for p in probs)
    assert len(load_synth("test", n=17)) == 17
    assert load_synth("test", n=0) == []


def test_deterministic(splits: dict[str, list[Problem]]) -> None:
    again = load_synth("test")
    assert [p.to_dict() for p in again] == [p.to_dict() for p in splits["test"]]
    # n gives a prefix of the full split
    assert [p.to_dict() for p in load_synth("test", n=25)] == [p.to_dict() for p in splits["test"][:25]]
    other = load_synth("test", seed=1)
    assert [p.prompt for p in other] != [p.prompt for p in splits["test"]]


def test_splits_disjoint(splits: dict[str, list[Problem]]) -> None:
    keys = {s: {p.meta["key"] for p in probs} for s, probs in splits.items()}
    for s, ks in keys.items():
        assert len(ks) == len(splits[s]), f"duplicate problems in {s}"
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    # also across seeds: the split is a function of the key alone
    other_train = {p.meta["key"] for p in load_synth("train", n=500, seed=7)}
    assert not other_train & keys["test"]
    assert all(split_of_key(k) == "test" for k in keys["test"])
    # no prompt or reference+description pair leaks either
    assert not {p.prompt for p in splits["train"]} & {p.prompt for p in splits["test"]}


def test_families(splits: dict[str, list[Problem]]) -> None:
    assert set(SYNTH_FAMILIES) == {"arithmetic", "strings", "lists", "conditionals", "compositions"}
    assert {t.family for t in TEMPLATES} == set(SYNTH_FAMILIES)
    per_family = Counter(t.family for t in TEMPLATES)
    assert all(n >= 8 for n in per_family.values()), per_family
    for split in ("train", "test"):
        fams = Counter(p.meta["family"] for p in splits[split])
        assert set(fams) == set(SYNTH_FAMILIES)
        assert min(fams.values()) >= len(splits[split]) // 10, fams
    only = load_synth("train", n=50, families=["strings"])
    assert {p.meta["family"] for p in only} == {"strings"}
    with pytest.raises(ValueError):
        load_synth("train", families=["nope"])
    with pytest.raises(ValueError):
        load_synth("dev")


def test_prompt_format(splits: dict[str, list[Problem]]) -> None:
    for p in splits["test"]:
        assert p.prompt.startswith(
            "You are an expert Python programmer, and here is your task: " + p.description + " "
            "Your code should pass these tests:\n\n"
        )
        assert p.prompt.endswith("\n[BEGIN]\n")
        assert len(p.tests) == 3 and p.visible_tests == p.tests
        for t in p.tests:
            assert t.startswith(f"assert {p.entry_point}(") and t in p.prompt
        assert p.reference.startswith(f"def {p.entry_point}(")
        assert p.code_prefix == "" and p.test_setup == ""
        assert p.reference_completion() == p.reference
        assert p.program(p.reference) == p.reference
        assert "[DONE]" in SYNTH_STOP
        assert len(set(p.tests)) == 3


def _check_in_subprocess(problems: list[Problem]) -> list[bool]:
    """Run each reference with its tests in a child Python (never in this process)."""
    runner = textwrap.dedent(
        """
        import json, sys
        out = []
        for job in json.load(sys.stdin):
            g = {"__name__": "__main__"}
            try:
                exec(job["setup"], g)
                exec(job["program"], g)
                for t in job["tests"]:
                    exec(t, g)
                out.append(True)
            except BaseException:
                out.append(False)
        print(json.dumps(out))
        """
    )
    jobs = [{"program": p.reference, "tests": list(p.tests), "setup": p.test_setup} for p in problems]
    res = subprocess.run(
        [sys.executable, "-c", runner], input=json.dumps(jobs), capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_references_pass(splits: dict[str, list[Problem]]) -> None:
    probs = splits["test"] + splits["validation"] + splits["train"]
    ok = _check_in_subprocess(probs)
    failed = [p.task_id for p, o in zip(probs, ok) if not o]
    assert not failed, failed[:10]


def test_references_fail_other_problems_tests(splits: dict[str, list[Problem]]) -> None:
    """Tests discriminate: a reference of a different problem fails them (mostly)."""
    probs = splits["test"][:60]
    swapped = [
        Problem(
            task_id="x",
            prompt="",
            entry_point=b.entry_point,
            tests=b.tests,
            reference=a.reference.replace(f"def {a.entry_point}(", f"def {b.entry_point}(", 1),
        )
        for a, b in zip(probs, probs[1:] + probs[:1])
        if a.meta["key"] != b.meta["key"]
    ]
    ok = _check_in_subprocess(swapped)
    assert sum(ok) <= len(ok) // 10
