"""A tiny process that creates the init process (pid 1) of each run's namespaces.

Started by the fork server (``python -I -S _zygote.py``, after the server has set up
its read-only mount namespace and empty network namespace, which it inherits) with a
request pipe on stdin and a reply pipe on stdout. For each byte it reads it clone()s
a child into new pid/mount/ipc/uts namespaces and answers with the child's pid
(4 bytes, little endian).

The child, C, is pid 1 of the new pid namespace. It only reaps the processes that get
orphaned to it and otherwise sleeps; the fork server forks the run's process D into
C's namespaces (``setns``), and ends the run by killing C, which kills everything in
the namespace. C is cloned from this small interpreter rather than from the warm
fork server, so creating and tearing it down copies a few hundred page-table
entries instead of the server's whole heap. Stdlib only; imports nothing of the
project.
"""

import ctypes
import os
import signal
import struct

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}[os.uname().machine]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_pylibc = ctypes.PyDLL(None, use_errno=True)  # calls keep the GIL
_pylibc.syscall.restype = ctypes.c_long
_api = ctypes.pythonapi


def _reap(*_):
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def _init() -> None:
    """C: pid 1 of a run's namespaces; reaps orphans until it is killed."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.closerange(3, 1 << 16)
    signal.signal(signal.SIGCHLD, _reap)
    while True:
        signal.pause()


def main() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # Cs are reaped by the kernel
    import gc
    gc.collect()
    gc.freeze()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | signal.SIGCHLD
    while True:
        try:
            if not os.read(0, 1):
                os._exit(0)
        except InterruptedError:
            continue
        _api.PyOS_BeforeFork()
        pid = _pylibc.syscall(_SYS_CLONE, ctypes.c_ulong(flags), 0, 0, 0, 0)
        if pid == 0:
            _api.PyOS_AfterFork_Child()
            try:
                _init()
            finally:
                os._exit(0)
        err = ctypes.get_errno()
        _api.PyOS_AfterFork_Parent()
        os.write(1, struct.pack("<i", pid if pid > 0 else -err))


if __name__ == "__main__":
    main()
