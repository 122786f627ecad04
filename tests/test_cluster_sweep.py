"""`codedistill sweep` workers sharing one study on a real PostgreSQL server.

The server is Debian's `postgresql` (initdb + pg_ctl in a temporary directory, run as an
unprivileged user when the tests run as root, on a free localhost port). Where its binaries
are missing the tests are skipped with the reason; with CODEDISTILL_REQUIRE_POSTGRES=1 (CI)
they fail instead.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from codedistill.runs import read_jsonl

REPO = Path(__file__).resolve().parents[1]
REQUIRE = os.environ.get("CODEDISTILL_REQUIRE_POSTGRES") == "1"
# the embedded config, cut to seconds a trial
TINY = [
    "max_problems=4",
    "eval_max_problems=2",
    "num_beams=2",
    "max_new_tokens=12",
    "eval_num_samples=2",
    "train_batch_size=4",
    "epochs=1",
    "chunk_size=2",
    "workers=2",
    "eval_source=false",
    "lora_r=4",
    "lora_alpha=8",
]


def _missing(why: str) -> None:
    if REQUIRE:
        pytest.fail(f"{why} (CODEDISTILL_REQUIRE_POSTGRES=1)")
    pytest.skip(why)


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries: Debian's /usr/lib/postgresql/<version>/bin, else PATH."""
    dirs = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda d: [int(x) for x in Path(d).parent.name.split(".") if x.isdigit()],
    )
    for d in reversed(dirs):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _as_server_user() -> tuple[dict, int | None]:
    """subprocess arguments that run a command as `nobody` when this process is root
    (PostgreSQL refuses to run as root), and that user's uid (None: run as we are)."""
    if os.geteuid() != 0:
        return {}, None
    pw = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)

    return {"preexec_fn": drop}, pw.pw_uid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of our own: yields its URL (database `postgres`, user `postgres`)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        _missing("PostgreSQL's initdb/pg_ctl are not installed (Debian: apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401  (SQLAlchemy's driver for postgresql:// URLs)
    except ImportError:
        _missing("the PostgreSQL driver psycopg is not installed (pip install 'codedistill[cluster]')")
    as_user, uid = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="codedistill-pg-"))
    if uid is not None:
        os.chown(root, uid, -1)
    data, port = root / "data", _free_port()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    r = subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        capture_output=True,
        text=True,
        env=env,
        **as_user,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=50 -F"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", opts]
    r = subprocess.run([*pg_ctl, "-w", "-t", "60", "start"], capture_output=True, text=True, env=env, **as_user)
    assert r.returncode == 0, r.stdout + r.stderr + (root / "server.log").read_text(errors="replace")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-w", "-m", "fast", "stop"], capture_output=True, env=env, **as_user)
        shutil.rmtree(root, ignore_errors=True)


def _study(url: str, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=url)


def test_a_dead_nodes_trial_is_taken_over_once_its_lease_expires(postgres, tmp_path):
    """A worker on another host that stops sending heartbeats (its node died; here a process
    that says it runs elsewhere, killed with kill -9): not touched while its heartbeat is
    fresh, then failed and enqueued again, with its parameters and run directory."""
    from codedistill.experiments.sweep import make_storage, open_study, recover_interrupted, retried

    script = tmp_path / "remote_worker.py"
    script.write_text(
        f"""
import time, warnings
import optuna
warnings.simplefilter("ignore")
# a worker of another node: Optuna's RDB storage beating every second, as codedistill's does
store = optuna.storages.RDBStorage({postgres!r}, heartbeat_interval=1, grace_period=3)
study = optuna.create_study(study_name="lease", storage=store, load_if_exists=True, direction="maximize")

def objective(trial):
    trial.set_user_attr("worker", {{"host": "a-node-that-died", "pid": 1, "trial": trial.number}})
    trial.set_user_attr("run_number", trial.number)
    trial.suggest_float("x", 0, 1)
    print("running", flush=True)
    time.sleep(600)

study.optimize(objective, n_trials=1)
"""
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        store, name = make_storage(tmp_path, postgres, lease=3)
        assert name == postgres
        study = open_study("lease", store, seed=0, n_trials=4)
        logs: list[str] = []
        assert recover_interrupted(study, logs.append, lease=3) == 0  # another host, heartbeat fresh
        assert [t.state.name for t in study.get_trials()] == ["RUNNING"]
    finally:
        proc.kill()
        proc.wait()
    time.sleep(4.5)  # the lease (3 s) passes without a heartbeat
    assert recover_interrupted(study, logs.append, lease=3) == 1
    assert recover_interrupted(study, logs.append, lease=3) == 0  # once
    first, again = study.get_trials()
    assert (first.state.name, again.state.name) == ("FAIL", "WAITING")
    assert again.params == first.params and again.user_attrs["run_number"] == 0
    assert retried(study.get_trials()) == {0}
    assert "trial 0 sent no heartbeat for 3 s: enqueued again, resuming trials/0" in logs


def test_storage_errors_name_the_fix(postgres, tmp_path):
    from codedistill.errors import ConfigError
    from codedistill.experiments.sweep import make_storage

    dead = f"postgresql://postgres:secret@127.0.0.1:{_free_port()}/postgres"
    with pytest.raises(ConfigError, match=r"cannot open the database .*check the URL") as e:
        make_storage(tmp_path, dead)
    assert "secret" not in str(e.value) and "postgres:***@" in str(e.value)


def _worker(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


@pytest.mark.slow
def test_two_workers_share_one_study_and_a_killed_workers_trial_is_recovered(postgres, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "codedistill", "sweep", str(REPO / "configs" / "demo.yaml"), "--trials", "3"]
    cmd += ["--storage", postgres, "--output-dir", str(out), "--lease", "30"]
    for s in TINY:
        cmd += ["--set", s]
    logs = {k: tmp_path / f"worker{k}.log" for k in (1, 2, 3)}
    w1, w2 = _worker(cmd, logs[1]), _worker(cmd, logs[2])
    procs = [w1, w2]
    try:
        # kill -9 worker 1 once its trial has tested its first beams (its run directory is half done)
        deadline, victim = time.time() + 900, None
        while time.time() < deadline and victim is None:
            assert w1.poll() is None, logs[1].read_text()[-3000:]
            try:
                running = _study(postgres, "btp-sweep-demo").get_trials(states=None)
            except Exception:  # the study is not created yet
                running = []
            for t in running:
                w = t.user_attrs.get("worker") or {}
                marker = out / "trials" / str(t.number) / "generations" / "source_beam.verdicts.jsonl"
                if t.state.name == "RUNNING" and w.get("pid") == w1.pid and marker.exists() and marker.stat().st_size:
                    victim = t.number
            time.sleep(0.2)
        assert victim is not None, "worker 1 never ran a trial"
        os.killpg(w1.pid, signal.SIGKILL)
        w1.wait()
        # a third worker starts on this host: it finds worker 1's trial (its process gone) and resumes it
        w3 = _worker(cmd, logs[3])
        procs.append(w3)
        for p, k in ((w2, 2), (w3, 3)):
            assert p.wait(timeout=1500) == 0, logs[k].read_text()[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = {k: logs[k].read_text() for k in logs}

    study = _study(postgres, "btp-sweep-demo")
    trials = study.get_trials()
    ran = [t for t in trials if not t.user_attrs.get("surplus")]
    finished = [t for t in ran if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3, [(t.number, t.state.name) for t in trials]  # --trials counts over all workers
    # worker 1's trial failed once and was run again, same parameters, same run directory
    killed = [t for t in ran if t.state.name == "FAIL"]
    assert [t.number for t in killed] == [victim]
    retry = next(t for t in ran if t.system_attrs.get("failed_trial") == victim)
    assert retry.state.name in ("COMPLETE", "PRUNED") and retry.params == killed[0].params
    assert retry.user_attrs["run_number"] == victim and retry.user_attrs["worker"]["pid"] in (w2.pid, w3.pid)
    assert f"trial {victim} was interrupted (process {w1.pid} is gone)" in text[2] + text[3]
    # every trial ran in its own run directory, by one worker, once (the recovered one resumed once)
    run_dirs = {d.name for d in (out / "trials").iterdir() if d.name != "base"}
    assert run_dirs == {str(t.user_attrs["run_number"]) for t in finished}
    for t in finished:
        starts = read_jsonl(out / "trials" / str(t.user_attrs["run_number"]) / "starts.jsonl")
        pids = [s["pid"] for s in starts]
        if t is retry:
            assert [s["resumed"] for s in starts] == [False, True] and pids == [w1.pid, t.user_attrs["worker"]["pid"]]
        else:
            assert pids == [t.user_attrs["worker"]["pid"]]
    assert {t.user_attrs["worker"]["pid"] for t in finished} <= {w1.pid, w2.pid, w3.pid}
    # the best trial evaluated on the test split once, by one of the two workers that finished
    s = json.loads((out / "sweep.json").read_text())
    best = s["best"]
    complete = [t for t in finished if t.state.name == "COMPLETE"]
    assert best["value"] == max(t.value for t in complete)
    evaluated = [k for k in (2, 3) if f"=== best trial {best['number']} on the test split" in text[k]]
    assert len(evaluated) == 1, evaluated
    test_starts = read_jsonl(out / best["test_run_dir"] / "starts.jsonl")
    assert (
        len(test_starts) == 1
        and json.loads((out / best["test_run_dir"] / "comparison.json").read_text())["eval_split"] == "test"
    )
    assert 0 <= best["test_metrics"]["pass@1"]["value"] <= 1
    assert s["storage"] == postgres and sum(1 for t in s["trials"] if t["interrupted"]) == 1
    assert len([t for t in s["trials"] if t["state"] != "FAIL"]) == 3

    # a second invocation after the study is complete runs nothing
    before = {p: p.stat().st_size for p in out.rglob("*.jsonl")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "nothing to run" in r.stderr + r.stdout and "=== trial" not in r.stderr + r.stdout
    assert len(_study(postgres, "btp-sweep-demo").get_trials()) == len(trials)
    assert {p: p.stat().st_size for p in out.rglob("*.jsonl")} == before
    assert json.loads((out / "sweep.json").read_text()) == s
