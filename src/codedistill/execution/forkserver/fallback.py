"""The layout without a ready sandbox (no template: namespaces refused, or disabled).

The server forks B, a child subreaper that (in new namespaces where it may) forks C,
enforces the deadline and kills every descendant and every sandbox-uid process; C forks
D, the run's process, and reports how D ended. B reports on the control pipe: C's pid,
then whether the run timed out, how many processes were left behind, how C ended.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import tempfile
import time

from . import child, syscalls
from .collect import Pipes, RunCollector
from .isolation import Isolation


def start_cold(iso: Isolation, job: dict) -> RunCollector:
    """Fork B for ``job``; the collector of its run."""
    res_r, res_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    t0 = time.monotonic()
    b = os.fork()
    if b == 0:
        try:
            for fd in (res_r, out_r, err_r, ctl_r):
                os.close(fd)
            _supervise(iso, job, res_w, out_w, err_w, ctl_w)
        except BaseException as e:  # noqa: BLE001
            child.report_child_error(ctl_w, e)
        finally:
            os._exit(70)
    for fd in (res_w, out_w, err_w, ctl_w):
        os.close(fd)
    return RunCollector(b, os.pidfd_open(b), Pipes(res_r, out_r, err_r, ctl_r), job["limits"], t0, direct=False)


def _supervise(iso: Isolation, job: dict, res_w: int, out_w: int, err_w: int, ctl_w: int) -> None:
    """B: starts C in the run's namespaces, enforces the deadline, cleans up, reports."""
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)
    lim = job["limits"]
    uid = iso.run_uid
    if iso.caps["pid"]:
        syscalls.unshare(syscalls.CLONE_NEWNS | syscalls.CLONE_NEWPID | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWUTS)
    workdir = _workdir(iso, lim)
    syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
    c = os.fork()
    if c == 0:
        try:
            _run_namespace(iso, job, (res_w, out_w, err_w, ctl_w), workdir, uid)
        finally:
            os._exit(71)
    for fd in (res_w, out_w, err_w):
        os.close(fd)
    os.write(ctl_w, json.dumps({"child": c}).encode() + b"\n")
    timed_out, st = _wait_until(c, time.monotonic() + float(lim["timeout"]))
    left = _reap_zombies() if iso.caps["pid"] else _kill_all_of(uid)
    info: dict = {"timed_out": timed_out, "left_behind": left}
    if os.WIFSIGNALED(st):
        info["ns_signal"] = os.WTERMSIG(st)
    else:
        info["ns_exit_code"] = os.WEXITSTATUS(st)
    if workdir != "/tmp":
        shutil.rmtree(workdir, ignore_errors=True)
    os.write(ctl_w, json.dumps(info).encode() + b"\n")
    os._exit(0)


def _wait_until(c: int, deadline: float) -> tuple[bool, int]:
    """(timed out, wait status) of C, killed at ``deadline``."""
    pidfd = os.pidfd_open(c)
    ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
        os.kill(c, signal.SIGKILL)
    _, st = os.waitpid(c, 0)
    return not ready, st


def _workdir(iso: Isolation, lim: dict) -> str:
    """In the run's own mount namespace: a fresh tmpfs on /tmp; else a temp dir. Also
    re-enters the original network namespace when the run may use it."""
    uid = iso.run_uid
    if iso.namespaced:
        syscalls.mount_tmp(syscalls.tmp_size_mb(lim), uid, iso.tmp_keep)
        workdir = "/tmp"
    else:
        workdir = tempfile.mkdtemp(prefix="cdsbx-")
        if uid is not None:
            os.chown(workdir, uid, uid)
    if lim.get("network"):
        iso.enter_original_network()
    return workdir


def _run_namespace(
    iso: Isolation, job: dict, pipes_w: tuple[int, int, int, int], workdir: str, uid: int | None
) -> None:
    """C: runs the program in D and reports how D ended."""
    res_w, out_w, err_w, ctl_w = pipes_w
    os.setsid()
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if iso.namespaced:
        syscalls.mount_proc()
    d = os.fork()
    if d == 0:
        try:
            os.close(ctl_w)
            child.setup_fds(res_w, out_w, err_w)
            child.setup_env(workdir)
            child.exec_job(job, workdir, uid)
        finally:
            os._exit(72)
    for fd in (res_w, out_w, err_w):
        os.close(fd)
    _reap_until(d, ctl_w)


def _reap_until(d: int, ctl_w: int) -> None:
    """C as the namespace's init: reap everything; D's end ends the namespace."""
    while True:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if pid == d:
            info = {"signal": os.WTERMSIG(st)} if os.WIFSIGNALED(st) else {"exit_code": os.WEXITSTATUS(st)}
            os.write(ctl_w, json.dumps(info).encode() + b"\n")
            os._exit(0)


def _reap_zombies() -> int:
    """The namespace died with C: only zombies to collect. Returns 0 (nothing was left)."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    return 0


def _kill_all_of(uid: int | None) -> int:
    """Kill every remaining descendant (we are their subreaper) and every process of the
    sandbox uid; return how many had to be killed."""
    me = os.getpid()
    killed = 0
    for _ in range(50):
        victims = _descendants_and_uid(me, uid)
        if not victims:
            break
        for v in victims:
            try:
                os.kill(v, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        _reap_some()
    _reap_zombies()
    return killed


def _descendants_and_uid(me: int, uid: int | None) -> list[int]:
    """Our children (orphans reparented to us included) and the processes of ``uid``."""
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []
    victims = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
            mine = ppid == me
            if not mine and uid is not None:
                mine = os.stat(f"/proc/{name}").st_uid == uid
        except (OSError, ValueError):
            continue
        if mine and int(name) != me:
            victims.append(int(name))
    return victims


def _reap_some() -> None:
    """Reap the children that are gone; pause briefly once none is left to reap."""
    while True:
        try:
            p, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if p == 0:
            time.sleep(0.002)
            break
