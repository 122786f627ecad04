"""Reading the files of a run directory: JSON documents, the run's settings, BTP's iterations."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from codedistill.errors import DataError


def load_json(path: Path) -> Any:
    """The parsed file, or None when it does not exist."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from e


def settings(config_json: Mapping[str, Any] | None) -> dict[str, Any]:
    """The experiment settings of a config.json (``{"kind", "config": {...}, ...}``) or a bare dict."""
    c = (config_json or {}).get("config", config_json or {})
    return dict(c) if isinstance(c, Mapping) else {}


def iteration_stats(run_dir: Path, n_iterations: int) -> list[dict[str, Any]]:
    """``iter_K/stats.json`` of iterations 1..n_iterations, those that exist."""
    found = (load_json(Path(run_dir) / f"iter_{k}" / "stats.json") for k in range(1, n_iterations + 1))
    return [st for st in found if st]
