"""Jobs shared out among workers on a shared directory: claims raced by real processes, a
dead or frozen worker's claim taken over, the generation cache published by two processes at
once, and `codedistill ablate --worker` run by two processes on one output directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codedistill.experiments.claims import publish, run_once, stale_reason, try_claim
from codedistill.runs import read_jsonl

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve().parent / "claim_worker.py"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _race(mode: str, *args: object, n_procs: int = 2) -> list[dict]:
    """Start ``n_procs`` helper processes that act at the same instant; their JSON outputs."""
    start = time.time() + 4.0  # every process imports and waits, then all act at once
    procs = [
        subprocess.Popen(
            [sys.executable, str(HELPER), mode, str(args[0]), repr(start), *map(str, args[1:])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for _ in range(n_procs)
    ]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=120)
        assert p.returncode == 0, e
        outs.append(json.loads(o))
    return outs


def test_of_processes_claiming_at_once_each_job_has_one_winner(tmp_path):
    outs = _race("claim", tmp_path, 40, 60)
    won = [set(o["won"]) for o in outs]
    assert won[0].isdisjoint(won[1]) and won[0] | won[1] == set(range(40))
    assert not any(o["taken_over"] for o in outs)  # the winners are alive: nothing was stale
    locks = sorted(p.name for p in tmp_path.glob("j*.lock"))
    assert len(locks) == 40 and not list(tmp_path.glob(".*.new"))  # no temporary left behind


def test_a_dead_workers_claims_are_taken_over_by_exactly_one_of_two_takers(tmp_path):
    # a worker that claimed 30 jobs, then died (its process gone, on this host)
    out = subprocess.run(
        [sys.executable, str(HELPER), "claim", str(tmp_path), "0", "30", "60"],
        capture_output=True,
        text=True,
        env=ENV,
        check=True,
    )
    assert json.loads(out.stdout)["won"] == list(range(30))
    assert try_claim(tmp_path, "j0", lease=60) is not None  # the pid is gone: no need to wait for the lease
    outs = _race("claim", tmp_path, 30, 60)
    won = [set(o["won"]) for o in outs]
    assert won[0].isdisjoint(won[1]) and won[0] | won[1] == set(range(1, 30))
    # each lock now names its winner (one that moved the dead lock aside, or the other one that
    # created the new lock first once the name was free: either way one owner)
    owners = {json.loads((tmp_path / f"j{i}.lock").read_text())["pid"] for i in range(1, 30)}
    assert owners <= {o["pid"] for o in outs} and set(outs[0]["taken_over"]) | set(outs[1]["taken_over"])
    assert not list(tmp_path.glob(".*.stale"))


def test_a_remote_claim_holds_while_its_heartbeat_is_fresh_then_expires(tmp_path):
    lock = tmp_path / "job.lock"
    rec = {"job": "job", "host": "another-node", "pid": 1, "token": "t0", "since": time.time()}
    assert publish(lock, rec) and not publish(lock, {**rec, "token": "t1"})  # exclusive
    beat = tmp_path / ".job.lock.t0.beat"  # its owner's heartbeat: the file's modification time
    beat.write_text("{}")
    os.utime(beat, (time.time() - 5, time.time() - 5))
    assert stale_reason(lock, rec, lease=30) is None and try_claim(tmp_path, "job", lease=30) is None
    os.utime(beat, (time.time() - 45, time.time() - 45))
    assert stale_reason(lock, rec, lease=30) == "no heartbeat for 45 s (lease 30 s)"
    c = try_claim(tmp_path, "job", lease=30)
    assert c is not None and c.taken_over == "another-node:1 (no heartbeat for 45 s (lease 30 s))"
    assert json.loads(lock.read_text())["pid"] == os.getpid() and not (tmp_path / ".job.lock.t0.beat").exists()
    c.release()
    assert not lock.exists()
    # a live owner on this host is never taken over while it beats
    rec_here = {**rec, "host": socket.gethostname(), "pid": os.getpid(), "token": "t2"}
    publish(lock, rec_here)
    (tmp_path / ".job.lock.t2.beat").write_text("{}")
    assert try_claim(tmp_path, "job", lease=30) is None


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_a_frozen_worker_loses_its_claim_and_stops(tmp_path, sigint):
    """A worker stopped (SIGSTOP: a node frozen, swapping) for longer than the lease is
    presumed dead and its job taken over; when it wakes up it sees that and stops. Also
    when it was started with SIGINT ignored, as `worker &` in a script or nohup start it
    (the lost claim reaches the main thread as a simulated SIGINT)."""

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    p = subprocess.Popen(
        [sys.executable, str(HELPER), "hold", str(tmp_path), "job", "1.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=ignore_sigint if sigint == "ignored" else None,
    )
    try:
        assert p.stdout.readline().strip() == "holding"
        time.sleep(1.0)
        assert try_claim(tmp_path, "job", lease=1.5) is None  # it beats
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(2.5)
        c = try_claim(tmp_path, "job", lease=1.5)
        assert c is not None and "no heartbeat" in c.taken_over
        with c:
            os.kill(p.pid, signal.SIGCONT)
            assert p.wait(timeout=30) == 3
            assert p.stdout.read().startswith(f"lost: the claim on job.lock was taken over by {socket.gethostname()}:")
            assert c.still_mine()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_run_once_does_the_job_once_and_a_rerun_nothing(tmp_path):
    calls: list[int] = []
    assert run_once(tmp_path, "table", lambda: calls.append(1), lease=30, log=lambda m: None)
    assert not run_once(tmp_path, "table", lambda: calls.append(2), lease=30, log=lambda m: None)
    assert calls == [1] and (tmp_path / "table.done").exists() and not (tmp_path / "table.lock").exists()
    with pytest.raises(RuntimeError):  # a failed job leaves no done marker and no lock
        run_once(tmp_path, "other", lambda: (_ for _ in ()).throw(RuntimeError("boom")), lease=30, log=print)
    assert not (tmp_path / "other.done").exists() and not (tmp_path / "other.lock").exists()


def test_two_processes_publishing_the_same_cache_entries_at_once(tmp_path):
    """The generation cache's atomic rename on a directory that two workers share: every
    entry is published by exactly one of them and reads back whole; no temporary is left."""
    from codedistill.btp.gencache import GenerationCache

    outs = _race("publish", tmp_path / "cache", 25)
    won = [set(o["won"]) for o in outs]
    assert won[0].isdisjoint(won[1]) and won[0] | won[1] == set(range(25))
    cache = GenerationCache(tmp_path / "cache")
    rows = [{"i": i, "text": "x" * 2000} for i in range(200)]
    for i in range(25):
        assert cache.get_rows("beams", {"k": i}, "rows") == rows
        assert cache.get_rows("beams", {"k": i}, "verdicts") == rows[:50]
    assert sorted(p.name for p in (tmp_path / "cache" / "beams").iterdir() if p.name.startswith(".")) == []


# ---- `codedistill ablate --worker` ----------------------------------------------------------
VARIANTS = "sampling_uniform,keep_all,beam_3"
TINY = [
    "max_problems=4",
    "eval_max_problems=2",
    "replay_size=8",
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


def _ablate(out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "codedistill", "ablate", str(REPO / "configs" / "demo.yaml"), "--variants", VARIANTS]
    cmd += ["--output-dir", str(out), *extra]
    for s in TINY:
        cmd += ["--set", s]
    return cmd


def _table(out: Path) -> list[dict]:
    keep = ("name", "status", "metrics", "diff", "run_dir")
    return [{k: v[k] for k in keep} for v in json.loads((out / "ablation.json").read_text())["variants"]]


@pytest.mark.slow
def test_two_ablate_workers_run_every_variant_once_and_give_the_single_process_table(tmp_path):
    single = tmp_path / "single"
    r = subprocess.run(_ablate(single), capture_output=True, text=True, timeout=1800, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    out = tmp_path / "shared"
    logs = [tmp_path / f"worker{k}.log" for k in (1, 2)]
    procs = [
        subprocess.Popen(
            _ablate(out, "--worker", "--lease", "60"), stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV
        )
        for log in logs
    ]
    try:
        for p, log in zip(procs, logs):
            assert p.wait(timeout=1800) == 0, log.read_text()[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = [log.read_text() for log in logs]
    # three distinct runs (keep_all has full's settings and shares its run directory), each run once
    runs = {"full", "sampling_uniform", "beam_3"}
    assert {d.name for d in (out / "variants").iterdir()} == runs
    by: dict[str, list[int]] = {}
    for name in runs:
        assert len(read_jsonl(out / "variants" / name / "generated.jsonl")) == 1, name
        starts = read_jsonl(out / "variants" / name / "starts.jsonl")
        assert [s["resumed"] for s in starts] == [False], name
        by.setdefault(name, []).extend(k for k in (0, 1) if f"=== ablation variant {name} (worker" in text[k])
        assert len(by[name]) == 1, (name, by[name])
    assert {k for ks in by.values() for k in ks} == {0, 1}  # both workers ran variants
    # the table, written once by the worker that finished last, equals the single process's
    assert len(list((out / "claims").glob("table-*.done"))) == 1
    # (what each variant generated itself may differ: two variants started at once both make the
    # source's beams that one of them makes for the other in a single process)
    assert _table(out) == _table(single) and len(_table(out)) == 4
    assert not list((out / "claims").glob("*.lock"))

    # a third worker after the end runs nothing and leaves the table as it is
    before = {p: p.stat().st_size for p in out.rglob("*.jsonl")}
    table = (out / "ablation.json").read_text()
    r = subprocess.run(_ablate(out, "--worker"), capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "nothing to run" in r.stderr + r.stdout and "=== ablation variant" not in r.stderr + r.stdout
    assert {p: p.stat().st_size for p in out.rglob("*.jsonl")} == before and (
        out / "ablation.json"
    ).read_text() == table
