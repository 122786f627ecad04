"""``codedistill btp``: the typer command function (registered by codedistill.cli) and a
standalone one-command app for ``experiments/step2_btp_finetune_experiment.py``.

The options are generated from BTPConfig's field declarations: the field's name is the flag
(``num_beams`` -> ``--num-beams``; a bool is ``--x/--no-x``), its description the help, and its
``json_schema_extra`` ``flags`` the option names where they differ (``--lr``,
``--use-lora/--full-finetune``). Lists take one comma-separated value; nested settings (egcfg)
a JSON object; the serving section's fields are options of their own. Every option defaults to
"not given" (None) so that ``--config F`` (YAML) values apply unless a flag overrides them;
unset everywhere, BTPConfig's defaults apply.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from codedistill.btp.config import BTPConfig, build_config, load_config_file
from codedistill.generation import ServingConfig
from codedistill.training.settings import FLAGS
from codedistill.ui import friendly_errors

HELP = "help"
#: field metadata: a list option given once per value (``--base-url A --base-url B``)
REPEAT = "repeat"
#: option metadata of the serving section's fields (ServingConfig): names and help where the
#: field's own name or description does not serve as the option's
SERVING_OPTIONS: dict[str, dict[str, Any]] = {
    "base_url": {REPEAT: True, HELP: "OpenAI-compatible endpoint(s) of the served model; repeat for replicas."},
    "api_key_env": {HELP: "Environment variable with the API key (DeepSeek: DEEPSEEK_API_KEY)."},
    "served_model_name": {HELP: "Name the endpoint knows the source by (DeepSeek: deepseek-chat)."},
    "concurrency": {HELP: "Requests in flight (served backends)."},
    "max_retries": {HELP: "Retries of a failed request."},
    "request_timeout": {HELP: "Seconds per request."},
    "max_n": {HELP: "Largest n per request the endpoint takes."},
    "tensor_parallel_size": {HELP: "vLLM: GPUs per replica."},
    "data_parallel_size": {HELP: "vLLM: replicas."},
    "gpu_memory_utilization": {HELP: "vLLM: share of GPU memory."},
    "max_model_len": {HELP: "vLLM: context length."},
    "price_input_per_1m": {FLAGS: ["--price-input"], HELP: "USD per 1M prompt tokens (cost in the report)."},
    "price_output_per_1m": {FLAGS: ["--price-output"], HELP: "USD per 1M completion tokens."},
    "cache_path": {FLAGS: ["--response-cache"]},  # help: the field's description
    "startup_timeout": {HELP: "vLLM: seconds the server may take to start."},
    "extra_args": {REPEAT: True, HELP: "A vLLM server flag (repeatable)."},
}
#: nested settings whose fields are options of their own: field -> (model, option metadata)
EXPANDED: dict[str, tuple[type[BaseModel], Mapping[str, Mapping[str, Any]]]] = {
    "serving": (ServingConfig, SERVING_OPTIONS),
}
CONFIG_OPTION = inspect.Parameter(
    "config",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=Path | None,
    default=typer.Option(None, "--config", help="YAML file of settings (flags override it)."),
)
Run = Callable[[BTPConfig], None]


def _value_type(annotation: Any) -> Any:
    """The field's type without ``None`` (``Optional[int]`` -> ``int``)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def option_type(annotation: Any, repeat: bool = False) -> Any:
    """The option's type: the field's scalar type; a list is one comma-separated string (a list
    of strings if ``repeat``); a choice, a mapping or nested settings (JSON) a string."""
    t = _value_type(annotation)
    if repeat:
        return list[str]
    return t if t in (bool, int, float, str) else str


def option_names(name: str, annotation: Any, extra: Mapping[str, Any]) -> list[str]:
    if extra.get(FLAGS):
        return list(extra[FLAGS])
    flag = "--" + name.replace("_", "-")
    return [f"{flag}/--no-{flag[2:]}" if _value_type(annotation) is bool else flag]


def _help(f: FieldInfo, extra: Mapping[str, Any]) -> str:
    text = extra.get(HELP) or f.description or ""
    choices = get_args(_value_type(f.annotation)) if get_origin(_value_type(f.annotation)) is Literal else ()
    if choices and not all(str(c) in text for c in choices):
        text = f"{text} ({' | '.join(map(str, choices))})".strip()
    return text


def field_option(name: str, f: FieldInfo, overrides: Mapping[str, Any] | None = None) -> inspect.Parameter:
    """One field's typer option (default None: not given)."""
    extra = {**(f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}), **(overrides or {})}
    typ = option_type(f.annotation, bool(extra.get(REPEAT)))
    opt = typer.Option(None, *option_names(name, f.annotation, extra), help=_help(f, extra))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=typ | None)


def config_options(config_cls: type[BTPConfig] = BTPConfig) -> list[inspect.Parameter]:
    """The options of every field of ``config_cls`` (nested EXPANDED sections field by field)."""
    params: list[inspect.Parameter] = []
    for name, f in config_cls.model_fields.items():
        if name in EXPANDED:
            model, meta = EXPANDED[name]
            params += [field_option(n, sub, meta.get(n)) for n, sub in model.model_fields.items()]
        else:
            params.append(field_option(name, f))
    names = [p.name for p in params]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"settings {clashes} are declared twice (a section and an expanded one): rename one")
    return params


def config_from_flags(
    config_path: Path | None, flags: Mapping[str, Any], config_cls: type[BTPConfig] = BTPConfig
) -> BTPConfig:
    """Defaults < the YAML file < the flags given; an expanded section's flags override the YAML's
    values of that section one by one."""
    yaml_values = load_config_file(config_path) if config_path else {}
    values = dict(flags)
    for name, (model, _) in EXPANDED.items():
        given = {k: values.pop(k) for k in model.model_fields if k in values}
        given = {k: v for k, v in given.items() if v is not None}
        if given:
            values[name] = {**dict(yaml_values.get(name) or {}), **given}
    return build_config(yaml_values, values, config_cls)


def make_command(run: Run, config_cls: type[BTPConfig] = BTPConfig, doc: str = "") -> Callable[..., None]:
    """A typer command with ``--config`` and one option per setting of ``config_cls``; it calls
    ``run`` with the resolved config."""

    def command(config: Path | None = None, **flags: Any) -> None:
        run(config_from_flags(config, flags, config_cls))

    params = [CONFIG_OPTION, *config_options(config_cls)]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return friendly_errors(command)


def run_and_summarize(cfg: BTPConfig) -> None:
    from codedistill.btp.loop import run_btp

    comparison = run_btp(cfg, log=lambda m: typer.echo(m, err=True))
    for ds, e in comparison["datasets"].items():
        b, a = e["target_before"].get("pass@1"), e["target_after"].get("pass@1")
        if b and a:
            typer.echo(
                f"{ds}: target pass@1 {b['value']:.3f} -> {a['value']:.3f} ({e['improvement']['pass@1']['diff']:+.3f})"
            )


btp_command = make_command(
    run_and_summarize, doc="Step 2, BTP: source beams -> tests -> P2Value-prioritized replay -> fine-tune the target."
)
btp_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
btp_app.command(name="btp")(btp_command)


def main(argv: list[str] | None = None) -> None:
    btp_app(list(sys.argv[1:] if argv is None else argv), prog_name="step2_btp_finetune_experiment.py")
