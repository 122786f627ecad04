"""Renderers of `codedistill report` for ablation, sweep and matrix directories, and the
protocol verdicts. Inputs are JSON files written here in the shapes of the experiments'
result files (these test the renderers, not the experiments); outputs are parsed back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from codedistill.errors import ConfigError
from codedistill.report.build import render_report
from codedistill.report.protocol import Protocol, baseline_protocol, btp_protocol, comparability
from codedistill.results import Estimate, PairedDifference
from html_tables import Tables


def metric(v, lo, hi):
    return Estimate(v, lo, hi).to_dict()


def imp(d, lo, hi):
    return PairedDifference(
        k=1, n_problems=100, before=0.5, after=0.5 + d, diff=Estimate(d, lo, hi), p_value_no_improvement=0.5
    ).to_dict()


def btp_config(out: Path, **kw) -> None:
    cfg = dict(dataset="synth", eval_num_samples=5, eval_temperature=0.2, eval_top_p=0.95, eval_protocol="sampled")
    cfg.update(kw)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"kind": "btp", "config": cfg}))


def parse(html: str) -> Tables:
    t = Tables()
    t.feed(html)
    return t


def test_ablation(tmp_path):
    out = tmp_path / "abl"
    variants = [
        {
            "name": "full",
            "group": "reference",
            "description": "the full method",
            "run_dir": "variants/full",
            "overrides": {},
            "metrics": {"pass@1": metric(0.61, 0.53, 0.70), "pass@5": metric(0.80, 0.72, 0.87)},
            "diff": None,
            "generated_new": 3000,
            "status": "done",
        },
        {
            "name": "uniform",
            "group": "replay",
            "description": "uniform replay",
            "run_dir": "variants/uniform",
            "overrides": {"sampling_method": "uniform"},
            "metrics": {"pass@1": metric(0.45, 0.37, 0.54), "pass@5": metric(0.70, 0.61, 0.78)},
            "diff": {"pass@1": imp(-0.16, -0.24, -0.08), "pass@5": imp(-0.10, -0.17, -0.03)},
            "generated_new": 0,
            "status": "done",
        },
        {
            "name": "grpo",
            "group": "outside baseline",
            "description": "TRL GRPO",
            "run_dir": "variants/grpo",
            "overrides": {},
            "metrics": {},
            "diff": None,
            "generated_new": 0,
            "status": "skipped: needs a GPU",
        },
    ]
    out.mkdir()
    (out / "ablation.json").write_text(
        json.dumps(
            {
                "kind": "ablation",
                "base_config": "configs/demo.yaml",
                "dataset": "synth",
                "n_eval_problems": 100,
                "eval_num_samples": 5,
                "reference": "full",
                "variants": variants,
                "target_before": {"pass@1": metric(0.33, 0.25, 0.41)},
                "source": {"pass@1": metric(0.75, 0.67, 0.82)},
            }
        )
    )
    btp_config(out / "variants" / "full")
    paths = render_report([out], tmp_path / "rep")
    html = paths["html"].read_text()
    t = parse(html)
    rows = {r[0]: r for r in t.tables["ablation"]}
    assert rows["full"][2:6] == ["0.610 [0.530, 0.700]", "0.800 [0.720, 0.870]", "reference", "reference"]
    assert rows["uniform"][2:6] == [
        "0.450 [0.370, 0.540]",
        "0.700 [0.610, 0.780]",
        "-0.160 [-0.240, -0.080]",
        "-0.100 [-0.170, -0.030]",
    ]
    assert rows["uniform"][6:8] == ["0", "done"] and rows["full"][6] == "3000"
    assert rows["grpo"][2] == "-" and rows["grpo"][7] == "skipped: needs a GPU"
    assert all(len(r) == 8 for r in rows.values())  # descriptions go to the variants table, not this wide one
    assert t.tables["ablation-overrides"][1] == ["uniform", "uniform replay", "sampling_method=uniform"]
    assert t.tables["ablation-points"] == [
        ["target before BTP", "0.330 [0.250, 0.410]"],
        ["source", "0.750 [0.670, 0.820]"],
    ]
    # the protocol of the reference variant's run: sampled, synth -> not comparable
    assert "Protocol: synth test split, 0-shot, sampled, T=0.2, top_p 0.95, n=5; preset sampled." in html
    assert "Not comparable with published numbers" in html
    assert len(t.imgs) == 1 and t.imgs[0].startswith("data:image/png;base64,")
    assert (paths["plots"] / "ablation_pass1.png").stat().st_size > 5000
    md = paths["markdown"].read_text()
    assert "| uniform | replay | 0.450 [0.370, 0.540] |" in md and "](plots/ablation_pass1.png)" in md


def test_sweep(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    trials = [
        {
            "number": 0,
            "state": "COMPLETE",
            "params": {"sampling_alpha": 1.5, "learning_rate": 0.001},
            "value": 0.40,
            "intermediate": {"1": 0.40},
            "run_dir": "trials/0",
        },
        {
            "number": 1,
            "state": "COMPLETE",
            "params": {"sampling_alpha": 8.0, "learning_rate": 0.003},
            "value": 0.58,
            "intermediate": {"1": 0.52, "2": 0.58},
            "run_dir": "trials/1",
        },
        {
            "number": 2,
            "state": "PRUNED",
            "params": {"sampling_alpha": 1.0, "learning_rate": 0.0001},
            "value": None,
            "intermediate": {"1": 0.2},
            "run_dir": "trials/2",
        },
        {
            "number": 3,
            "state": "FAIL",
            "params": {"sampling_alpha": 3.0, "learning_rate": 0.01},
            "value": None,
            "intermediate": {},
            "run_dir": "trials/3",
        },
    ]
    (out / "sweep.json").write_text(
        json.dumps(
            {
                "kind": "sweep",
                "objective": "validation pass@1",
                "direction": "maximize",
                "storage": "journal:sweep.log",
                "study_name": "demo",
                "search_space": {"sampling_alpha": "{1, 1.5, 3, 8}", "learning_rate": "log-uniform [1e-4, 1e-2]"},
                "trials": trials,
                "best": {
                    "number": 1,
                    "params": {"sampling_alpha": 8.0, "learning_rate": 0.003},
                    "value": 0.58,
                    "test_metrics": {"pass@1": metric(0.55, 0.46, 0.64), "n_problems": 100},
                },
                "importances": {"sampling_alpha": 0.8, "learning_rate": 0.2},
            }
        )
    )
    btp_config(out / "trials" / "1", eval_split="validation")
    paths = render_report([out], tmp_path / "rep")
    html = paths["html"].read_text()
    t = parse(html)
    rows = t.tables["sweep-trials"]
    assert [r[:3] for r in rows] == [
        ["0", "COMPLETE", "0.400"],
        ["1", "COMPLETE", "0.580"],
        ["2", "PRUNED", "-"],
        ["3", "FAIL", "-"],
    ]
    assert rows[1][3:] == ["0.003", "8", "1: 0.520, 2: 0.580"]  # params sorted by name
    assert rows[2][3:5] == ["0.0001", "1"]
    assert t.tables["sweep-best"] == [["sampling_alpha", "8"], ["learning_rate", "0.003"]]
    assert t.tables["sweep-best-test"] == [["best trial 1 (test split)", "0.550 [0.460, 0.640]"]]
    # the best trial's numbers are on the test split (the objective was on validation)
    assert "Protocol: synth test split, 100 problems, 0-shot" in html
    assert len(t.imgs) == 2
    for name in ("sweep_history.png", "sweep_importance.png"):
        assert (paths["plots"] / name).stat().st_size > 5000


def test_matrix_and_cross_run_table(tmp_path):
    out = tmp_path / "matrix"
    out.mkdir()
    rows = [
        {
            "config": "configs/a.yaml",
            "run_dir": "runs/a",
            "source": "Qwen2.5-Coder-7B",
            "target": "Qwen2.5-Coder-0.5B",
            "same_family": True,
            "dataset": "mbpp",
            "before": metric(0.30, 0.26, 0.34),
            "after": metric(0.36, 0.32, 0.40),
            "gain": imp(0.06, 0.03, 0.09),
            "status": "done",
        },
        {
            "config": "configs/b.yaml",
            "run_dir": "runs/b",
            "source": "Qwen2.5-Coder-7B",
            "target": "StarCoder2-3B",
            "same_family": False,
            "dataset": "mbpp",
            "before": metric(0.28, 0.24, 0.32),
            "after": metric(0.27, 0.23, 0.31),
            "gain": imp(-0.01, -0.04, 0.02),
            "status": "done",
        },
    ]
    (out / "matrix.json").write_text(json.dumps({"kind": "matrix", "rows": rows}))
    # run a: the paper protocol on all 500 MBPP test problems; run b: sampled on a subset
    btp_config(out / "runs" / "a", dataset="mbpp", eval_protocol="paper", eval_num_samples=1, eval_temperature=0.0)
    (out / "runs" / "a" / "comparison.json").write_text(
        json.dumps(
            {
                "datasets": {
                    "mbpp": {
                        "n_problems": 500,
                        "protocol": {
                            "preset": "paper",
                            "shots": 3,
                            "temperature": 0.0,
                            "num_samples": 1,
                            "split": "test",
                        },
                    }
                }
            }
        )
    )
    btp_config(out / "runs" / "b", dataset="mbpp", eval_max_problems=100)
    (out / "runs" / "b" / "comparison.json").write_text(json.dumps({"datasets": {"mbpp": {"n_problems": 100}}}))
    paths = render_report([out], tmp_path / "rep")
    t = parse(paths["html"].read_text())
    mx = t.tables["matrix"]
    assert mx[0][3:10] == [
        "yes",
        "mbpp",
        "0.300 [0.260, 0.340]",
        "0.360 [0.320, 0.400]",
        "+0.060 [+0.030, +0.090]",
        "yes",
        "done",
    ]
    assert mx[1][3:10] == [
        "no",
        "mbpp",
        "0.280 [0.240, 0.320]",
        "0.270 [0.230, 0.310]",
        "-0.010 [-0.040, +0.020]",
        "no",
        "done",
    ]
    cross = t.tables["cross-run"]  # two matrix rows -> a cross-run table
    assert [r[3:7] for r in cross] == [
        ["0.300 [0.260, 0.340]", "0.360 [0.320, 0.400]", "+0.060 [+0.030, +0.090]", "yes"],
        ["0.280 [0.240, 0.320]", "0.270 [0.230, 0.310]", "-0.010 [-0.040, +0.020]", "no"],
    ]
    assert (paths["plots"] / "matrix_pass1.png").is_file()


def test_several_dirs_get_one_page_with_a_cross_run_table(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, v in ((a, 0.2), (b, 0.3)):
        d.mkdir()
        (d / "config.json").write_text(
            json.dumps(
                {
                    "kind": "baseline",
                    "config": {
                        "model": "tiny-target",
                        "dataset": "humaneval",
                        "split": "test",
                        "shots": 0,
                        "sampling": {"num_samples": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 64},
                    },
                }
            )
        )
        (d / "metrics.json").write_text(
            json.dumps(
                {
                    "pass@1": {"value": v, "ci_low": v - 0.05, "ci_high": v + 0.05},
                    "n_problems": 164 if d == a else 20,
                    "num_samples": 1,
                }
            )
        )
    paths = render_report([a, b], tmp_path / "rep")
    t = parse(paths["html"].read_text())
    cross = t.tables["cross-run"]
    assert [(r[0], r[2], r[4], r[6]) for r in cross] == [
        ("a (baseline)", "humaneval test (164), 0-shot, greedy", "0.200 [0.150, 0.250]", "yes"),
        ("b (baseline)", "humaneval test (20), 0-shot, greedy", "0.300 [0.250, 0.350]", "no"),
    ]
    assert len(t.imgs) == 2 and (paths["plots"] / "a" / "pass_at_k.png").is_file()


def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="holds no result files"):
        render_report([tmp_path], tmp_path / "rep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"kind": "btp", "config": {}}))
    with pytest.raises(ConfigError, match="unfinished btp .*comparison.json"):
        render_report([tmp_path / "run"], tmp_path / "rep")
    with pytest.raises(ConfigError, match="not a directory"):
        render_report([tmp_path / "missing"])  # default output under the run dir: not created
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "proto,level",
    [
        (Protocol("mbpp", "test", 500, shots=3, temperature=0.0, num_samples=1), "yes"),
        (Protocol("humaneval", "test", 164, shots=0, temperature=0.0, num_samples=1), "yes"),
        (Protocol("mbpp", "test", 100, shots=3, temperature=0.0, num_samples=1), "no"),  # subset
        (Protocol("mbpp", "test", 500, shots=0, temperature=0.0, num_samples=1), "no"),  # 0-shot MBPP
        (Protocol("mbpp", "validation", 90, shots=3, temperature=0.0), "no"),
        (Protocol("humaneval", "test", 164, temperature=0.2, num_samples=100), "partly"),  # sampled, full set
        (Protocol("synth", "test", 100, temperature=0.0), "no"),
    ],
)
def test_comparability(proto, level):
    v = comparability(proto)
    assert v.level == level and v.reasons


def test_protocol_from_run_files():
    # the experiments' comparison.json records the protocol per dataset; it wins over config.json
    comp = {
        "datasets": {
            "mbpp": {
                "n_problems": 500,
                "protocol": {"preset": "paper", "shots": 3, "temperature": 0.0, "num_samples": 1, "split": "test"},
            }
        }
    }
    p = btp_protocol({"config": {"eval_temperature": 0.8, "eval_num_samples": 10}}, comp, "mbpp")
    assert (p.shots, p.temperature, p.num_samples, p.n_problems, p.preset) == (3, 0.0, 1, 500, "paper")
    assert p.describe() == "mbpp test split, 500 problems, 3-shot, greedy; preset paper"
    # older runs: config.json only
    p = btp_protocol(
        {"config": {"eval_temperature": 0.2, "eval_num_samples": 5, "eval_max_problems": 100}},
        {"datasets": {"synth": {"n_problems": 100}}},
        "synth",
    )
    assert (p.temperature, p.num_samples, p.shots, p.split) == (0.2, 5, 0, "test")
    b = baseline_protocol(
        {
            "config": {
                "dataset": "mbpp",
                "split": "test",
                "shots": 3,
                "sampling": {"temperature": 0.8, "num_samples": 10, "top_p": 0.95},
            }
        },
        {"n_problems": 50, "num_samples": 10},
    )
    assert re.fullmatch(
        r"mbpp test split, 50 problems \(first 50 of 500\), 3-shot, sampled, T=0.8, top_p 0.95, n=10", b.describe()
    )
    # EG-CFG has its own decoder: the sampling temperature does not describe it, and it is never "plain"
    e = baseline_protocol(
        {
            "config": {
                "dataset": "humaneval",
                "split": "test",
                "method": "egcfg",
                "sampling": {"temperature": 0.8, "num_samples": 1},
                "egcfg": {"gammas": [0.0, 1.0], "temperatures": [0.7]},
            }
        },
        {"n_problems": 164, "num_samples": 1},
    )
    assert "EG-CFG execution-guided decoding (gammas [0.0, 1.0], temperatures [0.7]), n=1" in e.describe()
    assert "T=0.8" not in e.describe() and comparability(e).level == "no"


def test_numeric_cells_are_numbers_not_text_that_starts_with_one():
    from codedistill.report.doc import _is_num

    for x in ("0.618 [0.530, 0.702]", "+0.022 [-0.046, +0.090]", "4500", "98%", "1e-3", "5.2 s", "-"):
        assert _is_num(x) == (x != "-"), x
    for x in ("3 beams per problem (the paper's width)", "2 iterations", "skipped: needs a GPU", "nan"):
        assert not _is_num(x), x


def btp_run_dir(out: Path) -> None:
    """A finished one-iteration BTP run's files (config.json, comparison.json, iter_1/stats.json,
    generation.json) with numbers from codedistill.metrics."""
    from codedistill.metrics import paired_bootstrap, pass_at_k_report

    before = {f"synth/{i}": (5, i % 3) for i in range(30)}
    after = {t: (n, min(n, c + 2)) for t, (n, c) in before.items()}
    cfg = dict(
        dataset="synth",
        generation="beam",
        num_beams=5,
        num_samples=5,
        gen_temperature=0.8,
        p2_alpha=0.2,
        sampling_method="power",
        sampling_alpha=8.0,
        is_weights=False,
        is_beta=0.4,
        replay_size=600,
        use_lora=True,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        learning_rate=0.003,
        epochs=4,
        train_batch_size=16,
        n_iterations=1,
        seed=0,
        eval_num_samples=5,
        eval_temperature=0.2,
        eval_top_p=0.95,
        beam_search_fallback="the server offers no beam search; sampled instead",
    )
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"kind": "btp", "config": cfg}))
    rep_b, rep_a = pass_at_k_report(before, ks=(1, 5)), pass_at_k_report(after, ks=(1, 5))
    (out / "comparison.json").write_text(
        json.dumps(
            {
                "source_model": "tiny-source",
                "target_model": "tiny-target",
                "mode": "finetune",
                "n_train_problems": 600,
                "n_iterations": 1,
                "seed": 0,
                "allow_overlap": False,
                "overlapping_train_problems": [],
                "near_duplicate_descriptions": [],
                "dropped_overlapping_train_problems": ["synth/train/7"],
                "datasets": {
                    "synth": {
                        "n_problems": 30,
                        "target_before": rep_b,
                        "target_after": rep_a,
                        "source": rep_a,
                        "target_per_iteration": {"target_iter0": rep_b, "target_iter1": rep_a},
                        "improvement": {f"pass@{k}": paired_bootstrap(before, after, k=k).to_dict() for k in (1, 5)},
                    }
                },
            }
        )
    )
    hist = {"edges": [0.0, 0.5, 1.0], "counts": [10, 20]}
    (out / "iter_1").mkdir()
    (out / "iter_1" / "stats.json").write_text(
        json.dumps(
            {
                "iteration": 1,
                "buffer": {
                    "size": 3000,
                    "new_this_iteration": 3000,
                    "share_fully_passing": 0.6,
                    "share_zero_pass": 0.2,
                    "p2value": {"mean": 0.61, "histogram": hist},
                },
                "sampling": {
                    "method": "power",
                    "alpha": 8.0,
                    "draws": 600,
                    "unique_programs_drawn": 420,
                    "share_fully_passing_drawn": 0.98,
                    "share_zero_pass_drawn": 0.0,
                    "effective_sample_size": 390.5,
                    "p2value_drawn": {"mean": 0.8, "histogram": hist},
                },
                "training": {"first_loss": 1.2345, "last_loss": 0.4321, "losses": [1.2345, 0.8, 0.4321]},
            }
        )
    )
    (out / "generation.json").write_text(
        json.dumps(
            {
                "starts": [{}],
                "totals": {
                    "tiny-source": {
                        "backend": "vllm",
                        "requests_sent": 120,
                        "cache_hits": 3,
                        "retries_total": 0,
                        "prompt_tokens": 9000,
                        "completion_tokens": 4000,
                        "fallbacks": [],
                        "notes": [],
                    }
                },
            }
        )
    )


def test_write_run_report_renders_a_btp_run_from_its_files(tmp_path):
    from codedistill.report import write_run_report
    from codedistill.report.format import fmt_diff, fmt_metric

    run = tmp_path / "run"
    btp_run_dir(run)
    path = write_run_report(run, elapsed=12.34)
    md = path.read_text()
    comp = json.loads((run / "comparison.json").read_text())["datasets"]["synth"]
    assert md.startswith(
        "# BTP: tiny-source -> tiny-target (finetune)\n\n"
        "Left out of training (also evaluation problems, --drop-overlap): synth/train/7.\n"
    )
    assert (
        "- training: synth train split, 600 problems; beam (num_beams 5)\n"
        "- replay: P2Value = 0.2*P + 0.8*pass_rate; sampling power (alpha 8); replay size 600\n"
        "- fine-tuning: LoRA r=16 alpha=32 dropout=0, lr 0.003, epochs 4, batch 16, 1 iterations, seed 0\n"
        "- evaluation: 5 samples per problem at T=0.2, top_p 0.95\n"
        "- wall time of this start: 12.3 s\n"
    ) in md
    assert "| model | pass@1 | pass@5 |" in md
    before, after = comp["target_before"], comp["target_after"]
    assert (
        f"| target before (tiny-target) | {fmt_metric(before['pass@1'])} | {fmt_metric(before['pass@5'])} |\n"
        f"| target after iteration 1 | {fmt_metric(after['pass@1'])} | {fmt_metric(after['pass@5'])} |\n"
    ) in md
    imp = comp["improvement"]["pass@1"]
    assert f"- pass@1: {fmt_diff(imp)}, p(no improvement) = {imp['p_value_no_improvement']:.3f}\n" in md
    assert "| 1 | 3000 | 3000 | 0.610 | 600 | 420 | 98.0% | 0.0% | 390.5 | 1.234 -> 0.432 |" in md
    assert md.endswith(
        "**Beam search fallback:** the server offers no beam search; sampled instead.\n\n"
        "## Served generation\n\n"
        "- tiny-source (vllm): 120 requests sent over 1 start(s), 3 answered from the cache, 0 retries, "
        "9000 prompt + 4000 completion tokens\n"
    )
    pngs = sorted(p.name for p in (run / "plots").iterdir())
    assert pngs == ["loss_curve.png", "p2value_hist.png", "pass_at_k_synth.png", "sampling_stats.png"]
    assert all((run / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    with pytest.raises(ConfigError, match="not a finished BTP run"):
        write_run_report(tmp_path / "empty")


def test_btp_report_names_greedy_evaluation_without_a_top_p(tmp_path):
    """At T=0 top_p plays no part: the settings line says greedy instead of the unused top_p."""
    from codedistill.report import write_run_report

    run = tmp_path / "run"
    btp_run_dir(run)
    conf = json.loads((run / "config.json").read_text())
    conf["config"].update(eval_temperature=0.0, eval_num_samples=1)
    (run / "config.json").write_text(json.dumps(conf))
    md = write_run_report(run).read_text()
    assert "- evaluation: greedy, 1 sample(s) per problem\n" in md
    assert "top_p" not in md.split("- evaluation:")[1].split("\n")[0]


def test_formatters_read_the_one_spelling_and_refuse_others():
    from codedistill.errors import DataError
    from codedistill.report.format import fmt_diff, fmt_metric

    assert fmt_metric(metric(0.4361, 0.3559, 0.5221)) == "0.436 [0.356, 0.522]"
    assert fmt_diff(imp(0.1824, 0.1061, 0.2604)) == "+0.182 [+0.106, +0.260]"
    assert fmt_metric(None) == fmt_diff({}) == "-"
    with pytest.raises(DataError, match="lacks ci_low, ci_high"):
        fmt_metric({"value": 0.4, "low": 0.3, "high": 0.5})


def test_report_package_reads_files_and_imports_no_producer():
    import ast

    import codedistill.report as report

    producers = ("btp", "experiments", "generation", "training", "execution", "egcfg", "baseline", "evaluation")
    for path in Path(report.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                parts = name.split(".")
                assert not (parts[0] == "codedistill" and len(parts) > 1 and parts[1] in producers), (path.name, name)
