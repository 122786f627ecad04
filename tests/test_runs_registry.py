import json

import pytest

from codedistill.errors import ConfigError
from codedistill.models.registry import REGISTRY, resolve_model
from codedistill.runs import RunDir


def test_registry_aliases_and_variants():
    # the plan's eight (gemma-3-270m is local weights, not one of the plan's models)
    plan = [a for a in REGISTRY if not REGISTRY[a].tiny and REGISTRY[a].family != "gemma"]
    assert len(plan) == 8
    s = resolve_model("starcoder2-15b")
    assert s.path == "bigcode/starcoder2-15b" and s.family == "starcoder2" and s.role == "source"
    q = resolve_model("Qwen2.5-Coder-7B-Instruct")
    assert q.path == "Qwen/Qwen2.5-Coder-7B-Instruct" and q.prompt_style == "chat"
    assert resolve_model("DeepSeek-V3-0324").backend == "openai"
    assert "down_proj" in resolve_model("CodeLlama-7B").lora_target_modules
    with pytest.raises(ConfigError, match="Known aliases: StarCoder2-15B"):
        resolve_model("StarCoder3-1B")
    with pytest.raises(ConfigError, match="no instruct variant"):
        resolve_model("StarCoder2-3B", "instruct")


def test_local_dir_resolves(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    s = resolve_model(str(tmp_path))
    assert s.path == str(tmp_path) and s.family == "qwen2"


def test_rundir_records_provenance_and_refuses_other_runs(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.open({"model": "m", "seed": 1}, kind="baseline") is False
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["config"]["seed"] == 1
    assert cfg["provenance"]["packages"]["torch"] and "git" in cfg["provenance"]
    assert run.open({"model": "m", "seed": 1}, kind="baseline") is True
    with pytest.raises(ConfigError, match="different run.*seed"):
        run.open({"model": "m", "seed": 2}, kind="baseline")
