"""Per-iteration evaluation metrics to the experiment trackers of ``report_to``.

The run directory stays the source of truth; this mirrors each iteration's held-out pass@k
(with its CI bounds) to TensorBoard (``<run>/tensorboard``), Weights & Biases (offline
unless configured) or MLflow (a local ``mlruns`` unless configured), at step = iteration.
The training loss curves go there through the trainer's own ``report_to``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def flat_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{dataset: pass@k report}`` -> ``{"eval/<dataset>/pass@1": v, ".../pass@1_ci_low": ...}``."""
    out: dict[str, float] = {}
    for ds, rep in metrics.items():
        parts = [("", rep)] + ([("base_", rep["base"])] if isinstance(rep.get("base"), Mapping) else [])
        for prefix, r in parts:  # HumanEval+ / MBPP+: also base_pass@k
            for k, m in r.items():
                if k.startswith("pass@") and isinstance(m, Mapping):
                    out[f"eval/{ds}/{prefix}{k}"] = float(m["value"])
                    out[f"eval/{ds}/{prefix}{k}_ci_low"] = float(m["ci_low"])
                    out[f"eval/{ds}/{prefix}{k}_ci_high"] = float(m["ci_high"])
    return out


def log_iteration(
    report_to: Sequence[str], run_dir: Path, iteration: int, metrics: Mapping[str, Mapping[str, Any]]
) -> None:
    values = flat_metrics(metrics)
    if not report_to or not values:
        return
    name = Path(run_dir).name
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard" / "eval"))
        for k, v in values.items():
            w.add_scalar(k, v, iteration)
        w.close()
    if "wandb" in report_to:
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "codedistill"),
            name=f"{name}-eval",
            dir=str(run_dir),
            id=f"{name}-eval".replace("/", "_"),
            resume="allow",
            reinit=True,
        )
        run.log({**values, "iteration": iteration})
        run.finish()
    if "mlflow" in report_to:
        import mlflow

        with mlflow.start_run(run_name=f"{name}-eval"):
            mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in values.items()}, step=iteration)
