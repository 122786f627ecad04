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
    # self-samples from the 3-shot prompt (vLLM's beam search is too slow on CPU), the merged
    # model served after fine-tuning
    assert (cfg.generation, cfg.num_samples, cfg.gen_temperature, cfg.gen_shots) == ("sample", 8, 0.8, 3)
    assert cfg.use_lora and cfg.serve_merged
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


def test_gen_shots_writes_the_buffer_from_the_few_shot_prompt_and_trains_on_the_zero_shot_one(tmp_path):
    """gen_shots=3: the buffer's generations see MBPP's 3-shot prompt (tasks 2-4 worked),
    training keeps the 0-shot prompt, and the generation cache keys the two apart."""
    from codedistill.btp.config import BTPConfig
    from codedistill.btp.phases.generate import gen_cache_parts
    from codedistill.btp.plan import ResolvedInputs
    from codedistill.data import load_problems

    plain = ResolvedInputs(BTPConfig(dataset="mbpp", max_problems=3, output_dir=str(tmp_path / "a")))
    shot = ResolvedInputs(BTPConfig(dataset="mbpp", max_problems=3, gen_shots=3, output_dir=str(tmp_path / "b")))
    three = {p.task_id: p.prompt for p in load_problems("mbpp", "train", shots=3)}
    assert [p.prompt for p in shot.train] == [p.prompt for p in plain.train]  # training: 0-shot
    for p in shot.train:
        g = shot.for_generation(p)
        assert g.prompt == three[p.task_id] and g.prompt.endswith(p.prompt) and len(g.prompt) > 3 * len(p.prompt)
        assert (g.task_id, g.tests) == (p.task_id, p.tests)
        assert plain.for_generation(p) is p

    class _Run:
        def __init__(self, inputs):
            self.inputs = inputs

    key = [gen_cache_parts(_Run(r), r.source_spec, "source", "t", r.train) for r in (plain, shot)]
    assert key[1] == {**key[0], "gen_shots": 3}
    with pytest.raises(ValueError, match="gen_shots=3 is MBPP's few-shot prompt; synth has none"):
        BTPConfig(dataset="synth", gen_shots=3)
    with pytest.raises(ValueError, match="gen_shots=2: MBPP's few-shot prompt has 3 worked examples"):
        BTPConfig(dataset="mbpp", gen_shots=2)
