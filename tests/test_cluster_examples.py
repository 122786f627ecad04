"""The launch examples (examples/slurm_sweep.sbatch, examples/ssh_hosts.sh) are valid bash,
and the codedistill commands they run parse as CLI invocations whose settings load.

Each script runs for real under bash, with `codedistill` a recorder that writes its arguments
(a dry run) and, for the ssh example, `ssh` a stand-in that runs the remote command string
through a local shell, as ssh hands it to the remote one. The recorded arguments are then
parsed by the real CLI (click's parser behind typer: types, ranges, flags) and the settings
resolved by the real config loader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command

from codedistill.cli import app
from codedistill.experiments.run import load_experiment, parse_sets

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DB = "postgresql://sweeper:s3cret@db.cluster.example:5432/codedistill"


@pytest.mark.parametrize("script", ["slurm_sweep.sbatch", "ssh_hosts.sh"])
def test_examples_are_valid_bash(script):
    r = subprocess.run(["bash", "-n", str(EXAMPLES / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _stand_ins(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "codedistill.jsonl"
    (bin_dir / "codedistill").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"with open({str(record)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    (bin_dir / "ssh").write_text('#!/bin/bash\necho "$1" >> "$SSH_HOSTS"\nshift\nexec bash -c "$*"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": sys.prefix,  # the scripts activate .venv only outside one
        "SHARED": str(tmp_path / "shared"),
        "DB_URL": DB,
        "SSH_HOSTS": str(tmp_path / "hosts.txt"),
        "GPUS": "2",
    }
    return env, record


def _parse(argv: list[str]):
    """The real CLI's parse of ``codedistill ARGV`` (no command is run)."""
    name, *rest = argv
    cmd = get_command(app).commands[name]  # type: ignore[attr-defined]
    return name, cmd.make_context(name, rest).params


def _check(argv: list[str], job: str, shared: Path) -> None:
    name, params = _parse(argv)
    assert name == job
    sets = parse_sets(params["set_"])
    cfg = load_experiment(REPO / params["config"], sets)  # the settings load (aliases, ranges)
    assert (cfg.backend, cfg.num_processes, cfg.serving.tensor_parallel_size) == ("vllm", 2, 2)
    assert params["lease"] == 600
    if job == "sweep":
        assert params["storage"] == DB and params["output_dir"] == shared / "sweep" and params["trials"] == 32
    else:
        assert params["worker"] and params["output_dir"] == shared / "ablation" and params["variants"] == "all"


@pytest.mark.parametrize("job", ["sweep", "ablate"])
def test_the_slurm_array_task_runs_one_worker(tmp_path, job):
    env, record = _stand_ins(tmp_path)
    env.update(JOB=job, SLURM_ARRAY_TASK_ID="3", SLURM_SUBMIT_DIR=str(REPO))
    r = subprocess.run(["bash", str(EXAMPLES / "slurm_sweep.sbatch")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "worker 3 on " in r.stdout
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 1
    _check(calls[0], job, tmp_path / "shared")


@pytest.mark.parametrize("job", ["sweep", "ablate"])
def test_the_ssh_loop_starts_one_worker_per_host(tmp_path, job):
    env, record = _stand_ins(tmp_path)
    env.update(JOB=job, HOSTS="gpu-a gpu-b gpu-c", REPO=str(REPO))
    r = subprocess.run(["bash", str(EXAMPLES / "ssh_hosts.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(Path(env["SSH_HOSTS"]).read_text().split()) == ["gpu-a", "gpu-b", "gpu-c"]
    assert sorted(p.name for p in (tmp_path / "shared" / "logs").iterdir()) == ["gpu-a.log", "gpu-b.log", "gpu-c.log"]
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 3 and all(c == calls[0] for c in calls)
    _check(calls[0], job, tmp_path / "shared")


def test_a_bad_job_name_stops_with_the_choices(tmp_path):
    env, _ = _stand_ins(tmp_path)
    env.update(JOB="train", SLURM_SUBMIT_DIR=str(REPO))
    for script in ("slurm_sweep.sbatch", "ssh_hosts.sh"):
        r = subprocess.run(["bash", str(EXAMPLES / script)], env=env, capture_output=True, text=True)
        assert r.returncode == 2 and "JOB must be sweep or ablate, not train" in r.stderr
