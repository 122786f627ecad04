"""Each BTP setting is declared once (a section field of BTPConfig): the `codedistill btp`
options, the YAML keys and the trainer's settings all come from those declarations."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import typer
import yaml
from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo
from typer.testing import CliRunner

from codedistill.btp.cli import EXPANDED, btp_command, make_command
from codedistill.btp.config import (
    SECTIONS,
    BTPConfig,
    EvaluationSettings,
    GenerationSettings,
    build_config,
    load_config_file,
)
from codedistill.generation import ServingConfig
from codedistill.training.settings import (
    DUMP_WHEN_CHANGED,
    FLAGS,
    PER_PHASE,
    TrainingSettings,
    TrainSettings,
    train_settings_from,
    trainer_field,
)

# values the generic rule below cannot guess (validated names, JSON, comma lists)
SPECIAL: dict[str, tuple[list[str], Any]] = {
    "dataset": (["mbpp-sanitized"], "mbpp-sanitized"),
    "gen_shots": (["3"], 3),
    "sampling_method": (["rank"], "rank"),
    "eval_datasets": (["humaneval,mbpp"], ["humaneval", "mbpp"]),
    "report_to": (["tensorboard"], ["tensorboard"]),
    "lora_target_modules": (["q_proj, v_proj"], ["q_proj", "v_proj"]),
    "egcfg": (['{"max_agents": 2, "gammas": [0.0, 1.0]}'], {"max_agents": 2, "gammas": [0.0, 1.0]}),
    "base_url": (["http://a:1/v1", "http://b:2/v1"], ["http://a:1/v1", "http://b:2/v1"]),
    "extra_args": (["enforce-eager"], ["enforce-eager"]),
}


def _value_type(annotation: Any) -> Any:
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        return next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def _extra(name: str, f: FieldInfo) -> dict[str, Any]:
    """The field's option metadata (the serving section's kept in the CLI's EXPANDED table)."""
    own = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    serving = EXPANDED["serving"][1].get(name, {}) if name in ServingConfig.model_fields else {}
    return {**own, **serving}


def _flag(name: str, f: FieldInfo, value: bool | None = None) -> str:
    """The option that sets ``name``: its declared flags, else ``--name`` (``--no-name`` for False)."""
    extra = _extra(name, f)
    decls = list(
        extra.get(FLAGS)
        or [
            f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}"
            if value is not None
            else f"--{name.replace('_', '-')}"
        ]
    )
    if value is None:
        return decls[-1]
    on, off = decls[0].split("/")
    return on if value else off


def cli_case(name: str, f: FieldInfo) -> tuple[list[str], Any]:
    """Arguments that set ``name`` to a value other than its default, and that value as dumped."""
    default = f.get_default(call_default_factory=True)
    t = _value_type(f.annotation)
    if name in SPECIAL:
        values, expected = SPECIAL[name]
        return [a for v in values for a in (_flag(name, f), v)], expected
    if t is bool:
        value = not default
        return [_flag(name, f, value)], value
    if get_origin(t) is Literal:
        choice = next(c for c in get_args(t) if c != default)
        return [_flag(name, f), choice], choice
    if t is int:
        value = default + 1 if default is not None else 32
        return [_flag(name, f), str(value)], value
    if t is float:
        value = default / 2 if default else 0.5
        return [_flag(name, f), repr(value)], value
    if t is str:
        return [_flag(name, f), f"value-of-{name}"], f"value-of-{name}"
    raise AssertionError(f"{name}: no CLI value rule for {f.annotation}; add one to SPECIAL")


def settings_fields() -> list[tuple[str, str | None, FieldInfo]]:
    """(field, section it is nested in or None, declaration) of every setting with an option."""
    out: list[tuple[str, str | None, FieldInfo]] = []
    for name, f in BTPConfig.model_fields.items():
        if name in EXPANDED:
            out += [(n, name, sub) for n, sub in EXPANDED[name][0].model_fields.items()]
        else:
            out.append((name, None, f))
    return out


def _invoke(command: Any, args: list[str]) -> list[BTPConfig]:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return command.seen


def _capturing(config_cls: type[BTPConfig] = BTPConfig) -> Any:
    seen: list[BTPConfig] = []
    cmd = make_command(seen.append, config_cls)
    cmd.seen = seen
    return cmd


@pytest.mark.parametrize("name, nested, f", settings_fields(), ids=[n for n, _, _ in settings_fields()])
def test_every_setting_is_an_option_whose_value_reaches_the_config(name, nested, f):
    args, expected = cli_case(name, f)
    [cfg] = _invoke(_capturing(), args)
    dumped = cfg.model_dump()
    got = dumped[nested][name] if nested else dumped[name]
    assert got == expected, (args, got)


def test_the_shipped_command_has_one_option_per_setting_with_its_description():
    params = inspect.signature(btp_command).parameters
    assert set(params) == {"config"} | {n for n, _, _ in settings_fields()}
    for name, _, f in settings_fields():
        text = _extra(name, f).get("help") or f.description
        if text:
            assert params[name].default.help.startswith(text), name


@pytest.mark.parametrize(
    "args, field, value",
    [
        (["--lr", "0.003"], "learning_rate", 0.003),
        (["--learning-rate", "0.003"], "learning_rate", 0.003),
        (["--use-lora"], "use_lora", True),
        (["--full-finetune"], "use_lora", False),
        (["--train-batch-size", "4"], "train_batch_size", 4),
        (["--price-input", "0.27"], ("serving", "price_input_per_1m"), 0.27),
        (["--price-output", "1.1"], ("serving", "price_output_per_1m"), 1.1),
        (["--response-cache", "r.sqlite"], ("serving", "cache_path"), "r.sqlite"),
        (["--no-eval-source"], "eval_source", False),
    ],
)
def test_the_plans_flag_names_keep_their_meaning(args, field, value):
    [cfg] = _invoke(_capturing(), args)
    got = getattr(cfg.serving, field[1]) if isinstance(field, tuple) else getattr(cfg, field)
    assert got == value


def test_flags_override_the_yaml_one_by_one_also_inside_serving(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("num_beams: 7\nlearning_rate: 0.01\nserving:\n  concurrency: 3\n  max_n: 4\n")
    [cfg] = _invoke(_capturing(), ["--config", str(y), "--lr", "0.02", "--max-n", "9"])
    assert cfg.num_beams == 7 and cfg.learning_rate == 0.02
    assert cfg.serving.concurrency == 3 and cfg.serving.max_n == 9


def _all_changed() -> BTPConfig:
    """A config with every setting away from its default."""
    values: dict[str, Any] = {}
    for name, nested, f in settings_fields():
        expected = cli_case(name, f)[1]
        if nested:
            values.setdefault(nested, {})[name] = expected
        else:
            values[name] = expected
    return build_config(values, {})


def test_a_yaml_with_every_key_round_trips(tmp_path):
    cfg = _all_changed()
    dumped = cfg.model_dump()
    assert set(dumped) == set(BTPConfig.model_fields)
    y = tmp_path / "all.yaml"
    y.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    again = build_config(load_config_file(y), {})
    assert again.model_dump() == dumped and again == cfg


def test_the_resolved_config_keeps_its_keys_and_records_egcfg_as_given():
    d = BTPConfig().model_dump()
    quiet = {
        n
        for n, f in BTPConfig.model_fields.items()
        if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(DUMP_WHEN_CHANGED)
    }
    assert quiet == {"weight_decay", "max_grad_norm", "gen_shots", "serve_merged"}
    assert set(d) == set(BTPConfig.model_fields) - quiet and d["egcfg"] == {}
    cfg = build_config({"generation": "egcfg", "egcfg": {"max_agents": 3}, "max_new_tokens": 50}, {})
    assert cfg.model_dump()["egcfg"] == {"max_agents": 3}
    assert cfg.egcfg.max_new_tokens == 50 and len(cfg.egcfg.agents()) == 3  # the run's length, typed
    assert build_config(cfg.model_dump(), {}).model_dump() == cfg.model_dump()
    assert "weight_decay" in build_config({"weight_decay": 0.01}, {}).model_dump()


def test_sections_partition_the_config_and_read_on_their_own():
    names = [n for s in SECTIONS for n in s.model_fields]
    assert len(names) == len(set(names)) and set(names) == set(BTPConfig.model_fields)
    assert list(BTPConfig.model_fields) == names  # the resolved config's key order
    cfg = build_config({"learning_rate": 0.01, "eval_protocol": "paper", "num_beams": 2}, {})
    assert cfg.section(TrainingSettings).learning_rate == 0.01
    assert cfg.section(EvaluationSettings).eval_num_samples == 1
    assert cfg.section(GenerationSettings).num_beams == 2


def test_every_trainer_setting_comes_from_a_declared_setting():
    declared = {trainer_field(n): n for n in TrainingSettings.model_fields}
    for f in dataclasses.fields(TrainSettings):
        if f.name in PER_PHASE:
            continue
        assert f.name in declared, f"TrainSettings.{f.name} has no TrainingSettings field"
        section_default = TrainingSettings.model_fields[declared[f.name]].get_default(call_default_factory=True)
        if f.name != "lora_target_modules":
            trainer_default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert trainer_default == section_default, f.name
    cfg = _all_changed()
    s = train_settings_from(cfg, default_lora_targets=["c_attn"], prompt_special_tokens=False)
    for f in dataclasses.fields(TrainSettings):
        if f.name not in PER_PHASE:
            assert getattr(s, f.name) == getattr(cfg, declared[f.name]), f.name
    assert s.prompt_special_tokens is False and s.batch_size == cfg.train_batch_size


def test_lora_targets_default_to_the_models_and_all_linear_is_peft_string():
    cfg = build_config({}, {})
    assert train_settings_from(
        cfg, default_lora_targets=("q", "v"), prompt_special_tokens=True
    ).lora_target_modules == ["q", "v"]
    cfg = build_config({"lora_target_modules": "all-linear"}, {})
    assert (
        train_settings_from(cfg, default_lora_targets=("q",), prompt_special_tokens=True).lora_target_modules
        == "all-linear"
    )


class NewSection(BaseModel):
    warmup_steps: int = Field(0, ge=0, description="Warmup steps (overrides the ratio).")
    packing: bool = Field(False, description="Pack short examples into one sequence.")


class ExtendedConfig(NewSection, BTPConfig):
    pass


def test_a_new_setting_is_one_declaration():
    cmd = _capturing(ExtendedConfig)
    params = inspect.signature(cmd).parameters
    assert params["warmup_steps"].default.help == "Warmup steps (overrides the ratio)."
    assert params["packing"].default.param_decls == ("--packing/--no-packing",)
    [cfg] = _invoke(cmd, ["--warmup-steps", "7", "--packing", "--num-beams", "2"])
    assert isinstance(cfg, ExtendedConfig) and cfg.warmup_steps == 7 and cfg.packing and cfg.num_beams == 2
    assert cfg.model_dump()["warmup_steps"] == 7


def test_a_bad_value_is_refused_naming_the_setting():
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(_capturing())
    r = CliRunner().invoke(app, ["--egcfg", '{"nope": 1}'])
    assert r.exit_code == 2 and "egcfg.nope" in r.output


def test_serving_options_are_the_serving_configs_fields():
    assert EXPANDED["serving"][0] is ServingConfig
    names = {n for n, nested, _ in settings_fields() if nested == "serving"}
    assert names == set(ServingConfig.model_fields)
