"""P2Value, normalisation/dedup, the persistent replay buffer and the samplers."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from codedistill.btp.p2value import DEFAULT_P2_ALPHA, normalize_program, p2value, program_key
from codedistill.btp.replay import ReplayBuffer, ReplayEntry
from codedistill.btp.samplers import (
    check_sampling,
    draw,
    effective_sample_size,
    ranks,
    sampling_probs,
)
from codedistill.runs import JsonlWriter, read_jsonl


def test_p2value_formula_and_bounds():
    assert p2value(0.9, 1 / 3, 0.2) == pytest.approx(0.2 * 0.9 + 0.8 / 3)
    assert p2value(0.5, 1.0, 0.0) == 1.0
    assert p2value(0.5, 1.0, 1.0) == 0.5
    with pytest.raises(ValueError):
        p2value(0.5, 0.5, 1.5)
    with pytest.raises(ValueError):
        p2value(1.2, 0.5, 0.2)
    with pytest.raises(ValueError):
        p2value(0.5, -0.1, 0.2)


def test_default_alpha_orders_by_pass_rate_first_for_mbpp():
    # with 3 tests, one more passed test beats any difference in P
    a = DEFAULT_P2_ALPHA
    worst_more_tests = p2value(0.0, 1 / 3, a)
    best_fewer_tests = p2value(1.0, 0.0, a)
    assert worst_more_tests > best_fewer_tests
    assert p2value(0.0, 1.0, a) > p2value(1.0, 2 / 3, a)
    # and among equal pass rates the more likely program wins
    assert p2value(0.9, 2 / 3, a) > p2value(0.6, 2 / 3, a)


def test_normalize_program_ignores_comments_blank_lines_and_formatting():
    a = "def f(x):\n    # add one\n    return x+1   \n\n\n"
    b = "def f(x):\n\n    return (x + 1)  # comment\n"
    c = "def f(x):\n    return x + 2\n"
    assert normalize_program(a) == normalize_program(b) == "def f(x):\n    return x + 1"
    assert program_key(a) == program_key(b) != program_key(c)
    # unparsable code: comments, blank lines and trailing spaces still go
    bad1 = "def f(x)\n    return x  # oops\n\n"
    bad2 = "def f(x)\n    return x\n# trailing comment\n"
    assert normalize_program(bad1) == normalize_program(bad2) == "def f(x)\n    return x"


def _entry(task, prog, p=0.8, pr=1.0, it=0):
    return ReplayEntry(
        task_id=task,
        completion=prog,
        program=prog,
        p=p,
        pass_rate=pr,
        tests_passed=int(pr * 3),
        tests_total=3,
        source="src",
        iteration=it,
    )


def test_replay_buffer_dedups_per_problem_and_persists(tmp_path):
    path = tmp_path / "replay_buffer.jsonl"
    buf = ReplayBuffer(path)
    assert buf.add(_entry("t1", "def f():\n    return 1\n", p=0.7))
    assert not buf.add(_entry("t1", "def f():\n    # c\n    return 1", p=0.9))  # same program
    assert buf.add(_entry("t2", "def f():\n    return 1\n"))  # other problem: kept
    assert buf.add(_entry("t1", "def f():\n    return 2\n", pr=0.0))
    assert len(buf) == 3 and buf.duplicates_seen == 1
    assert buf.entries[0].p == 0.7  # first occurrence wins
    buf.close()
    # reload; re-adding the same entries after a "crash" changes nothing
    buf2 = ReplayBuffer(path)
    assert [e.to_dict() for e in buf2] == [e.to_dict() for e in buf]
    assert not buf2.add(_entry("t1", "def f():\n    return 2\n", pr=0.0))
    buf2.close()
    assert len(read_jsonl(path)) == 3


def test_jsonl_torn_tail_is_repaired(tmp_path):
    path = tmp_path / "x.jsonl"
    with JsonlWriter(path) as w:
        w.write({"a": 1})
        w.write({"a": 2})
    with path.open("a") as f:
        f.write('{"a": 3, "b"')  # killed mid-write
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    with JsonlWriter(path) as w:
        w.write({"a": 4})
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]
    assert path.read_text().count("\n") == 3
    assert json.loads(path.read_text().splitlines()[-1]) == {"a": 4}


VALUES = [0.05, 0.2, 0.2, 0.5, 0.9, 1.0]


def _freqs(method, alpha, n=60000, seed=0, values=VALUES):
    d = draw(values, n, method, alpha, np.random.default_rng(seed))
    c = Counter(d.indices)
    return np.array([c.get(i, 0) / n for i in range(len(values))]), d


@pytest.mark.parametrize("alpha", [0.5, 1.5, 3.0])
def test_power_sampler_matches_target(alpha):
    f, d = _freqs("power", alpha)
    target = np.array(VALUES) ** alpha
    target /= target.sum()
    np.testing.assert_allclose(d.probs, target)
    np.testing.assert_allclose(f, target, atol=0.01)
    # higher alpha concentrates mass on the best entry
    assert f[5] > f[3] > f[0]


@pytest.mark.parametrize("alpha", [0.7, 1.0, 2.0])
def test_rank_sampler_matches_target(alpha):
    f, d = _freqs("rank", alpha)
    # ranks: 1.0->1, 0.9->2, 0.5->3, 0.2 (idx1)->4, 0.2 (idx2)->5, 0.05->6
    r = np.array([6, 4, 5, 3, 2, 1], dtype=float)
    np.testing.assert_array_equal(ranks(VALUES), r)
    target = 1 / r**alpha
    target /= target.sum()
    np.testing.assert_allclose(f, target, atol=0.01)


def test_uniform_sampler_matches_target():
    f, _ = _freqs("uniform", 1.0)
    np.testing.assert_allclose(f, np.full(6, 1 / 6), atol=0.01)


def test_greedy_sampler_takes_the_top():
    d = draw(VALUES, 3, "greedy", 1.0, np.random.default_rng(0))
    assert d.indices == [5, 4, 3]
    d = draw(VALUES, 8, "greedy", 1.0, np.random.default_rng(0))
    assert d.indices == [5, 4, 3, 1, 2, 0, 5, 4]


def test_power_alpha_zero_is_uniform_and_seeded_draws_repeat():
    np.testing.assert_allclose(sampling_probs(VALUES, "power", 0.0), np.full(6, 1 / 6))
    a = draw(VALUES, 50, "power", 1.5, np.random.default_rng(7)).indices
    b = draw(VALUES, 50, "power", 1.5, np.random.default_rng(7)).indices
    c = draw(VALUES, 50, "power", 1.5, np.random.default_rng(8)).indices
    assert a == b != c


def test_importance_weights():
    d = draw(VALUES, 2000, "power", 2.0, np.random.default_rng(0), is_beta=1.0)
    p = d.probs
    for i, w in zip(d.indices[:50], d.is_weights[:50]):
        # w ∝ 1/(N p_i); the least likely drawn entry gets weight 1
        pmin = min(p[j] for j in set(d.indices))
        assert w == pytest.approx(pmin / p[i])
    assert max(d.is_weights) == pytest.approx(1.0)
    d0 = draw(VALUES, 20, "power", 2.0, np.random.default_rng(0))
    assert d0.is_weights == [1.0] * 20


def test_bad_sampling_args():
    with pytest.raises(ValueError, match="unknown sampling method"):
        check_sampling("boltzmann", 1.0)
    with pytest.raises(ValueError, match="alpha"):
        check_sampling("power", -1.0)
    with pytest.raises(ValueError, match="alpha"):
        check_sampling("rank", 100.0)


def test_effective_sample_size():
    assert effective_sample_size([1, 1, 1, 1]) == pytest.approx(4.0)
    assert effective_sample_size([4, 0, 0, 0]) == pytest.approx(1.0)
    assert 1.0 < effective_sample_size([3, 1, 1]) < 3.0
