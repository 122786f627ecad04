"""The warm fork server: a long-lived process that runs one sandbox per job.

Started by :class:`codedistill.execution.pool.SandboxPool` as
``python -I -S _server.py`` (so importing it pulls in no project code and no site
packages beyond the ``sys.path`` the pool sends). It speaks length-prefixed JSON over
stdin/stdout: one init message, then jobs -> raw results, in order. The pool may queue
a second job before the first is answered; the server reads its input ahead (and while
writing a result), so neither side can block the other.

Per run (namespace layout)::

    server (root, private mount ns with everything read-only, private empty net ns,
            enforces the wall-clock deadline, reads the pipes)
      ├─ zygote (``_zygote.py``, a small interpreter started once)
      │    └─ C: clone()d into new pid/mount/ipc/uts namespaces; pid 1 there (root,
      │          trusted); only reaps orphans until it is killed
      └─ D: forked by the server into C's pid namespace (setns), joins C's mount/ipc/uts
            namespaces, mounts a size-limited tmpfs on /tmp and /proc for the pid
            namespace, setsid, drops to the sandbox uid (no_new_privs, not dumpable),
            starts the harness thread, which waits for the job; then rlimits, audit
            hook, harness (program + tests)

While more jobs are queued, the next sandbox (C and D up to waiting for its job) is made
ready while the current one runs, so a job only has to be written to a waiting D. When
the harness's end record arrives, C is killed (which kills the whole pid namespace) and
the result goes back at once; if more jobs are queued, the namespace's teardown (a few
milliseconds, mostly the kernel freeing the mount namespace) is collected later: runs
alternate between two sandbox uids, and a run starts only when every earlier run of its
uid is gone. When no job is queued the server collects everything before it answers,
so an idle pool has no process besides its servers and their zygotes. D is the server's
child, so its exit status comes straight from ``waitpid``.

Set ``CODEDISTILL_SANDBOX_PROFILE=1`` (in the pool's environment) for per-step
timestamps in each raw result (``ctl["prof"]``).

Fallback without namespaces (or without a pid namespace): the server forks B, a child
subreaper that forks C, enforces the deadline and kills every descendant and every
sandbox-uid process; C forks D. Where namespaces are refused the server warns once and
falls back to: the sandbox uid (when root), a per-run temporary directory, the audit
hook, and B as child subreaper killing every descendant (and every process of the
sandbox uid) at the end.
"""

from __future__ import annotations

import ctypes
import json
import marshal
import os
import resource
import select
import signal
import struct
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and aarch64 (generic table)
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1

_PROF = bool(os.environ.get("CODEDISTILL_SANDBOX_PROFILE"))  # per-step timings


def _now() -> int:
    return time.perf_counter_ns()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_pylibc = ctypes.PyDLL(None, use_errno=True)  # calls keep the GIL
_pylibc.syscall.restype = ctypes.c_long
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)


def clone(flags: int) -> int:
    """fork() into new namespaces in one step (like ``os.fork``; 0 in the child)."""
    if _SYS_CLONE is None:
        raise OSError("clone: unsupported architecture")
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = _pylibc.syscall(_SYS_CLONE, ctypes.c_ulong(flags | signal.SIGCHLD), 0, 0, 0, 0)
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
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


def mount(src, target, fstype, flags, data=None) -> None:
    enc = (lambda s: s.encode() if isinstance(s, str) else s)
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), "prctl")


def _make_root_readonly() -> None:
    """Every mount of this (private) mount namespace becomes read-only."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    ret = _libc.syscall(SYS_MOUNT_SETATTR, -100, b"/", AT_RECURSIVE, ctypes.byref(attr),
                        ctypes.sizeof(attr))
    if ret == 0:
        return
    # Older kernels: bind-remount each mount point read-only (never a superblock remount,
    # which would change the file system for everybody).
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            points.append(line.split()[4].replace("\\040", " "))
    for p in points:
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        keep = 0
        for flag, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
                         (os.ST_NOEXEC, MS_NOEXEC)):
            if st.f_flag & flag:
                keep |= ms
        try:
            mount(None, p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError:
            pass
    with open("/proc/self/mountinfo") as f:
        rw = [line.split()[4] for line in f if line.split()[5].split(",")[0] == "rw"]
    if "/" in rw:
        raise OSError("could not make / read-only")


def _expose(paths: list[str]) -> None:
    """Make ``paths`` readable by the sandbox uid in this mount namespace.

    An ancestor that others may not traverse (``/root`` holding a pyenv install, say) is
    covered with an empty tmpfs into which only the needed children are bind-mounted;
    the rest of that directory stays hidden.
    """
    import stat as st_

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
            if st_.S_ISDIR(mode) and not mode & 0o001:
                blocked.setdefault(cur, set()).add(cur + "/" + parts[i + 1])
                break
    for anc in sorted(blocked):
        if any(anc.startswith(other + "/") for other in blocked if other != anc):
            continue
        fds = {}
        for child in blocked[anc]:
            fds[child] = os.open(child, os.O_PATH)
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


def _paths_under_tmp(paths: list[str]) -> list[str]:
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


def _mount_tmp(opts: str, keep: list[str]) -> None:
    """A fresh tmpfs on /tmp, with ``keep`` (import paths under /tmp) bind-mounted back,
    read-only, at the same places. Runs as root, before the uid is dropped."""
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
                os.chmod(d, 0o755)
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


# --------------------------------------------------------------------------- protocol
def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def recv(fd: int):
    (n,) = struct.unpack("<I", _read_exact(fd, 4))
    return json.loads(_read_exact(fd, n))


def frame(obj) -> bytes:
    data = json.dumps(obj).encode()
    return struct.pack("<I", len(data)) + data


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def send(fd: int, obj) -> None:
    write_all(fd, frame(obj))


class _Input:
    """The server's end of the job pipe, read ahead without blocking.

    The pool keeps more than one job in flight per server; reading ahead lets the
    server see that more work is queued (and prepare the next sandbox early), and
    draining it while a result is written means neither side can block the other.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()
        self.eof = False
        os.set_blocking(fd, False)

    def pump(self) -> None:
        while not self.eof:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                return
            self.buf += chunk

    def _complete(self) -> int:
        """Length of the first complete message in the buffer (with its prefix), or 0."""
        if len(self.buf) < 4:
            return 0
        (n,) = struct.unpack_from("<I", self.buf)
        return 4 + n if len(self.buf) >= 4 + n else 0

    def pending(self) -> bool:
        """True when another message has (at least partly) arrived."""
        self.pump()
        return len(self.buf) > 0

    def recv_raw(self) -> bytes:
        while True:
            n = self._complete()
            if n:
                raw = bytes(self.buf[4:n])
                del self.buf[:n]
                return raw
            if self.eof:
                raise EOFError
            select.select([self.fd], [], [])
            self.pump()

    def send(self, out: int, obj) -> None:
        """Write ``obj`` to ``out`` (non-blocking) while reading ahead on our input."""
        view = memoryview(frame(obj))
        while view:
            try:
                n = os.write(out, view)
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            r, _, _ = select.select([] if self.eof else [self.fd], [out], [])
            if r:
                self.pump()


def _close_fds_except(keep) -> None:
    lo = 0
    for fd in sorted(set(keep)):
        if fd > lo:
            os.closerange(lo, fd)
        lo = max(lo, fd + 1)
    os.closerange(lo, 1 << 16)


class _Warm:
    """A sandbox made ready before its job: C (pid 1 of fresh namespaces, from the
    zygote) and D, forked by the server into C's namespaces, with /tmp and /proc
    mounted, blocked reading the job pipe (still root; nothing untrusted ran yet)."""

    __slots__ = ("pid", "pidfd", "c_pidfd", "job_w", "res_r", "out_r", "err_r", "ctl_r",
                 "key", "uid")

    def __init__(self, pid, pidfd, c_pidfd, job_w, res_r, out_r, err_r, ctl_r, key, uid):
        self.pid, self.pidfd, self.c_pidfd, self.job_w = pid, pidfd, c_pidfd, job_w
        self.res_r, self.out_r, self.err_r, self.ctl_r = res_r, out_r, err_r, ctl_r
        self.key, self.uid = key, uid

    def alive(self) -> bool:
        return not select.select([self.pidfd, self.c_pidfd], [], [], 0)[0]

    def discard(self) -> None:
        _kill_pidfd(self.c_pidfd)
        _kill_pidfd(self.pidfd)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        select.select([self.c_pidfd], [], [], 5.0)
        for fd in (self.pidfd, self.c_pidfd, self.job_w, self.res_r, self.out_r, self.err_r,
                   self.ctl_r):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _kill_pidfd(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass


# --------------------------------------------------------------------------- server
class Server:
    def __init__(self, init: dict):
        self.uid = init.get("uid")  # None: keep our uid
        # Runs alternate between these uids, so that a run can start while the previous
        # one's namespace is still being torn down (see _collect).
        self.uids = [u for u in init.get("uids") or [self.uid] if u is not None] or [None]
        self.n_runs = 0
        self.dying: list[tuple[int, int, int | None]] = []  # killed Cs: (pid, pidfd, uid)
        self.caps = {"mount": False, "net": False, "pid": False, "uid": False}
        self.warnings: list[str] = []
        self.orig_net = None
        self.warm: _Warm | None = None
        self.zygote: tuple[int, int, int] | None = None  # (pid, request fd, reply fd)
        self.own_pidns: int | None = None
        self.init_requested = False  # a C was requested from the zygote and not read
        self.tmp_keep: list[str] = []  # import paths under /tmp to bind back into each run's /tmp
        root = os.geteuid() == 0
        if root and self.uid is not None:
            self.caps["uid"] = True
        elif self.uid is not None:
            self.warnings.append("not root: programs run under the caller's uid "
                                 "(no setuid isolation, RLIMIT_NPROC counts all its processes)")
        if init.get("namespaces", True):
            try:
                unshare(CLONE_NEWNS)
                mount(None, "/", None, MS_REC | MS_PRIVATE)
                import_paths = list(sys.path) + [sys.prefix, sys.base_prefix, sys.exec_prefix]
                self.tmp_keep = _paths_under_tmp(import_paths)
                if self.uid is not None and root:
                    _expose(import_paths)
                _make_root_readonly()
                self.caps["mount"] = True
            except OSError as e:
                self.warnings.append(f"mount namespace refused ({e}); file system writes are "
                                     "limited by uid permissions and the audit hook only")
            try:
                self.orig_net = os.open("/proc/self/ns/net", os.O_RDONLY)
                unshare(CLONE_NEWNET)
                self.caps["net"] = True
            except OSError as e:
                self.warnings.append(f"network namespace refused ({e}); the network is blocked "
                                     "by the audit hook only")
            self.caps["pid"] = self._probe_pidns()
            if not self.caps["pid"]:
                self.warnings.append("pid namespace refused; process trees are killed by a "
                                     "child subreaper instead")
            self._start_zygote()
        else:
            self.warnings.append("namespaces disabled by configuration")

    def _compiled(self, setup: str, tests: list[str]):
        """Trusted test code compiled once per server and inherited by every fork."""
        key = (setup, tuple(tests))
        cache = self.__dict__.setdefault("_code_cache", {})
        if key not in cache:
            if len(cache) > 512:
                cache.clear()
            from _harness_bootstrap import compile_tests
            try:
                cache[key] = compile_tests(setup, tests)
            except Exception as e:  # noqa: BLE001 - reported by the harness
                cache[key] = e
        return cache[key]

    @staticmethod
    def _probe_pidns() -> bool:
        pid = os.fork()
        if pid == 0:
            try:
                unshare(CLONE_NEWPID | CLONE_NEWNS)
                c = os.fork()
                if c == 0:
                    os._exit(0 if os.getpid() == 1 else 3)
                _, st = os.waitpid(c, 0)
                os._exit(os.waitstatus_to_exitcode(st))
            except BaseException:
                os._exit(2)
        _, st = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(st) == 0

    # ------------------------------------------------------------------ one run
    @property
    def warm_ok(self) -> bool:
        """Sandboxes can be made ready ahead of their job (the namespace layout)."""
        return self.zygote is not None

    def _start_zygote(self) -> None:
        """Start the zygote (``_zygote.py``) that creates each run's pid-1 process, C."""
        if not (self.caps["pid"] and self.caps["mount"] and _SYS_CLONE is not None):
            return
        try:
            self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY)
            req_r, req_w = os.pipe()
            rep_r, rep_w = os.pipe()
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_zygote.py")
            pid = os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", path],
                                 {"PATH": "/usr/bin:/bin"},
                                 file_actions=[(os.POSIX_SPAWN_DUP2, req_r, 0),
                                               (os.POSIX_SPAWN_DUP2, rep_w, 1)])
            os.close(req_r)
            os.close(rep_w)
            self.zygote = (pid, req_w, rep_r)
        except OSError as e:
            self.warnings.append(f"zygote not started ({e}); sandboxes are created per run")

    def _key(self, lim: dict) -> tuple[int, bool]:
        """What a ready sandbox depends on: the /tmp size and the network namespace."""
        return (max(8, int(lim["max_file_mb"]) * 4),
                bool(lim.get("network")) and self.orig_net is not None)

    def _compiled_blob(self, setup: str, tests: list[str]) -> bytes:
        """Trusted test code compiled once per server, marshalled for the sandbox.
        Empty when it does not compile: the harness compiles it and reports the error."""
        key = (setup, tuple(tests))
        cache = self.__dict__.setdefault("_blob_cache", {})
        blob = cache.get(key)
        if blob is None:
            if len(cache) > 512:
                cache.clear()
            from _harness_bootstrap import compile_tests
            try:
                blob = marshal.dumps(compile_tests(setup, tests))
            except Exception:  # noqa: BLE001 - reported by the harness
                blob = b""
            cache[key] = blob
        return blob

    def run(self, job: dict, raw: bytes | None = None, more=lambda: False) -> dict:
        """One run. ``raw`` is the job as received (forwarded to the sandbox as is);
        ``more()`` says whether another job is already queued, in which case the next
        sandbox is made ready while this one runs."""
        if not self.warm_ok:
            return self._run_cold(job)
        lim = job["limits"]
        prof = {"s0": _now()} if _PROF else None
        key = self._key(lim)
        self.reap(block=False)
        sb, self.warm = self.warm, None
        if sb is not None and (sb.key != key or not sb.alive()):
            sb.discard()
            sb = None
        if sb is None:
            sb = self._prepare(key, self._next_uid())
        self.n_runs += 1
        self.reap(uid=sb.uid)  # nothing of an earlier run of this uid may be left
        if prof:
            prof["s_ready"] = _now()
        blob = b""
        if job.get("mode", "tests") == "tests":
            blob = self._compiled_blob(job.get("test_setup", ""), list(job["tests"]))
        if raw is None:
            raw = json.dumps(job).encode()
        t0 = time.monotonic()
        try:
            write_all(sb.job_w, struct.pack("<II", len(raw), len(blob)) + raw + blob)
        except OSError:
            pass  # the sandbox died before reading its job: reported by _collect
        os.close(sb.job_w)
        sb.job_w = None
        if prof:
            prof["s_sent"] = _now()
        if more():
            try:
                self.warm = self._prepare(key, self._next_uid(), True)
            except OSError:
                self.warm = None
        if prof:
            prof["s_next"] = _now()
        return self._collect(sb.pid, sb.pidfd, sb.res_r, sb.out_r, sb.err_r, sb.ctl_r, lim,
                             t0, True, prof, (sb.uid, more), sb.c_pidfd)

    def _next_uid(self):
        return self.uids[self.n_runs % len(self.uids)] if self.caps["uid"] else None

    def reap(self, block: bool = True, uid=False) -> None:
        """Collect killed runs (all of them, or those of ``uid``; ``block=False``: only
        those already gone). A run is gone when its C has exited: C's exit waits for
        every process of its pid namespace to be dead and reaped, D (our child, reaped
        here first) included."""
        left = []
        for d, d_pidfd, c_pidfd, u in self.dying:
            if uid is not False and u != uid:
                left.append((d, d_pidfd, c_pidfd, u))
                continue
            if d_pidfd is not None:
                if not block and not select.select([d_pidfd], [], [], 0)[0]:
                    left.append((d, d_pidfd, c_pidfd, u))
                    continue
                try:
                    os.waitpid(d, 0)
                except ChildProcessError:
                    pass
                os.close(d_pidfd)
                d_pidfd = None
            if not select.select([c_pidfd], [], [], None if block else 0)[0]:
                left.append((d, d_pidfd, c_pidfd, u))
                continue
            os.close(c_pidfd)
        self.dying = left

    def discard_warm(self) -> None:
        if self.warm is not None:
            self.warm.discard()
            self.warm = None
        self.drop_requested_init()

    def _new_init(self, more: bool = False) -> int:
        """A fresh C from the zygote; returns its pidfd. With ``more``, the next C is
        requested at once (and read at the next call), so that the server does not wait
        for the zygote while runs are queued."""
        pid, req_w, rep_r = self.zygote
        try:
            if not self.init_requested:
                os.write(req_w, b"c")
            self.init_requested = False
            (c,) = struct.unpack("<i", _read_exact(rep_r, 4))
            if more:
                os.write(req_w, b"c")
                self.init_requested = True
        except (OSError, EOFError):
            os._exit(3)  # the zygote is gone: the pool restarts this server
        if c < 0:
            raise OSError(-c, f"clone: {os.strerror(-c)}")
        return os.pidfd_open(c)

    def drop_requested_init(self) -> None:
        """Going idle: end the C requested ahead, if any."""
        if self.init_requested:
            pidfd = self._new_init()
            _kill_pidfd(pidfd)
            select.select([pidfd], [], [], 5.0)
            os.close(pidfd)

    def _prepare(self, key: tuple[int, bool], uid, more: bool = False) -> _Warm:
        """Get C (pid 1 of new pid/mount/ipc/uts namespaces) from the zygote and fork D
        into them; D mounts /tmp and /proc there and waits (still root, nothing
        untrusted loaded) for its job."""
        tmp_mb, network = key
        c_pidfd = self._new_init(more)
        fds = [os.pipe() for _ in range(5)]
        (res_r, res_w), (out_r, out_w), (err_r, err_w), (ctl_r, ctl_w), (job_r, job_w) = fds
        d = -1
        try:
            setns(c_pidfd, CLONE_NEWPID)  # our next child is born in C's pid namespace
            try:
                d = os.fork()
            finally:
                if d != 0:
                    setns(self.own_pidns, CLONE_NEWPID)
        except BaseException:
            _kill_pidfd(c_pidfd)
            os.close(c_pidfd)
            for pair in fds:
                for fd in pair:
                    os.close(fd)
            raise
        if d == 0:
            try:
                keep = [0, 1, 2, res_w, out_w, err_w, ctl_w, job_r, c_pidfd]
                if network:
                    keep.append(self.orig_net)
                _close_fds_except(keep)
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                self._warm_child(c_pidfd, tmp_mb, network, uid, res_w, out_w, err_w, ctl_w,
                                 job_r)
            except BaseException as e:  # noqa: BLE001
                try:
                    os.write(ctl_w, json.dumps({"error": repr(e)}).encode() + b"\n")
                except OSError:
                    pass
            finally:
                os._exit(70)
        for fd in (res_w, out_w, err_w, ctl_w, job_r):
            os.close(fd)
        return _Warm(d, os.pidfd_open(d), c_pidfd, job_w, res_r, out_r, err_r, ctl_r, key,
                     uid)

    def _run_cold(self, job: dict) -> dict:
        """Without the namespace layout: B (child subreaper) supervises C (see _nsparent)."""
        lim = job["limits"]
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        if job.get("mode", "tests") == "tests":
            job["_compiled"] = self._compiled(job.get("test_setup", ""), list(job["tests"]))
        t0 = time.monotonic()
        b = os.fork()
        if b == 0:
            code = 70
            try:
                for fd in (res_r, out_r, err_r, ctl_r):
                    os.close(fd)
                self._nsparent(job, res_w, out_w, err_w, ctl_w)
            except BaseException as e:  # noqa: BLE001
                try:
                    os.write(ctl_w, json.dumps({"error": repr(e)}).encode() + b"\n")
                except OSError:
                    pass
            finally:
                os._exit(code)
        for fd in (res_w, out_w, err_w, ctl_w):
            os.close(fd)
        return self._collect(b, os.pidfd_open(b), res_r, out_r, err_r, ctl_r, lim, t0, False,
                             None, None)

    def _collect(self, b, pidfd, res_r, out_r, err_r, ctl_r, lim, t0, direct, prof,
                 defer, c_pidfd=None) -> dict:
        """Read the run's pipes until it is over; enforce the deadline (``direct``: b is
        D, the run's process; ``c_pidfd`` is its pid 1, C: killing C kills the whole run).

        When the harness's end record arrives, the namespace is killed at once. If
        ``defer`` is ``(uid, more)`` and ``more()`` says another job is queued, the result
        goes back without waiting for the namespace's teardown (milliseconds, mostly
        the kernel freeing the mount namespace): C is reaped later, before the next run
        of the same uid and before the server goes idle (the next run uses the other
        uid, in namespaces of its own)."""
        cap_out = int(lim["max_output_bytes"])
        cap_res = int(lim.get("max_payload_bytes", 1_000_000)) + 1_000_000
        bufs = {res_r: bytearray(), out_r: bytearray(), err_r: bytearray(), ctl_r: bytearray()}
        caps = {res_r: cap_res, out_r: cap_out, err_r: cap_out, ctl_r: 1 << 16}
        truncated = {out_r: False, err_r: False, res_r: False, ctl_r: False}
        open_fds = set(bufs)
        hard_deadline = t0 + float(lim["timeout"]) + 10.0
        soft_deadline = t0 + float(lim["timeout"]) if direct else None
        timed_out = False
        ended = False
        b_done = False
        b_status = None
        grace_end = None

        def kill_run() -> None:
            if c_pidfd is not None:
                _kill_pidfd(c_pidfd)
            else:
                try:
                    os.kill(b, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        def take(fd: int, chunk: bytes) -> None:
            room = caps[fd] - len(bufs[fd])
            if room > 0:
                bufs[fd] += chunk[:room]
            if len(chunk) > room:
                truncated[fd] = True

        while open_fds:
            now = time.monotonic()
            if not b_done and now > hard_deadline:  # B is wedged: should never happen
                self._kill_from_ctl(bufs[ctl_r])
                kill_run()
                os.kill(b, signal.SIGKILL)
            if soft_deadline is not None and not b_done and not timed_out \
                    and now > soft_deadline:
                timed_out = True  # killing pid 1 of the namespace kills all of it
                kill_run()
            if b_done and grace_end is None:
                grace_end = now + 0.5
            if grace_end is not None and now > grace_end:
                break
            wait = 0.5 if grace_end is None else max(0.0, grace_end - now)
            if soft_deadline is not None and not timed_out:
                wait = min(wait, max(0.0, soft_deadline - now) + 0.001)
            fds = list(open_fds) + ([] if b_done else [pidfd])
            ready, _, _ = select.select(fds, [], [], wait)
            # Read the program's output before its records: whatever it wrote before
            # the end record is then in the buffers when the end record is seen.
            ready.sort(key=lambda fd: fd == res_r)
            for fd in ready:
                if fd == pidfd:
                    if prof:
                        prof["s_cdone"] = _now()
                    _, b_status = os.waitpid(b, 0)
                    b_done = True
                    if c_pidfd is not None:  # D is gone: end whatever it left behind
                        kill_run()
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    open_fds.discard(fd)
                    continue
                take(fd, chunk)
                if fd == res_r and direct and not truncated[res_r]:
                    ended = self._ended(bufs[res_r])
            if ended:
                # The harness wrote its end record: every verdict is in. Kill the run's
                # namespace now instead of waiting for D and C to wind down, then
                # collect what is left in the pipes (no writer survives the namespace).
                if prof:
                    prof["s_ended"] = _now()
                later = defer is not None and defer[1]()
                if later:  # what was written before the end record is in the pipes
                    for fd in list(open_fds):
                        os.set_blocking(fd, False)
                        while True:
                            try:
                                chunk = os.read(fd, 65536)
                            except BlockingIOError:
                                break
                            except OSError:
                                chunk = b""
                            if not chunk:
                                break
                            take(fd, chunk)
                kill_run()
                if later:
                    self.dying.append((b, pidfd, c_pidfd, defer[0]))
                    pidfd = c_pidfd = None
                else:
                    if not b_done:
                        _, b_status = os.waitpid(b, 0)
                    select.select([c_pidfd], [], [], 10.0)  # the whole namespace is gone
                    for fd in list(open_fds):  # no writer survives the namespace
                        while True:
                            try:
                                chunk = os.read(fd, 65536)
                            except OSError:
                                chunk = b""
                            if not chunk:
                                break
                            take(fd, chunk)
                b_done = True
                if prof:
                    prof["s_reaped"] = _now()
                open_fds.clear()
                break
            if not open_fds and not b_done:
                # every pipe closed: wait for B (it is finishing its bookkeeping)
                select.select([pidfd], [], [], max(0.0, hard_deadline - time.monotonic()))
        if not b_done:
            try:
                pid, b_status = os.waitpid(b, os.WNOHANG)
            except ChildProcessError:
                pid = b
            if pid == 0:
                kill_run()
                try:
                    os.kill(b, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, b_status = os.waitpid(b, 0)
        if c_pidfd is not None:
            kill_run()
            select.select([c_pidfd], [], [], 10.0)
            os.close(c_pidfd)
        if pidfd is not None:
            os.close(pidfd)
        for fd in bufs:
            os.close(fd)
        ctl = {}
        for line in bytes(bufs[ctl_r]).splitlines():
            try:
                ctl.update(json.loads(line))
            except ValueError:
                pass
        if direct:
            ctl["timed_out"] = timed_out
            if b_status is not None and "error" not in ctl:  # D is our child
                if os.WIFSIGNALED(b_status):
                    ctl["signal"] = os.WTERMSIG(b_status)
                else:
                    ctl["exit_code"] = os.WEXITSTATUS(b_status)
        if prof:
            prof["s_end"] = _now()
            prof.update(ctl.pop("prof_d", {}))
            ctl["prof"] = prof
        else:
            ctl.pop("prof_d", None)
        return {
            "records": bytes(bufs[res_r]).decode("utf-8", "replace"),
            "records_truncated": truncated[res_r],
            "stdout": bytes(bufs[out_r]).decode("utf-8", "replace"),
            "stderr": bytes(bufs[err_r]).decode("utf-8", "replace"),
            "stdout_truncated": truncated[out_r],
            "stderr_truncated": truncated[err_r],
            "ctl": ctl,
            "duration_s": time.monotonic() - t0,
            "caps": self.caps,
        }

    @staticmethod
    def _ended(buf: bytearray) -> bool:
        """The records end with the harness's end record (``<token>\\tE``)."""
        if len(buf) < 70 or not buf.endswith(b"\tE\n") or buf[32:35] != b"\tH\n":
            return False
        last = buf.rfind(b"\n", 0, len(buf) - 1)
        return last >= 34 and buf[last + 1:] == buf[:32] + b"\tE\n"

    @staticmethod
    def _kill_from_ctl(buf: bytearray) -> None:
        for line in bytes(buf).splitlines():
            try:
                c = json.loads(line).get("child")
            except ValueError:
                continue
            if c:
                try:
                    os.kill(c, signal.SIGKILL)
                except OSError:
                    pass

    # ------------------------------------------------------------------ B
    def _nsparent(self, job, res_w, out_w, err_w, ctl_w) -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:
            os._exit(1)
        lim = job["limits"]
        caps = self.caps
        uid = self.uid if caps["uid"] else None
        if caps["pid"]:
            unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS)
        workdir = self._workdir(lim)
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        c = os.fork()
        if c == 0:
            try:
                self._sandboxed(job, res_w, out_w, err_w, ctl_w, workdir, uid)
            finally:
                os._exit(71)
        for fd in (res_w, out_w, err_w):
            os.close(fd)
        os.write(ctl_w, json.dumps({"child": c}).encode() + b"\n")
        deadline = time.monotonic() + float(lim["timeout"])
        pidfd = os.pidfd_open(c)
        timed_out = False
        ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            timed_out = True
            os.kill(c, signal.SIGKILL)
        _, st = os.waitpid(c, 0)
        if caps["pid"]:  # the namespace died with C: only zombies to collect
            left = 0
            while True:
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        break
                except ChildProcessError:
                    break
        else:
            left = self._reap_all(uid)
        info = {"timed_out": timed_out, "left_behind": left}
        if os.WIFSIGNALED(st):
            info["ns_signal"] = os.WTERMSIG(st)
        else:
            info["ns_exit_code"] = os.WEXITSTATUS(st)
        if workdir != "/tmp":
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
        os.write(ctl_w, json.dumps(info).encode() + b"\n")
        os._exit(0)

    def _workdir(self, lim: dict) -> str:
        """In the run's own mount namespace: a fresh tmpfs on /tmp; else a temp dir.
        Also re-enters the original network namespace when the run may use it."""
        uid = self.uid if self.caps["uid"] else None
        workdir = None
        if self.caps["pid"] and self.caps["mount"]:
            tmp_mb = max(8, int(lim["max_file_mb"]) * 4)
            opts = f"size={tmp_mb}m,nr_inodes=4096,mode=0700"
            if uid is not None:
                opts += f",uid={uid},gid={uid}"
            _mount_tmp(opts, self.tmp_keep)
            workdir = "/tmp"
        if workdir is None:
            import tempfile
            workdir = tempfile.mkdtemp(prefix="cdsbx-")
            if uid is not None:
                os.chown(workdir, uid, uid)
        if lim.get("network") and self.orig_net is not None:
            setns(self.orig_net, CLONE_NEWNET)
        return workdir

    @staticmethod
    def _reap_all(uid) -> int:
        """Kill every remaining descendant (we are their subreaper) and every process of
        the sandbox uid; return how many had to be killed."""
        me = os.getpid()
        killed = 0
        for _ in range(50):
            victims = []
            try:
                names = os.listdir("/proc")
            except OSError:
                names = []
            for name in names:
                if not name.isdigit():
                    continue
                try:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        stat = f.read()
                    ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
                    mine = ppid == me
                    if not mine and uid is not None:
                        mine = os.stat(f"/proc/{name}").st_uid == uid
                except (OSError, ValueError):
                    continue
                if mine and int(name) != me:
                    victims.append(int(name))
            if not victims:
                break
            for v in victims:
                try:
                    os.kill(v, signal.SIGKILL)
                    killed += 1
                except OSError:
                    pass
            while True:
                try:
                    p, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if p == 0:
                    time.sleep(0.002)
                    break
        while True:
            try:
                p, _ = os.waitpid(-1, os.WNOHANG)
                if p == 0:
                    break
            except ChildProcessError:
                break
        return killed

    # ------------------------------------------------------------------ C
    def _warm_child(self, c_pidfd, tmp_mb, network, uid, res_w, out_w, err_w, ctl_w,
                    job_r) -> None:
        """D of a ready sandbox, born in C's pid namespace: joins C's other namespaces,
        mounts a fresh tmpfs on /tmp and /proc for the namespace, waits for its job."""
        setns(c_pidfd, CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)
        os.close(c_pidfd)
        os.setsid()
        opts = f"size={tmp_mb}m,nr_inodes=4096,mode=0700"
        if uid is not None:
            opts += f",uid={uid},gid={uid}"
        _mount_tmp(opts, self.tmp_keep)
        if network:
            setns(self.orig_net, CLONE_NEWNET)
            os.close(self.orig_net)
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            pass
        if not _PROF:
            os.close(ctl_w)
        self._child_fds(res_w, out_w, err_w, job_r, ctl_w if _PROF else None)
        self._child_env("/tmp")
        # Privileges are dropped now, before the harness thread exists (credentials
        # and no_new_privs are per thread, inherited by threads started later). What
        # is left for the job (lowering rlimits, importing a call target) needs none.
        # Safe although an earlier run of this uid may still be dying: it cannot see
        # this pid namespace; the run starts only once that one is gone (run()).
        self._drop_privileges(uid)
        pd = {"d_wait": _now()} if _PROF else None

        def ready():  # in the harness thread
            n_raw, n_blob = struct.unpack("<II", _read_exact(4, 8))
            raw = _read_exact(4, n_raw)
            blob = _read_exact(4, n_blob) if n_blob else b""
            os.close(4)
            job = json.loads(raw)
            if blob:
                job["_compiled"] = marshal.loads(blob)
            if pd is not None:
                pd["d_job"] = _now()
            return self._exec_job(job, "/tmp", uid, pd, 5, start=False)  # uid: dropped

        from _harness_bootstrap import main_early
        main_early(ready)

    def _sandboxed(self, job, res_w, out_w, err_w, ctl_w, workdir, uid) -> None:
        """C (fallback layout, under B): runs the program in D and reports its status."""
        caps = self.caps
        os.setsid()
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if caps["pid"] and caps["mount"]:
            try:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError:
                pass
        d = os.fork()
        if d == 0:
            try:
                os.close(ctl_w)
                self._child_fds(res_w, out_w, err_w)
                self._child_env(workdir)
                self._exec_job(job, workdir, uid)
            finally:
                os._exit(72)
        for fd in (res_w, out_w, err_w):
            os.close(fd)
        self._init_loop(d, ctl_w)

    @staticmethod
    def _init_loop(d: int, ctl_w: int) -> None:
        while True:  # reap everything; D's end ends the namespace
            try:
                pid, st = os.wait()
            except ChildProcessError:
                os._exit(0)
            except InterruptedError:
                continue
            if pid == d:
                info = ({"signal": os.WTERMSIG(st)} if os.WIFSIGNALED(st)
                        else {"exit_code": os.WEXITSTATUS(st)})
                os.write(ctl_w, json.dumps(info).encode() + b"\n")
                os._exit(0)

    # ------------------------------------------------------------------ D
    @staticmethod
    def _child_fds(res_w, out_w, err_w, job_r=None, prof_w=None) -> None:
        """D's descriptors: 0 /dev/null, 1 stdout, 2 stderr, 3 records (4: the job;
        5: profiling timestamps, closed before the harness starts)."""
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.dup2(res_w, 3)
        if job_r is not None:
            os.dup2(job_r, 4)
            if prof_w is not None:
                os.dup2(prof_w, 5)
            os.closerange(5 if prof_w is None else 6, 1 << 16)
        else:
            os.closerange(4, 1 << 16)

    @staticmethod
    def _child_env(workdir: str) -> None:
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir,
                           "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"})
        import tempfile
        tempfile.tempdir = workdir
        if _STDIO:  # made once in the server, never used there: fresh in every child
            sys.stdin, sys.stdout, sys.stderr = _STDIO
        else:
            sys.stdin = open(0, "r", closefd=False)
            sys.stdout = open(1, "w", closefd=False, buffering=1)
            sys.stderr = open(2, "w", closefd=False, buffering=1)

    @staticmethod
    def _drop_privileges(uid) -> None:
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        prctl(PR_SET_DUMPABLE, 0)

    def _exec_job(self, job, workdir, uid, pd=None, ctl_w=None, start=True):
        """D: limits, drops privileges, runs the harness (``start=False``: privileges
        are already dropped; returns the harness's arguments, for
        :func:`_harness.main_early`)."""
        lim = job["limits"]
        target = None
        if job.get("mode") == "call":
            import importlib
            mod, _, fn = job["target"].partition(":")
            target = getattr(importlib.import_module(mod), fn)
        timeout = float(lim["timeout"])
        cpu = lim.get("cpu_time") or timeout + 1.0
        cpu = max(1, int(cpu + 0.999))
        mem = int(lim["memory_mb"]) * 1024 * 1024
        fsz = int(lim["max_file_mb"]) * 1024 * 1024
        for res, val in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsz),
                         (resource.RLIMIT_NOFILE, 256),
                         (resource.RLIMIT_NPROC, int(lim["max_processes"]))):
            try:
                resource.setrlimit(res, (val, val))
            except (ValueError, OSError):
                pass
        if start:
            self._drop_privileges(uid)
        # ctypes must not be reachable by name; calls through existing objects are
        # refused by the audit hook ("ctypes.call_function").
        for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.")
                     or m == "_ctypes"]:
            sys.modules.pop(name, None)
        from _harness_bootstrap import main  # set up by serve()
        if pd is not None and ctl_w is not None:
            pd["d_main"] = _now()
            os.write(ctl_w, json.dumps({"prof_d": pd}).encode() + b"\n")
            os.close(ctl_w)
        args = (job, 3, workdir, bool(lim.get("network")), job.get("mode", "tests"),
                bool(lim.get("audit_hook", True)), target)
        if not start:
            return args
        main(*args)


PREIMPORT = ["math", "re", "collections", "itertools", "functools", "heapq", "string",
             "typing", "bisect", "statistics", "fractions", "decimal", "operator", "copy",
             "random", "datetime", "json", "hashlib", "array", "textwrap", "unicodedata",
             "dataclasses", "enum", "numbers", "cmath", "contextlib", "io", "tempfile",
             "shutil", "threading", "queue", "abc", "sys", "os", "time", "struct", "ast",
             "importlib", "typing_extensions"]


_STDIO: tuple = ()  # the sandbox's stdin/stdout/stderr objects (fds 0-2 in the child)


def serve() -> None:
    inp, out = sys.stdin.fileno(), sys.stdout.fileno()
    # Keep the protocol fds safe from stray prints.
    inp, out = os.dup(inp), os.dup(out)
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    init = recv(inp)
    if os.getppid() != init.get("parent", os.getppid()):
        os._exit(0)
    sys.path[:] = init["sys_path"]
    import importlib
    harness = importlib.import_module("codedistill.execution._harness")
    sys.modules["_harness_bootstrap"] = harness
    server = Server(init)
    for name in init.get("preimport", PREIMPORT):
        try:
            importlib.import_module(name)
        except Exception:
            pass
    for name in init.get("warm_targets", []):
        try:
            importlib.import_module(name)
        except Exception:
            pass
    global _STDIO
    _STDIO = (open(0, "r", closefd=False), open(1, "w", closefd=False, buffering=1),
              open(2, "w", closefd=False, buffering=1))
    import gc
    gc.collect()
    gc.freeze()  # forked children do not touch (copy) the server's objects when collecting
    send(out, {"hello": True, "caps": server.caps, "warnings": server.warnings,
               "pid": os.getpid(), "helpers": [server.zygote[0]] if server.zygote else []})
    reader = _Input(inp)
    os.set_blocking(out, False)
    while True:
        try:
            raw = reader.recv_raw()
        except EOFError:
            break
        job = json.loads(raw)
        if job.get("op") == "exit":
            break
        try:
            result = server.run(job, raw, reader.pending)
        except Exception as e:  # noqa: BLE001
            result = {"server_error": repr(e), "caps": server.caps}
        if not reader.pending():  # idle: keep no sandbox process around
            server.discard_warm()
            server.reap()
        reader.send(out, result)
    server.discard_warm()
    server.reap()
    os._exit(0)


if __name__ == "__main__":
    serve()
