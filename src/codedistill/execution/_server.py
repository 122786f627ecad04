"""The warm fork server: a small long-lived process that forks one sandbox per run.

Started by :class:`codedistill.execution.pool.SandboxPool` as
``python -I -S _server.py`` (so importing it pulls in no project code and no site
packages beyond the ``sys.path`` the pool sends). It speaks length-prefixed JSON over
stdin/stdout: one init message, then one job -> one raw result.

Per run::

    server (root, private mount ns with everything read-only, private empty net ns,
            enforces the wall-clock deadline, reads the pipes)
      └─ C: clone()d straight into new pid/mount/ipc/uts namespaces; pid 1 there;
         tmpfs on /tmp, /proc remounted, setsid; reaps, reports D's status
           └─ D: rlimits, setuid(sandbox uid), no_new_privs, not dumpable,
              audit hook, harness (program + tests)

(Fallback without a pid namespace: the server forks B, a child subreaper that forks
C, enforces the deadline and kills every descendant and every sandbox-uid process.)

Killing C tears down its whole pid namespace (every descendant, setsid or not).
Where namespaces are refused the server warns once and falls back to: the sandbox uid
(when root), a per-run temporary directory, the audit hook, and B as child subreaper
killing every descendant (and every process of the sandbox uid) at the end.
"""

from __future__ import annotations

import ctypes
import json
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


def send(fd: int, obj) -> None:
    data = json.dumps(obj).encode()
    data = struct.pack("<I", len(data)) + data
    while data:
        n = os.write(fd, data)
        data = data[n:]


# --------------------------------------------------------------------------- server
class Server:
    def __init__(self, init: dict):
        self.uid = init.get("uid")  # None: keep our uid
        self.caps = {"mount": False, "net": False, "pid": False, "uid": False}
        self.warnings: list[str] = []
        self.orig_net = None
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
                if self.uid is not None and root:
                    _expose(list(sys.path) + [sys.prefix, sys.base_prefix, sys.exec_prefix])
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
    def run(self, job: dict) -> dict:
        lim = job["limits"]
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        if job.get("mode", "tests") == "tests":
            job["_compiled"] = self._compiled(job.get("test_setup", ""), list(job["tests"]))
        t0 = time.monotonic()
        direct = self.caps["pid"] and _SYS_CLONE is not None
        if direct:
            # The server is the namespace's parent: clone C straight into new namespaces.
            b = clone(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS)
        else:
            b = os.fork()
        if b == 0 and direct:
            try:
                for fd in (res_r, out_r, err_r, ctl_r):
                    os.close(fd)
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                workdir = self._workdir(job["limits"])
                self._sandboxed(job, res_w, out_w, err_w, ctl_w, workdir,
                                self.uid if self.caps["uid"] else None)
            except BaseException as e:  # noqa: BLE001
                try:
                    os.write(ctl_w, json.dumps({"error": repr(e)}).encode() + b"\n")
                except OSError:
                    pass
            finally:
                os._exit(70)
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
        cap_out = int(lim["max_output_bytes"])
        cap_res = int(lim.get("max_payload_bytes", 1_000_000)) + 1_000_000
        bufs = {res_r: bytearray(), out_r: bytearray(), err_r: bytearray(), ctl_r: bytearray()}
        caps = {res_r: cap_res, out_r: cap_out, err_r: cap_out, ctl_r: 1 << 16}
        truncated = {out_r: False, err_r: False, res_r: False}
        open_fds = set(bufs)
        hard_deadline = t0 + float(lim["timeout"]) + 10.0
        soft_deadline = t0 + float(lim["timeout"]) if direct else None
        timed_out = False
        b_done = False
        b_status = None
        pidfd = os.pidfd_open(b)
        grace_end = None
        while open_fds:
            now = time.monotonic()
            if not b_done and now > hard_deadline:  # B is wedged: should never happen
                self._kill_from_ctl(bufs[ctl_r])
                os.kill(b, signal.SIGKILL)
            if soft_deadline is not None and not b_done and not timed_out \
                    and now > soft_deadline:
                timed_out = True  # killing pid 1 of the namespace kills all of it
                os.kill(b, signal.SIGKILL)
            if b_done and grace_end is None:
                grace_end = now + 0.5
            if grace_end is not None and now > grace_end:
                break
            wait = 0.5 if grace_end is None else max(0.0, grace_end - now)
            if soft_deadline is not None and not timed_out:
                wait = min(wait, max(0.0, soft_deadline - now) + 0.001)
            fds = list(open_fds) + ([] if b_done else [pidfd])
            ready, _, _ = select.select(fds, [], [], wait)
            for fd in ready:
                if fd == pidfd:
                    _, st = os.waitpid(b, 0)
                    b_status = st
                    b_done = True
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    open_fds.discard(fd)
                    continue
                room = caps[fd] - len(bufs[fd])
                if room > 0:
                    bufs[fd] += chunk[:room]
                if len(chunk) > room:
                    truncated[fd] = True
            if not open_fds and not b_done:
                # every pipe closed: wait for B (it is finishing its bookkeeping)
                select.select([pidfd], [], [], max(0.0, hard_deadline - time.monotonic()))
        if not b_done:
            try:
                pid, b_status = os.waitpid(b, os.WNOHANG)
            except ChildProcessError:
                pid = b
            if pid == 0:
                try:
                    os.kill(b, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(b, 0)
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
            mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts)
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
    def _sandboxed(self, job, res_w, out_w, err_w, ctl_w, workdir, uid) -> None:
        """C: pid 1 of the run's pid namespace (root, trusted); runs the program in D."""
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
                self._program(job, res_w, out_w, err_w, workdir, uid)
            finally:
                os._exit(72)
        for fd in (res_w, out_w, err_w):
            os.close(fd)
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

    def _program(self, job, res_w, out_w, err_w, workdir, uid) -> None:
        """D: drops privileges and runs the harness."""
        lim = job["limits"]
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.dup2(res_w, 3)
        os.closerange(4, 1 << 16)
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
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir,
                           "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"})
        import tempfile
        tempfile.tempdir = workdir
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        prctl(PR_SET_DUMPABLE, 0)
        # ctypes must not be reachable by name; calls through existing objects are
        # refused by the audit hook ("ctypes.call_function").
        for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.")
                     or m == "_ctypes"]:
            sys.modules.pop(name, None)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False, buffering=1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        from _harness_bootstrap import main  # set up by serve()
        main(job, 3, workdir, bool(lim.get("network")), job.get("mode", "tests"),
             bool(lim.get("audit_hook", True)), target)


PREIMPORT = ["math", "re", "collections", "itertools", "functools", "heapq", "string",
             "typing", "bisect", "statistics", "fractions", "decimal", "operator", "copy",
             "random", "datetime", "json", "hashlib", "array", "textwrap", "unicodedata",
             "dataclasses", "enum", "numbers", "cmath", "contextlib", "io", "tempfile",
             "shutil", "threading", "queue", "abc", "sys", "os", "time", "struct", "ast",
             "importlib", "typing_extensions"]


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
    import gc
    gc.collect()
    gc.freeze()  # forked children do not touch (copy) the server's objects when collecting
    send(out, {"hello": True, "caps": server.caps, "warnings": server.warnings,
               "pid": os.getpid()})
    while True:
        try:
            job = recv(inp)
        except EOFError:
            break
        if job.get("op") == "exit":
            break
        try:
            result = server.run(job)
        except Exception as e:  # noqa: BLE001
            result = {"server_error": repr(e), "caps": server.caps}
        send(out, result)
    os._exit(0)


if __name__ == "__main__":
    serve()
