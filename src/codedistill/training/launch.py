"""The training phase as its own program, for ``accelerate launch`` (DDP, FSDP, DeepSpeed).

``codedistill btp --num-processes N`` generates and tests in its own (single) process and
runs each fine-tuning phase as

    accelerate launch [--config_file codedistill/assets/accelerate/<name>.yaml] --num_processes N \\
        -m codedistill.training.launch <job.json>

The job file holds everything the phase needs (base model, settings, seed, device, the
examples' file, where to save); every process runs :func:`run_job`, the main process
saves the adapter (or model) and writes ``result.json`` (the loss curve, the same on all
processes). The parent then reads it back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from codedistill.errors import ConfigError
from codedistill.models.loading import load_tokenizer
from codedistill.resources import resource_path
from codedistill.training.settings import TrainExample, TrainSettings

CONFIG_DIR = resource_path("assets/accelerate")
NAMED_CONFIGS = ("ddp", "fsdp", "zero2", "zero3")


def resolve_accelerate_config(name: str | None) -> Path | None:
    """``ddp | fsdp | zero2 | zero3`` (codedistill/assets/accelerate/<name>.yaml) or a path."""
    if not name:
        return None
    p = Path(name)
    if p.is_file():
        return p
    if name in NAMED_CONFIGS and (CONFIG_DIR / f"{name}.yaml").is_file():
        return CONFIG_DIR / f"{name}.yaml"
    raise ConfigError(
        f"accelerate config {name!r} not found: use one of {', '.join(NAMED_CONFIGS)} "
        "(codedistill/assets/accelerate/) or the path of an `accelerate config` YAML"
    )


def launch_command(
    job: Path,
    num_processes: int,
    accelerate_config: str | None = None,
    python: str = sys.executable,
    device: str = "cuda",
) -> list[str]:
    cmd = [python, "-m", "accelerate.commands.launch"]
    cfg = resolve_accelerate_config(accelerate_config)
    if cfg is not None:
        text = cfg.read_text()
        kind = "FSDP" if "distributed_type: FSDP" in text else "DeepSpeed" if "DEEPSPEED" in text else None
        if kind and not device.startswith("cuda"):
            # accelerate (1.15) switches to FSDP/DeepSpeed only from a multi-accelerator state
            # (AcceleratorState: MULTI_GPU/NPU/XPU/...), never from MULTI_CPU: on CPU the run
            # would silently be plain DDP
            raise ConfigError(
                f"{cfg.name} ({kind}) needs GPUs: accelerate does not shard models over CPU "
                "processes; on CPU use --accelerate-config ddp (or just --num-processes N)"
            )
        if kind == "DeepSpeed":
            if importlib.util.find_spec("deepspeed") is None:
                raise ConfigError(f"{cfg.name} uses DeepSpeed: pip install 'codedistill[deepspeed]' (or deepspeed)")
        cmd += ["--config_file", str(cfg)]
    elif num_processes > 1:
        cmd += ["--multi_gpu"]  # torchrun-style processes; on CPU they train with gloo
    cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--dynamo_backend", "no"]
    if cfg is None:
        cmd += ["--mixed_precision", "no"]  # the Trainer's bf16/fp16 flags decide
    return cmd + ["-m", "codedistill.training.launch", str(job)]


def write_job(
    job_dir: Path,
    *,
    base: str | Path,
    settings: TrainSettings,
    examples: Sequence[TrainExample],
    seed: int,
    device: str,
    dtype: str,
    init_from: str | Path | None,
    out_dir: str | Path,
) -> Path:
    job_dir.mkdir(parents=True, exist_ok=True)
    ex_path = job_dir / "examples.jsonl"
    with ex_path.open("w") as f:
        for ex in examples:
            f.write(json.dumps(asdict(ex)) + "\n")
    job = {
        "base": str(base),
        "settings": asdict(settings),
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "init_from": str(init_from) if init_from else None,
        "out_dir": str(out_dir),
        "examples": str(ex_path),
        "result": str(job_dir / "result.json"),
    }
    path = job_dir / "job.json"
    path.write_text(json.dumps(job, indent=1))
    return path


def run_launched(
    job: Path, num_processes: int, accelerate_config: str | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run one training phase under ``accelerate launch``; its result.json."""
    result = Path(json.loads(job.read_text())["result"])
    result.unlink(missing_ok=True)
    cmd = launch_command(job, num_processes, accelerate_config, device=json.loads(job.read_text())["device"])
    if log is not None:
        log(f"  launching: {' '.join(cmd[1:])}")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"the launched training failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    return json.loads(result.read_text())


def run_job(job_path: str | Path) -> dict[str, Any]:
    """What every launched process runs."""
    from accelerate import PartialState

    from codedistill.training.trainer import prepare_model, save_trained, train

    job = json.loads(Path(job_path).read_text())
    device = job["device"]
    state = PartialState(cpu=device == "cpu")
    if device.startswith("cuda"):
        device = f"cuda:{state.local_process_index}"
    settings = TrainSettings(**job["settings"])
    examples = [TrainExample(**json.loads(line)) for line in Path(job["examples"]).read_text().splitlines() if line]
    tok = load_tokenizer(job["base"])
    model = prepare_model(
        job["base"], settings, seed=job["seed"], device=device, dtype=job["dtype"], init_from=job["init_from"]
    )
    result = train(model, tok, examples, settings, seed=job["seed"])
    trainer = result.trainer
    out_dir = Path(job["out_dir"])
    sharded = trainer is not None and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)
    if sharded:  # the library gathers the sharded weights; every process takes part
        target = out_dir / ("adapter" if settings.use_lora else "model")
        trainer.save_model(str(target))
        if state.is_main_process:
            tok.save_pretrained(str(target))
            (target / "training_args.bin").unlink(missing_ok=True)
    elif state.is_main_process:
        save_trained(model, tok, out_dir, settings.use_lora)
    state.wait_for_everyone()
    info = result.to_dict()
    info["num_processes"] = state.num_processes
    info["distributed_type"] = str(state.distributed_type).split(".")[-1]
    if state.is_main_process:
        tmp = Path(job["result"]).with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(job["result"])
    return info


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.exit("usage: accelerate launch ... -m codedistill.training.launch JOB.json")
    run_job(args[0])


if __name__ == "__main__":
    main()
