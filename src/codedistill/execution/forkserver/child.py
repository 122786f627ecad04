"""The run's own process (D): its descriptors, environment, limits and privileges, then
the harness. Everything here runs in a forked child of the server."""

from __future__ import annotations

import importlib
import json
import marshal
import os
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import harness, syscalls, timing, wire
from .isolation import Isolation

RECORDS_FD, JOB_FD, PROF_FD = 3, 4, 5
RUN_NAME = b"cd-sbx-run"
syscalls.name_buffer(RUN_NAME)  # made here, once, for every run
_chdir = os.chdir  # taken before the guard (which the guarded template applies) disables it


@dataclass
class Inherited:
    """Made once in the server before any fork, never used there: each child inherits
    them fresh. ``stdio``: the sandbox's stdin/stdout/stderr objects (fds 0-2 in the child);
    ``ctypes_modules``: the names of every loaded ctypes module."""

    stdio: tuple = ()
    ctypes_modules: tuple = ("ctypes", "_ctypes")


INHERITED = Inherited()


def prepare_inherited() -> None:
    """Fill :data:`INHERITED` (the server calls it once everything is imported)."""
    INHERITED.ctypes_modules = _loaded_ctypes_modules()
    INHERITED.stdio = _stdio()


def _loaded_ctypes_modules() -> tuple:
    return tuple(m for m in sys.modules if m in ("ctypes", "_ctypes") or m.startswith("ctypes."))


def report_child_error(ctl_w: int, e: BaseException) -> None:
    """In a forked child that failed before its job: say why on the control pipe (best
    effort; the caller then ``_exit``s)."""
    try:
        os.write(ctl_w, json.dumps({"error": repr(e)}).encode() + b"\n")
    except OSError:
        pass


def setup_fds(res_w: int, out_w: int, err_w: int, job_r: int | None = None, prof_w: int | None = None) -> None:
    """D's descriptors: 0 /dev/null, 1 stdout, 2 stderr, 3 records (4: the job;
    5: profiling timestamps, closed before the harness starts)."""
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.dup2(res_w, RECORDS_FD)
    if job_r is not None:
        os.dup2(job_r, JOB_FD)
        if prof_w is not None:
            os.dup2(prof_w, PROF_FD)
        os.closerange(PROF_FD if prof_w is None else PROF_FD + 1, 1 << 16)
    else:
        os.closerange(JOB_FD, 1 << 16)


_ENV_FOR: list[str] = []  # the workdir this process's environment is already set up for


def prepare_env(workdir: str) -> None:
    """The run's environment variables and ``tempfile.tempdir`` for ``workdir``. The template
    sets them once for all its runs (their workdir is always /tmp): a run that clears and
    refills ``os.environ`` itself writes to, and so copies, some seventy pages."""
    os.environ.clear()
    os.environ.update(
        {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
        }
    )
    tempfile.tempdir = workdir
    _ENV_FOR[:] = [workdir]


def setup_env(workdir: str) -> None:
    _chdir(workdir)
    if _ENV_FOR != [workdir]:
        prepare_env(workdir)
    sys.stdin, sys.stdout, sys.stderr = INHERITED.stdio or _stdio()


def _stdio() -> tuple:
    """Text streams on fds 0-2, left open (they are the process's standard streams)."""
    return (open(0, closefd=False), open(1, "w", closefd=False, buffering=1), open(2, "w", closefd=False, buffering=1))


def harness_args(
    job: dict, workdir: str, uid: int | None, *, drop: bool, pd: dict | None = None, prof_fd: int | None = None
) -> tuple:
    """D: limits, (``drop``) privileges, ctypes out of reach; returns the arguments of
    :func:`harness.main`."""
    lim = job["limits"]
    target = None
    if job.get("mode") == "call":
        mod, _, fn = job["target"].partition(":")
        target = getattr(importlib.import_module(mod), fn)
    syscalls.set_rlimits(lim)
    if drop:
        syscalls.drop_privileges(uid)
    # ctypes must not be reachable by name; calls through existing objects are refused by
    # the audit hook ("ctypes.call_function"). In tests mode nothing was imported since
    # the server listed the names once: going through sys.modules here would touch, and
    # so copy, every page that holds a module name. A call target may have imported more.
    for name in INHERITED.ctypes_modules if target is None else _loaded_ctypes_modules():
        sys.modules.pop(name, None)
    if pd is not None and prof_fd is not None:
        pd["d_main"] = timing.now()
        pd["f_main"] = timing.minflt()
        os.write(prof_fd, json.dumps({"prof_d": pd}).encode() + b"\n")
        os.close(prof_fd)
    return (
        job,
        RECORDS_FD,
        workdir,
        bool(lim.get("network")),
        job.get("mode", "tests"),
        bool(lim.get("audit_hook", True)),
        target,
    )


def exec_job(job: dict, workdir: str, uid: int | None) -> None:
    """D of the fallback layout: limits, privileges dropped, the harness; never returns."""
    harness.main(*harness_args(job, workdir, uid, drop=True))


def ready_child(
    iso: Isolation, tmp_mb: int, network: bool, uid: int | None, pipes: tuple[int, int, int, int, int]
) -> None:
    """D of a ready sandbox, pid 1 of its new namespaces: mounts a fresh tmpfs on /tmp and
    /proc for the pid namespace, drops its privileges, starts the harness thread, which
    waits for the job. ``pipes``: the write ends of records, stdout, stderr, control, and
    the read end of the job pipe."""
    res_w, out_w, err_w, ctl_w, job_r = pipes
    syscalls.set_name(RUN_NAME)
    os.setsid()
    syscalls.mount_tmp(tmp_mb, uid, iso.tmp_keep)
    if network:
        iso.enter_original_network()
        os.close(iso.orig_net)  # type: ignore[arg-type]  # network implies orig_net
    syscalls.mount_proc()
    if not timing.ENABLED:
        os.close(ctl_w)
    setup_fds(res_w, out_w, err_w, job_r, ctl_w if timing.ENABLED else None)
    setup_env("/tmp")
    # Privileges are dropped now, before the harness thread exists (credentials and
    # no_new_privs are per thread, inherited by threads started later). What is left for
    # the job (lowering rlimits, importing a call target) needs none. Safe although an
    # earlier run of this uid may still be dying: it cannot see this pid namespace; the
    # job is sent only once that one is gone (Server.run).
    syscalls.drop_privileges(uid)
    pd = {"d_wait": timing.now(), "f_wait": timing.minflt()} if timing.ENABLED else None
    harness.main_early(_job_reader(pd))


def _job_reader(pd: dict | None) -> Callable[[], tuple[Any, ...]]:
    def ready() -> tuple:  # in the harness thread
        job = read_job()
        if pd is not None:
            pd["d_job"] = timing.now()
            pd["f_job"] = timing.minflt()
        return harness_args(job, "/tmp", None, drop=False, pd=pd, prof_fd=PROF_FD)

    return ready


def read_job() -> dict:
    """The job the server writes to a ready sandbox: its JSON and the marshalled compiled
    tests (see :meth:`Server.send_job`)."""
    n_raw, n_blob = struct.unpack("<II", wire.read_exact(JOB_FD, 8))
    raw = wire.read_exact(JOB_FD, n_raw)
    blob = wire.read_exact(JOB_FD, n_blob) if n_blob else b""
    os.close(JOB_FD)
    job = json.loads(raw)
    if blob:
        job["_compiled"] = marshal.loads(blob)
    return job
