"""`codedistill run` / `ablate` / `matrix`: configs + overrides, variants that share the
reference's generations (an ablation of replay settings generates nothing new), reruns
that generate nothing, and the result files of SCHEMAS.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from codedistill.btp.config import EMBEDDED_DEFAULT, load_config_file
from codedistill.cli import app
from codedistill.errors import ConfigError
from codedistill.experiments.run import load_experiment, parse_sets
from codedistill.experiments.variants import all_variants, select
from codedistill.runs import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def test_demo_config_is_the_embedded_default():
    assert load_config_file(REPO / "configs" / "demo.yaml") == EMBEDDED_DEFAULT


def test_set_overrides_are_yaml_scalars_validated_by_btpconfig(tmp_path):
    sets = parse_sets(["sampling_alpha=3", "use-lora=false", "eval_datasets=[humaneval]", "replay_size=null"])
    assert sets == {"sampling_alpha": 3, "use_lora": False, "eval_datasets": ["humaneval"], "replay_size": None}
    cfg = load_experiment(REPO / "configs" / "demo.yaml", sets, output_dir=tmp_path / "r")
    assert (cfg.sampling_alpha, cfg.use_lora, cfg.replay_size, cfg.output_dir) == (
        3.0,
        False,
        None,
        str(tmp_path / "r"),
    )
    assert load_experiment(REPO / "configs" / "demo.yaml").output_dir == str(Path("results/run/demo"))
    with pytest.raises(ConfigError, match="unknown setting 'sampling_alfa'.*valid keys: .*sampling_alpha"):
        parse_sets(["sampling_alfa=3"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_sets(["sampling_alpha"])
    with pytest.raises(ConfigError, match="sampling_alpha"):
        load_experiment(REPO / "configs" / "demo.yaml", {"sampling_alpha": 99})


def test_cli_errors_name_the_fix(tmp_path):
    r = CliRunner().invoke(app, ["run", str(REPO / "configs" / "demo.yaml"), "--set", "nope=1"])
    assert r.exit_code == 2 and "valid keys" in r.output
    r = CliRunner().invoke(
        app, ["ablate", str(REPO / "configs" / "demo.yaml"), "--variants", "full,beam_7", "--output-dir", str(tmp_path)]
    )
    assert r.exit_code == 2 and "unknown variant(s) beam_7" in r.output and "testing_off" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("source_model: tiny-source\nbeams: 3\n")
    r = CliRunner().invoke(app, ["run", str(bad)])
    assert r.exit_code == 2 and "unknown setting(s) beams" in r.output


def test_variants_cover_the_plan_and_apply_by_config():
    names = {v.name for v in all_variants()}
    assert {
        "full",
        "testing_off",
        "sampling_uniform",
        "beam_3",
        "beam_5",
        "sample_generation",
        "p_raw",
        "rft",
        "drop_zero_pass",
        "keep_all",
        "mode_self",
        "mode_mixed",
        "grpo",
    } <= names
    assert {f"p2_alpha_{a}" for a in ("0", "0.25", "0.5", "0.75", "1")} <= names
    assert {f"alpha_{a}" for a in ("1", "1.5", "3", "8")} <= names
    assert {f"sampling_{m}" for m in ("power", "rank", "greedy", "uniform")} <= names
    assert [v.name for v in select("rft,full")] == ["full", "rft"]
    from codedistill.btp.config import build_config

    beam3 = next(v for v in all_variants() if v.name == "beam_3")
    assert beam3.applies(build_config({}, {"generation": "sample"})) is not None
    assert beam3.applies(build_config({}, {})) is None
    # rank replay runs at its own alpha: at the power method's alpha 8, 1/rank^8 puts almost all
    # of 3,000 programs' draws on the top one, which ablates nothing but the draw's diversity
    import numpy as np

    from codedistill.btp.samplers import sampling_probs

    rank = next(v for v in all_variants() if v.name == "sampling_rank")
    assert rank.overrides == {"sampling_method": "rank", "sampling_alpha": 0.7}
    values = np.linspace(1.0, 0.0, 3000)
    assert sampling_probs(values, "rank", 8.0)[0] > 0.99
    assert sampling_probs(values, "rank", 0.7)[:600].sum() == pytest.approx(0.58, abs=0.02)


def _tiny_yaml(tmp_path: Path, pair, **kw) -> Path:
    src, tgt = pair
    vals = dict(
        source_model=str(src),
        target_model=str(tgt),
        dataset="synth",
        max_problems=4,
        eval_max_problems=3,
        num_beams=2,
        n_iterations=1,
        use_lora=True,
        lora_r=4,
        lora_alpha=8,
        eval_num_samples=2,
        max_new_tokens=16,
        train_batch_size=4,
        learning_rate=1e-3,
        chunk_size=2,
        workers=2,
    )
    vals.update(kw)
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(vals))
    return p


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from codedistill.btp._testing import build_throwaway_pair

    return build_throwaway_pair(tmp_path_factory.mktemp("exp_run_models"))


@pytest.mark.slow
def test_ablation_of_replay_settings_generates_nothing_new_and_rerun_is_free(pair, tmp_path):
    from codedistill.experiments.ablate import run_ablation

    cfg = _tiny_yaml(tmp_path, pair)
    out = tmp_path / "abl"
    s = run_ablation(cfg, out, "sampling_uniform,p_raw,keep_all,beam_3", log=lambda m: None)
    rows = {v["name"]: v for v in s["variants"]}
    assert all(v["status"] == "done" for v in rows.values()), [v["status"] for v in rows.values()]
    # the reference generated its source beams (4 problems x 2) and three evaluations (3 x 2 each)
    assert rows["full"]["generated_new"] == 4 * 2 + 3 * (3 * 2) and rows["full"]["diff"] is None
    for name in ("sampling_uniform", "p_raw"):
        g = read_jsonl(out / "variants" / name / "generated.jsonl")[-1]["generated"]
        assert g["source_beam"] == 0 and g["eval/target_iter0"] == 0 and g["eval/source"] == 0
        assert rows[name]["generated_new"] == 3 * 2  # only its own trained target's evaluation
        d = rows[name]["diff"]["pass@1"]
        assert d["ci_low"] <= d["diff"] <= d["ci_high"] and d["n_problems"] == 3
    # keep_all has the reference's settings (min_pass_rate 0): it shares the reference's run
    assert rows["keep_all"]["run_dir"] == "variants/full" and rows["keep_all"]["generated_new"] == 0
    assert rows["keep_all"]["diff"]["pass@1"]["diff"] == 0.0
    # beam_3 changes the beam phase: it generates its own beams (4 x 3), shares the evaluations
    g3 = read_jsonl(out / "variants" / "beam_3" / "generated.jsonl")[-1]["generated"]
    assert g3["source_beam"] == 4 * 3 and g3["eval/target_iter0"] == 0
    on_disk = json.loads((out / "ablation.json").read_text())
    assert on_disk["kind"] == "ablation" and on_disk["reference"] == "full" and on_disk["n_eval_problems"] == 3
    m = on_disk["variants"][0]["metrics"]["pass@1"]
    assert 0 <= m["ci_low"] <= m["value"] <= m["ci_high"] <= 1
    assert "| sampling_uniform |" in (out / "ablation.md").read_text()
    assert (out / "plots" / "ablation_pass1.png").read_bytes()[:4] == b"\x89PNG"
    # a second invocation generates nothing and gives the same table
    again = run_ablation(cfg, out, "sampling_uniform,p_raw,keep_all,beam_3", log=lambda m: None)
    for name in ("full", "sampling_uniform", "p_raw", "beam_3"):
        assert read_jsonl(out / "variants" / name / "generated.jsonl")[-1]["total"] == 0
    assert [v["metrics"] for v in again["variants"]] == [v["metrics"] for v in s["variants"]]
    # --table-only tabulates finished run directories and runs nothing
    t = run_ablation(cfg, out, "sampling_uniform,rft", log=lambda m: None, table_only=True)
    rows_t = {v["name"]: v for v in t["variants"]}
    assert rows_t["rft"]["status"] == "not run" and not (out / "variants" / "rft").exists()
    assert rows_t["sampling_uniform"]["metrics"] == rows["sampling_uniform"]["metrics"]
    assert rows_t["sampling_uniform"]["diff"] == rows["sampling_uniform"]["diff"]


@pytest.mark.slow
def test_run_command_then_matrix_reuses_the_run(pair, tmp_path):
    cfg = _tiny_yaml(tmp_path, pair, eval_source=False, output_dir=str(tmp_path / "run"))
    r = CliRunner().invoke(app, ["run", str(cfg), "--set", "sampling_method=greedy"])
    assert r.exit_code == 0, r.output
    assert "synth pass@1: target" in r.output
    conf = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert conf["sampling_method"] == "greedy" and conf["eval_protocol"] == "sampled"
    r = CliRunner().invoke(
        app, ["matrix", str(cfg), "--set", "sampling_method=greedy", "--output-dir", str(tmp_path / "mx")]
    )
    assert r.exit_code == 0, r.output
    mx = json.loads((tmp_path / "mx" / "matrix.json").read_text())
    row = mx["rows"][0]
    assert row["status"] == "done" and row["run_dir"] == str(tmp_path / "run") and row["same_family"] is False
    assert read_jsonl(tmp_path / "run" / "generated.jsonl")[-1]["total"] == 0  # the matrix reused the run
    comp = json.loads((tmp_path / "run" / "comparison.json").read_text())["datasets"]["synth"]
    assert row["before"]["value"] == comp["target_before"]["pass@1"]["value"]
    assert row["gain"]["diff"] == comp["improvement"]["pass@1"]["diff"]
    assert "| tiny.yaml |" in (tmp_path / "mx" / "matrix.md").read_text()
