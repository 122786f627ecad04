"""A pool of warm fork servers that runs sandboxed programs in parallel.

Each worker owns one fork server process (``_server.py``), started lazily, restarted
when it dies or stops answering; a hostile program can only ever kill its own forked
child, never the server or this process. Servers are started in their own session with
``PR_SET_PDEATHSIG`` so they die with the pool's process, and are shut down on
``close()``, on leaving the ``with`` block, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Iterable, Iterator

from . import _server as _proto
from .sandbox import Job, Limits, Verdict, build_verdict

_SERVER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_server.py")
_WARNED: set[str] = set()
_POOL_COUNTER = itertools.count()
_LIVE_POOLS: "weakref.WeakSet[SandboxPool]" = weakref.WeakSet()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(f"codedistill sandbox: {msg}", RuntimeWarning, stacklevel=3)


class _ServerHandle:
    """One fork server process and its pipes."""

    def __init__(self, uid: int | None, namespaces: bool, warm_targets: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", _SERVER_FILE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
        self.inp = self.proc.stdin.fileno()
        self.out = self.proc.stdout.fileno()
        _proto.send(self.inp, {"sys_path": [p for p in sys.path if p], "uid": uid,
                               "parent": os.getpid(), "namespaces": namespaces,
                               "warm_targets": warm_targets})
        hello = self._recv(30.0)
        self.caps = hello["caps"]
        self.pid = hello["pid"]
        for w in hello.get("warnings", []):
            _warn_once(w)

    def _recv(self, timeout: float):
        r, _, _ = select.select([self.out], [], [], timeout)
        if not r:
            raise TimeoutError("fork server did not answer")
        return _proto.recv(self.out)

    def request(self, job: dict, timeout: float) -> dict:
        _proto.send(self.inp, job)
        return self._recv(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        try:
            _proto.send(self.inp, {"op": "exit"})
            self.proc.wait(timeout=2)
        except Exception:  # noqa: BLE001
            pass
        self.kill()


class SandboxPool:
    """Runs :class:`Job` s (and trusted calls) in sandboxes, ``workers`` at a time.

    ``workers`` defaults to ``os.cpu_count()``. Each worker runs as its own sandbox uid
    (listed in :attr:`sandbox_uids`, only used when this process is root).
    ``namespaces=False`` forces the fallback isolation (for tests of that path).
    """

    def __init__(self, workers: int | None = None, limits: Limits | None = None, *,
                 namespaces: bool = True, warm_targets: Iterable[str] = ()):
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.limits = limits or Limits()
        self.namespaces = namespaces
        self.warm_targets = list(warm_targets)
        n = next(_POOL_COUNTER)
        base = 100_000_000 + ((os.getpid() % 1_000_000) * 16 + n % 16) * 64
        self.sandbox_uids = [base + i % 64 for i in range(self.workers)]
        self._slots: "queue.Queue[int]" = queue.Queue()
        for i in range(self.workers):
            self._slots.put(i)
        self._servers: list[_ServerHandle | None] = [None] * self.workers
        self._lock = threading.Lock()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=self.workers,
                                            thread_name_prefix="sandbox")
        _LIVE_POOLS.add(self)

    # ------------------------------------------------------------------ plumbing
    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        for i, s in enumerate(self._servers):
            if s is not None:
                s.close()
                self._servers[i] = None

    @property
    def server_pids(self) -> list[int]:
        return [s.proc.pid for s in self._servers if s is not None]

    @property
    def capabilities(self) -> dict:
        """The isolation layers the (first) fork server could set up."""
        slot = self._slots.get()
        try:
            return dict(self._server(slot).caps)
        finally:
            self._slots.put(slot)

    def _server(self, slot: int) -> _ServerHandle:
        s = self._servers[slot]
        if s is None or not s.alive():
            if s is not None:
                s.kill()
            s = _ServerHandle(self.sandbox_uids[slot] if os.geteuid() == 0 else None,
                              self.namespaces, self.warm_targets)
            self._servers[slot] = s
        return s

    def _execute(self, wire: dict, limits: Limits, n_tests: int, mode: str) -> Verdict:
        if self._closed:
            raise RuntimeError("SandboxPool is closed")
        wire["limits"] = limits.to_wire()
        slot = self._slots.get()
        try:
            last_err = None
            for _attempt in range(2):
                server = self._server(slot)
                try:
                    raw = server.request(wire, limits.timeout + 30.0)
                    return build_verdict(raw, n_tests, mode)
                except (EOFError, OSError, TimeoutError, ValueError) as e:
                    last_err = e
                    server.kill()
                    self._servers[slot] = None
            return Verdict(False, f"failed: sandbox error: {last_err!r}", 0, n_tests, 0.0,
                           [False] * n_tests)
        finally:
            self._slots.put(slot)

    # ------------------------------------------------------------------ programs
    def run_one(self, job: Job) -> Verdict:
        limits = job.limits or self.limits
        tests = list(job.tests)
        return self._execute({"mode": "tests", "program": job.program, "tests": tests,
                              "test_setup": job.test_setup}, limits, len(tests), "tests")

    def imap(self, jobs: Iterable[Job]) -> Iterator[tuple[int, Verdict]]:
        """Yield ``(index, verdict)`` as runs complete."""
        futures = {self._executor.submit(self.run_one, j): i for i, j in enumerate(jobs)}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            for fut in futures:
                fut.cancel()

    def run(self, jobs: Iterable[Job],
            progress: Callable[[int], None] | None = None) -> list[Verdict]:
        """Run all jobs; verdicts in input order. ``progress(n_done)`` after each."""
        jobs = list(jobs)
        out: list[Verdict | None] = [None] * len(jobs)
        if len(jobs) == 1 and progress is None:
            return [self.run_one(jobs[0])]
        for done, (i, v) in enumerate(self.imap(jobs), 1):
            out[i] = v
            if progress is not None:
                progress(done)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ trusted calls
    def call(self, target: str, args: dict, limits: Limits | None = None) -> Verdict:
        """Run trusted ``target`` ("pkg.mod:func") with ``args`` in a sandbox."""
        if ":" not in target:
            raise ValueError("target must look like 'package.module:function'")
        limits = limits or self.limits
        return self._execute({"mode": "call", "target": target, "args": args,
                              "payload_cap": limits.max_payload_bytes}, limits, 1, "call")

    def call_many(self, target: str, args_list: Iterable[dict],
                  limits: Limits | None = None) -> list[Verdict]:
        """``call`` for each args dict, in parallel; results in input order."""
        futs = [self._executor.submit(self.call, target, a, limits) for a in args_list]
        return [f.result() for f in futs]


_DEFAULT: SandboxPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> SandboxPool:
    """The shared pool behind :func:`run_program` and :func:`sandbox_call`."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT._closed:
            _DEFAULT = SandboxPool()
        return _DEFAULT


@atexit.register
def _shutdown_all() -> None:
    for pool in list(_LIVE_POOLS):
        try:
            pool.close()
        except Exception:  # noqa: BLE001
            pass
