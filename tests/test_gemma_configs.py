"""configs/gemma_synth.yaml and configs/gemma_mbpp.yaml resolve to the runs they describe."""

from __future__ import annotations

from pathlib import Path

import pytest

from codedistill.errors import ConfigError
from codedistill.experiments.run import load_experiment, parse_sets
from codedistill.models.registry import resolve_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_gemma_synth_config():
    cfg = load_experiment(CONFIGS / "gemma_synth.yaml")
    assert (cfg.source_model, cfg.target_model, cfg.mode, cfg.dataset) == (
        "tiny-source",
        "gemma-3-270m",
        "finetune",
        "synth",
    )
    assert cfg.generation == "beam" and cfg.num_beams == 5 and cfg.use_lora
    assert cfg.eval_protocol == "sampled" and cfg.ks() == [1, 5]
    # cross family: the Llama source in process, the Gemma target served by vLLM
    assert cfg.role_backend("source", resolve_model(cfg.source_model)) == "hf"
    assert cfg.role_backend("target", resolve_model(cfg.target_model)) == "vllm"
    assert resolve_model(cfg.target_model).family == "gemma"
    assert cfg.serving.max_model_len == 2048
    assert cfg.output_dir == str(Path("results") / "run" / "gemma_synth")


def test_gemma_mbpp_config():
    cfg = load_experiment(CONFIGS / "gemma_mbpp.yaml")
    assert cfg.source_model == cfg.target_model == "gemma-3-270m"
    assert cfg.mode == "self" and cfg.dataset == "mbpp" and cfg.eval_datasets == ["humaneval"]
    assert cfg.generation == "beam" and cfg.num_beams == 5 and cfg.use_lora
    # the literature's protocol: greedy pass@1 (MBPP 3-shot, HumanEval 0-shot)
    assert (cfg.eval_protocol, cfg.eval_num_samples, cfg.eval_temperature, cfg.ks()) == ("paper", 1, 0.0, [1])
    for role in ("source", "target"):
        assert cfg.role_backend(role, resolve_model("gemma-3-270m")) == "vllm"
    assert cfg.min_pass_rate > 0 and not cfg.eval_source
    # pass@10 at T=0.8: the same config with the overrides its header gives
    sampled = load_experiment(
        CONFIGS / "gemma_mbpp.yaml",
        parse_sets(["eval_protocol=sampled", "eval_num_samples=10", "eval_temperature=0.8"]),
    )
    assert sampled.ks() == [1, 5, 10] and sampled.eval_temperature == 0.8


def test_gemma_config_overrides_are_checked():
    with pytest.raises(ConfigError, match="unknown setting 'num_beam'"):
        parse_sets(["num_beam=3"])
    with pytest.raises(ConfigError, match="eval_protocol"):
        load_experiment(CONFIGS / "gemma_mbpp.yaml", {"eval_protocol": "greedy"})
