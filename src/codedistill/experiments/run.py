"""``codedistill run CONFIG.yaml``: one whole experiment from a config file.

Step-1 evaluations of the source and the target, BTP, the target's evaluation after each
iteration, comparison.json, report.md and plots: :func:`codedistill.btp.loop.run_btp` on
the YAML's settings plus ``--set key=value`` overrides. Rerunning the same command resumes
and skips whatever the run directory already holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from codedistill.btp.config import BTPConfig, build_config, load_config_file
from codedistill.btp.loop import run_btp
from codedistill.errors import ConfigError
from codedistill.models.tiny import ensure_tiny_models
from codedistill.report.format import fmt_diff, fmt_metric
from codedistill.runs import read_jsonl

Log = Callable[[str], None]


def parse_sets(items: Iterable[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: YAML scalar}``; keys checked against BTPConfig."""
    import yaml

    out: dict[str, Any] = {}
    valid = sorted(BTPConfig.model_fields)
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (e.g. --set sampling_alpha=3)")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in BTPConfig.model_fields:
            raise ConfigError(f"unknown setting {key!r} in --set; valid keys: {', '.join(valid)}")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: {value!r} is not a YAML value ({e})") from e
    return out


def check_keys(values: Mapping[str, Any], where: str) -> None:
    bad = sorted(k for k in values if k.replace("-", "_") not in BTPConfig.model_fields)
    if bad:
        raise ConfigError(
            f"{where}: unknown setting(s) {', '.join(bad)}; valid keys: {', '.join(sorted(BTPConfig.model_fields))}"
        )


def default_run_dir(config_path: str | Path) -> Path:
    return Path("results") / "run" / Path(config_path).stem


def load_experiment(
    config_path: str | Path, overrides: Mapping[str, Any] | None = None, output_dir: str | Path | None = None
) -> BTPConfig:
    """The resolved BTPConfig of a config file + overrides (output dir: flag > YAML/--set >
    results/run/<config stem>)."""
    values = load_config_file(config_path)
    check_keys(values, str(config_path))
    values.update(dict(overrides or {}))
    if output_dir is not None:
        values["output_dir"] = str(output_dir)
    values.setdefault("output_dir", str(default_run_dir(config_path)))
    if values.get("output_dir") is None:
        values["output_dir"] = str(default_run_dir(config_path))
    return build_config(values, {})


def ensure_models(cfg: BTPConfig) -> None:
    """Build the embedded tiny models side by side on first use (one lock, one wait)."""
    if "tiny-" in cfg.source_model or "tiny-" in cfg.target_model:
        ensure_tiny_models()


def run_experiment(cfg: BTPConfig, log: Log = print) -> dict[str, Any]:
    ensure_models(cfg)
    return run_btp(cfg, log=log)


def generated_total(run_dir: str | Path) -> int:
    """Programs a run directory's starts generated, over all its starts."""
    return int(sum(r.get("total", 0) for r in read_jsonl(Path(run_dir) / "generated.jsonl")))


def summary_lines(comparison: Mapping[str, Any]) -> list[str]:
    lines = []
    for ds, e in comparison["datasets"].items():
        for k, imp in e["improvement"].items():
            lines.append(
                f"{ds} {k}: target {fmt_metric(e['target_before'].get(k))} -> "
                f"{fmt_metric(e['target_after'].get(k))}, gain {fmt_diff(imp)}"
                + (f"; source {fmt_metric(e['source'].get(k))}" if "source" in e else "")
            )
    return lines
