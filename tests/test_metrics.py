import itertools
import math

import numpy as np
import pytest

from codedistill.errors import DataError
from codedistill.metrics import bootstrap_mean, counts_from_results, paired_bootstrap, pass_at_k, pass_at_k_report
from codedistill.results import Estimate, PairedDifference


def brute_pass_at_k(n, c, k):
    """Exact probability that a random k-subset of n samples (c correct) holds a correct one."""
    items = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(items[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    "n,c,k", [(10, 0, 1), (10, 3, 1), (10, 3, 5), (10, 9, 5), (10, 10, 10), (7, 2, 3), (12, 1, 10)]
)
def test_pass_at_k_is_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_report_only_has_k_up_to_n_and_ci_brackets_value():
    rows = [{"task_id": f"t{i}", "passed": j < i % 4} for i in range(40) for j in range(5)]
    rep = pass_at_k_report(counts_from_results(rows))
    assert set(k for k in rep if k.startswith("pass@")) == {"pass@1", "pass@5"}
    # per problem c = i % 4 of 5 -> pass@1 mean = mean(c)/5 = 1.5/5
    assert rep["pass@1"]["value"] == pytest.approx(0.3)
    assert rep["pass@1"]["ci_low"] < 0.3 < rep["pass@1"]["ci_high"]
    assert rep["n_problems"] == 40 and rep["num_samples"] == 5


def test_bootstrap_ci_width_shrinks_with_more_problems():
    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.random(20) < 0.5)
    large = bootstrap_mean(rng.random(2000) < 0.5)
    assert (large.high - large.low) < (small.high - small.low) / 5


def test_paired_bootstrap_detects_improvement_and_null():
    before = {f"t{i}": (10, i % 3) for i in range(60)}
    after = {f"t{i}": (10, i % 3 + 4) for i in range(60)}
    res = paired_bootstrap(before, after, k=1)
    assert res.diff.value == pytest.approx(0.4) and res.after - res.before == pytest.approx(0.4)
    assert res.diff.low > 0.3 and res.p_value_no_improvement == 0.0 and (res.k, res.n_problems) == (1, 60)
    same = paired_bootstrap(before, before, k=1)
    assert same.diff.value == 0.0 and same.p_value_no_improvement == 1.0


def test_results_have_one_spelling_on_disk_and_read_back():
    rows = [{"task_id": f"t{i}", "passed": j < i % 4} for i in range(40) for j in range(5)]
    rep = pass_at_k_report(counts_from_results(rows))
    assert set(rep["pass@1"]) == {"value", "ci_low", "ci_high"}
    est = Estimate.from_dict(rep["pass@1"])
    assert est.to_dict() == rep["pass@1"] and est.low < est.value < est.high
    counts = {f"t{i}": (10, i % 3) for i in range(30)}
    diff = paired_bootstrap(counts, {t: (n, c + 1) for t, (n, c) in counts.items()}, k=1)
    on_disk = diff.to_dict()
    assert list(on_disk) == [
        "k",
        "n_problems",
        "before",
        "after",
        "diff",
        "ci_low",
        "ci_high",
        "p_value_no_improvement",
    ]
    assert PairedDifference.from_dict(on_disk) == diff
    with pytest.raises(DataError, match="lacks ci_low, ci_high"):
        Estimate.from_dict({"value": 0.5, "low": 0.4, "high": 0.6})
