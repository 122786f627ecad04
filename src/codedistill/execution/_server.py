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
      ├─ template: a fork of the warm server made once (harness and stdlib loaded,
      │   garbage collector frozen) that only waits for requests and clone()s each run's D
      └─ D: clone()d by the template with CLONE_PARENT (so D is the server's child) into
            new pid/mount/ipc/uts namespaces, where it is pid 1; mounts a size-limited
            tmpfs on /tmp and /proc for the pid namespace, setsid, drops to the sandbox
            uid (no_new_privs, not dumpable), starts the harness thread, which waits for
            the job; then rlimits, audit hook, harness (program + tests)

D is pid 1 of its pid namespace: when it dies (its end, or killed by the server at the
end of the run or on timeout) the kernel kills every process of the namespace, and D's
exit status reaches the server (``waitpid``) only once they are all gone. One process
per run, cloned from a process that is idle between clones: the busy server shares no
memory with the runs, so it takes no copy-on-write faults while they live.

While more jobs are queued, the next sandbox (D up to waiting for its job) is made
ready while the current one runs (the template clones it in parallel), so a job only
has to be written to a waiting D. When the harness's end record arrives, D is killed
(which kills the whole pid namespace) and the result goes back at once; if more jobs
are queued, the namespace's teardown (a few milliseconds, mostly the kernel freeing the
address space and the mount namespace) is collected later: runs alternate between two
sandbox uids, and a run starts only when every earlier run of its uid is gone. When no
job is queued the server collects everything before it answers, so an idle pool has no
process besides its servers and their templates.

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

_PROF = bool(os.environ.get("CODEDISTILL_SANDBOX_PROFILE"))  # per-step timings


def _now() -> int:
    return time.perf_counter_ns()


def _minflt() -> int:
    """Minor page faults of this process so far (profiling only)."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[7])


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


def set_name(name: bytes) -> None:
    """Name this thread (``ps``/``top``/``perf`` show the sandbox's roles)."""
    buf = ctypes.create_string_buffer(name[:15])
    _libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)


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


def _report_child_error(ctl_w: int, e: BaseException) -> None:
    """In a forked child that failed before its job: say why on the control pipe (best
    effort; the caller then ``_exit``s)."""
    try:
        os.write(ctl_w, json.dumps({"error": repr(e)}).encode() + b"\n")
    except OSError:
        pass


def _close_fds_except(keep) -> None:
    lo = 0
    for fd in sorted(set(keep)):
        if fd > lo:
            os.closerange(lo, fd)
        lo = max(lo, fd + 1)
    os.closerange(lo, 1 << 16)


class _Warm:
    """A sandbox made ready before its job: D (pid 1 of fresh namespaces, cloned by the
    template, the server's child), with /tmp and /proc mounted, blocked reading the job
    pipe (nothing untrusted ran yet)."""

    __slots__ = ("pid", "pidfd", "job_w", "res_r", "out_r", "err_r", "ctl_r", "key", "uid")

    def __init__(self, pid, pidfd, job_w, res_r, out_r, err_r, ctl_r, key, uid):
        self.pid, self.pidfd, self.job_w = pid, pidfd, job_w
        self.res_r, self.out_r, self.err_r, self.ctl_r = res_r, out_r, err_r, ctl_r
        self.key, self.uid = key, uid

    def alive(self) -> bool:
        return not select.select([self.pidfd], [], [], 0)[0]

    def discard(self) -> None:
        _kill_pidfd(self.pidfd)  # D is pid 1: the whole namespace goes with it
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
        self.dying: list[tuple[int, int, int | None]] = []  # killed Ds: (pid, pidfd, uid)
        self.caps = {"mount": False, "net": False, "pid": False, "uid": False}
        self.warnings: list[str] = []
        self.orig_net = None
        self.warm: _Warm | None = None
        self.template = None  # (pid, socket): clones each run's D (start_template)
        self.pending = None  # (key, uid) of a D requested from the template, not read yet
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
        return self.template is not None

    def start_template(self) -> None:
        """Fork the template (see the module docstring): call once everything a run
        needs is loaded and the garbage collector is frozen."""
        if not (self.caps["pid"] and self.caps["mount"] and _SYS_CLONE is not None):
            return
        import socket
        try:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
        except OSError as e:
            self.warnings.append(f"template not started ({e}); sandboxes are made per run")
            return
        if pid == 0:
            try:
                self._template_loop(theirs)
            finally:
                os._exit(0)
        theirs.close()
        self.template = (pid, mine)

    def _template_loop(self, sock) -> None:
        """The template: for each request (uid, /tmp size, network) clone D
        (CLONE_PARENT: the server's child) into new namespaces, where it makes itself
        ready (:meth:`_warm_child`); answer with D's pid and the server's ends of its
        pipes (SCM_RIGHTS). Idle in between, and doing little when not: every page it
        writes while a D shares it is copied (the loop runs without the garbage
        collector, which D turns back on)."""
        import gc
        import socket
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        set_name(b"cd-sbx-template")
        if os.getppid() == 1:
            os._exit(0)
        net = [self.orig_net] if self.orig_net is not None else []
        _close_fds_except([0, 1, 2, sock.fileno()] + net)
        flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_PARENT
        recv, send_fds, unpack, pack, pipe = sock.recv, socket.send_fds, struct.unpack, \
            struct.pack, os.pipe
        gc.disable()
        while True:
            try:
                req = recv(64)
            except InterruptedError:
                continue
            except OSError:
                os._exit(0)
            if len(req) != 12:
                os._exit(0)
            uid, tmp_mb, network = unpack("<iii", req)
            uid = None if uid < 0 else uid
            fds = [pipe(), pipe(), pipe(), pipe(), pipe()]
            (res_r, res_w), (out_r, out_w), (err_r, err_w), (ctl_r, ctl_w), (job_r, job_w) = fds
            try:
                d = clone(flags)
            except OSError as e:
                d = -(e.errno or 1)
            if d == 0:
                gc.enable()
                try:
                    keep = [0, 1, 2, res_w, out_w, err_w, ctl_w, job_r]
                    _close_fds_except(keep + (net if network else []))
                    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the server's death ends D
                    self._warm_child(tmp_mb, network, uid, res_w, out_w, err_w, ctl_w, job_r)
                except BaseException as e:  # noqa: BLE001
                    _report_child_error(ctl_w, e)
                finally:
                    os._exit(70)
            try:
                if d > 0:
                    send_fds(sock, [pack("<i", d)], [res_r, out_r, err_r, ctl_r, job_w])
                else:
                    sock.send(pack("<i", d))
            except OSError:
                os._exit(0)
            finally:
                for pair in fds:
                    for fd in pair:
                        os.close(fd)

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
        if sb is None and self.pending is not None:
            try:
                sb = self._receive()
            except OSError:
                sb = None
        if sb is not None and (sb.key != key or not sb.alive()):
            sb.discard()
            sb = None
        if sb is None:
            sb = self._prepare(key, self._next_uid())
        self.n_runs += 1
        if prof:
            prof["s_took"] = _now()
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
        if more():  # the template clones the next D while this one runs
            self._request(key, self._next_uid())
        if prof:
            prof["s_next"] = _now()
        return self._collect(sb.pid, sb.pidfd, sb.res_r, sb.out_r, sb.err_r, sb.ctl_r, lim,
                             t0, True, prof, (sb.uid, more))

    def _next_uid(self):
        return self.uids[self.n_runs % len(self.uids)] if self.caps["uid"] else None

    def reap(self, block: bool = True, uid=False) -> None:
        """Collect killed runs (all of them, or those of ``uid``; ``block=False``: only
        those already gone). A run is gone when D has exited: D is pid 1 of its pid
        namespace, and its exit waits for every other process there to be dead."""
        left = []
        for d, d_pidfd, u in self.dying:
            if uid is not False and u != uid:
                left.append((d, d_pidfd, u))
                continue
            if not block and not select.select([d_pidfd], [], [], 0)[0]:
                left.append((d, d_pidfd, u))
                continue
            try:
                os.waitpid(d, 0)
            except ChildProcessError:
                pass
            os.close(d_pidfd)
        self.dying = left

    def discard_warm(self) -> None:
        if self.warm is not None:
            self.warm.discard()
            self.warm = None
        if self.pending is not None:
            try:
                self._receive().discard()
            except OSError:
                pass

    def _request(self, key: tuple[int, bool], uid) -> None:
        """Ask the template for a D (read by :meth:`_receive`; meanwhile the server goes
        on with the current run)."""
        tmp_mb, network = key
        try:
            self.template[1].send(struct.pack("<iii", -1 if uid is None else uid, tmp_mb,
                                              int(network)))
        except OSError:
            os._exit(3)  # the template is gone: the pool restarts this server
        self.pending = (key, uid)

    def _receive(self) -> _Warm:
        import socket
        key, uid = self.pending
        self.pending = None
        try:
            msg, fds, _, _ = socket.recv_fds(self.template[1], 16, 5)
        except OSError:
            os._exit(3)
        if len(msg) != 4:
            os._exit(3)
        (d,) = struct.unpack("<i", msg)
        if d < 0 or len(fds) != 5:
            for fd in fds:
                os.close(fd)
            raise OSError(-d, f"clone: {os.strerror(-d)}")
        res_r, out_r, err_r, ctl_r, job_w = fds
        return _Warm(d, os.pidfd_open(d), job_w, res_r, out_r, err_r, ctl_r, key, uid)

    def _prepare(self, key: tuple[int, bool], uid) -> _Warm:
        """A D from the template: pid 1 of new pid/mount/ipc/uts namespaces, the server's
        child, which mounts /tmp and /proc there, drops its privileges and waits
        (nothing untrusted loaded) for its job."""
        self._request(key, uid)
        return self._receive()

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
                _report_child_error(ctl_w, e)
            finally:
                os._exit(code)
        for fd in (res_w, out_w, err_w, ctl_w):
            os.close(fd)
        return self._collect(b, os.pidfd_open(b), res_r, out_r, err_r, ctl_r, lim, t0, False,
                             None, None)

    def _collect(self, b, pidfd, res_r, out_r, err_r, ctl_r, lim, t0, direct, prof,
                 defer) -> dict:
        """Read the run's pipes until it is over; enforce the deadline (``direct``: b is
        D, the run's process and pid 1 of its namespaces: killing it kills the whole run;
        else b is B of the fallback layout).

        When the harness's end record arrives, the namespace is killed at once. If
        ``defer`` is ``(uid, more)`` and ``more()`` says another job is queued, the result
        goes back without waiting for the namespace's teardown (milliseconds, mostly
        the kernel freeing the address space and mount namespace): D is reaped later,
        before the next run of the same uid and before the server goes idle (the next
        run uses the other uid, in namespaces of its own)."""
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
            if pidfd is not None:
                _kill_pidfd(pidfd)

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
                    self.dying.append((b, pidfd, defer[0]))
                    pidfd = None
                else:
                    if not b_done:  # (D is pid 1: then the whole namespace is gone)
                        _, b_status = os.waitpid(b, 0)
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
    def _warm_child(self, tmp_mb, network, uid, res_w, out_w, err_w, ctl_w,
                    job_r) -> None:
        """D of a ready sandbox, pid 1 of its new namespaces: mounts a fresh tmpfs on
        /tmp and /proc for the pid namespace, waits for its job."""
        set_name(b"cd-sbx-run")
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
        # this pid namespace; the job is sent only once that one is gone (run()).
        self._drop_privileges(uid)
        pd = {"d_wait": _now(), "f_wait": _minflt()} if _PROF else None

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
                pd["f_job"] = _minflt()
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
        # (In tests mode nothing was imported since the server listed the names once:
        # going through sys.modules here would touch, and so copy, every page that holds
        # a module name. A call target may have imported more.)
        names = _CTYPES_MODULES if target is None else [
            m for m in sys.modules if m in ("ctypes", "_ctypes") or m.startswith("ctypes.")]
        for name in names:
            sys.modules.pop(name, None)
        from _harness_bootstrap import main  # set up by serve()
        if pd is not None and ctl_w is not None:
            pd["d_main"] = _now()
            pd["f_main"] = _minflt()
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
             "importlib", "typing_extensions", "subprocess", "faulthandler"]


_STDIO: tuple = ()  # the sandbox's stdin/stdout/stderr objects (fds 0-2 in the child)
_CTYPES_MODULES: tuple = ("ctypes", "_ctypes")  # all of them, listed by serve()


def serve() -> None:
    inp, out = sys.stdin.fileno(), sys.stdout.fileno()
    # Keep the protocol fds safe from stray prints.
    inp, out = os.dup(inp), os.dup(out)
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    set_name(b"cd-sbx-server")
    init = recv(inp)
    if os.getppid() != init.get("parent", os.getppid()):
        os._exit(0)
    sys.path[:] = init["sys_path"]
    import importlib
    import importlib.util
    # The harness file on its own, not through the ``codedistill.execution`` package
    # (whose __init__ pulls in the pool, subprocess, logging, concurrent.futures, ...):
    # every run is a fork of this process, and what this process holds, each fork copies
    # (page tables) and each exit frees.
    spec = importlib.util.spec_from_file_location(
        "_harness_bootstrap", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "_harness.py"))
    harness = importlib.util.module_from_spec(spec)
    sys.modules["_harness_bootstrap"] = harness
    spec.loader.exec_module(harness)
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
    global _STDIO, _CTYPES_MODULES
    _CTYPES_MODULES = tuple(m for m in sys.modules if m in ("ctypes", "_ctypes")
                            or m.startswith("ctypes."))
    _STDIO = (open(0, "r", closefd=False), open(1, "w", closefd=False, buffering=1),
              open(2, "w", closefd=False, buffering=1))
    import gc
    gc.collect()
    gc.freeze()  # forked children do not touch (copy) the server's objects when collecting
    server.start_template()
    send(out, {"hello": True, "caps": server.caps, "warnings": server.warnings,
               "pid": os.getpid(),
               "helpers": [server.template[0]] if server.template else []})
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
