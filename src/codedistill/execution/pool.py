"""A pool of warm fork servers that runs sandboxed programs in parallel.

Each worker owns one fork server process (:mod:`.forkserver`), started lazily, restarted
when it dies or stops answering, and fed by a dispatcher thread that keeps up to three
jobs in flight on it (``os.cpu_count()`` workers by default); a hostile program can only
ever kill its own forked child, never the server or this process. Servers are started in
their own session with ``PR_SET_PDEATHSIG`` so they die with the pool's process, and are
shut down on ``close()``, on leaving the ``with`` block, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, as_completed

from .forkserver import ENTRY, wire
from .types import Job, Limits, Verdict, build_verdict

_WARNED: set[str] = set()
_POOL_COUNTER = itertools.count()
_DEPTH = 3  # jobs in flight per server (one running, two queued behind it)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_LIVE_POOLS: weakref.WeakSet[SandboxPool] = weakref.WeakSet()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(f"codedistill sandbox: {msg}", RuntimeWarning, stacklevel=3)


class _ServerHandle:
    """One fork server process and its pipes."""

    def __init__(self, uids: list[int] | None, namespaces: bool, warm_targets: list[str], env: dict[str, str]):
        self.asked = False  # to exit
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", ENTRY],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # PIPE
        self.inp = self.proc.stdin.fileno()
        self.out = self.proc.stdout.fileno()
        for fd in (self.inp, self.out):  # room for jobs queued ahead and big results
            try:
                fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass
        wire.send(
            self.inp,
            {
                "sys_path": [p for p in sys.path if p],
                "uid": uids[0] if uids else None,
                "uids": uids,
                "parent": os.getpid(),
                "namespaces": namespaces,
                "warm_targets": warm_targets,
            },
        )
        hello = self.recv(30.0)
        self.caps = hello["caps"]
        self.pid = hello["pid"]
        self.helpers = list(hello.get("helpers", []))  # the server's templates
        for w in hello.get("warnings", []):
            _warn_once(w)

    def recv(self, timeout: float):
        r, _, _ = select.select([self.out], [], [], max(0.0, timeout))
        if not r:
            raise TimeoutError("fork server did not answer")
        return wire.recv(self.out)

    def send_raw(self, data: bytes) -> None:
        wire.write_all(self.inp, data)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()

    def ask_exit(self) -> None:
        if not self.asked:
            self.asked = True
            with contextlib.suppress(Exception):
                wire.send(self.inp, {"op": "exit"})

    def close(self) -> None:
        """Ask the server to exit (if not yet asked), wait for it to finish (it reaps its
        runs first), then kill what is left."""
        self.ask_exit()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=2)
        self.kill()


class _Task:
    __slots__ = ("attempts", "data", "future", "mode", "n_tests", "timeout")

    def __init__(self, message: dict, n_tests: int, mode: str, timeout: float):
        self.data = wire.frame(message)
        self.n_tests, self.mode, self.timeout = n_tests, mode, timeout
        self.future: Future = Future()
        self.attempts = 0


class _Core:
    """The servers and one dispatcher thread per server (kept apart from
    :class:`SandboxPool` so that the threads do not keep the pool alive).

    Each dispatcher keeps up to ``_DEPTH`` jobs in flight on its server: while one
    runs, the next is already in the server's input, so the server never waits for
    this process and can make the next sandbox ready during the current run. A server
    answers its jobs in order.
    """

    def __init__(
        self, workers: int, uids: list[list[int]], namespaces: bool, warm_targets: list[str], env: dict[str, str]
    ):
        self.workers = workers
        self.uids = uids
        self.namespaces = namespaces
        self.warm_targets = warm_targets
        self.env = env
        self.queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self.servers: list[_ServerHandle | None] = [None] * workers
        self.locks = [threading.Lock() for _ in range(workers)]
        self.threads: list[threading.Thread] = []
        self.start_lock = threading.Lock()
        self.closed = False

    def server(self, slot: int) -> _ServerHandle:
        with self.locks[slot]:
            s = self.servers[slot]
            if s is None or not s.alive():
                if s is not None:
                    s.kill()
                uids = self.uids[slot] if os.geteuid() == 0 else None
                s = _ServerHandle(uids, self.namespaces, self.warm_targets, self.env)
                self.servers[slot] = s
            return s

    def drop(self, slot: int, s: _ServerHandle) -> None:
        with self.locks[slot]:
            s.kill()
            if self.servers[slot] is s:
                self.servers[slot] = None

    def start_threads(self, servers: int = 0) -> None:
        """Start the dispatchers (once); the first ``servers`` of them start their server
        at once instead of with their first job."""
        if self.threads:
            return
        with self.start_lock:
            if not self.threads:
                for i in range(self.workers):
                    d = _Dispatcher(self, i, eager=i < servers)
                    t = threading.Thread(target=d.run, name=f"sandbox-{i}", daemon=True)
                    t.start()
                    self.threads.append(t)

    def submit(self, task: _Task) -> Future:
        if self.closed:
            raise RuntimeError("SandboxPool is closed")
        self.start_threads()
        self.queue.put(task)
        return task.future

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        while True:  # jobs not started yet are cancelled
            try:
                task = self.queue.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task.future.cancel()
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            if t is not threading.current_thread():
                t.join()
        live = [(i, s) for i, s in enumerate(self.servers) if s is not None]
        for _, s in live:  # all asked first: they wind down side by side
            s.ask_exit()
        for i, s in live:
            s.close()
            self.servers[i] = None


class _Dispatcher:
    """The thread that feeds one server: keeps up to ``_DEPTH`` jobs in flight on it and
    hands out its answers, in order. When the server dies or stops answering, it is
    dropped (the next job starts a new one) and each job in flight gets one more try."""

    def __init__(self, core: _Core, slot: int, eager: bool = False):
        self.core, self.slot, self.eager = core, slot, eager
        self.inflight: deque[_Task] = deque()
        self.retry: deque[_Task] = deque()
        self.stop = False
        self.head_since = 0.0  # when the oldest job in flight became the one the server runs
        self.server: _ServerHandle | None = None

    def run(self) -> None:
        if self.eager:  # a failed start is tried again (and reported) with the first job
            with contextlib.suppress(Exception):
                self.server = self.core.server(self.slot)
        while True:
            self._fill()
            if self.inflight:
                self._answer_head()
            elif self.stop:
                return

    def _fill(self) -> None:
        while len(self.inflight) < _DEPTH and not self.stop:
            task = self._next_task()
            if task is None:
                return
            self._send(task)

    def _next_task(self) -> _Task | None:
        """A job to send now (a retry first); None when there is none (or ``stop``)."""
        if self.retry:
            return self.retry.popleft()
        while True:
            try:
                task = self.core.queue.get(block=not self.inflight)
            except queue.Empty:
                return None
            if task is None:
                self.stop = True
                return None
            if task.future.set_running_or_notify_cancel():
                return task

    def _send(self, task: _Task) -> None:
        try:
            self.server = self.core.server(self.slot)
            self.server.send_raw(task.data)
        except Exception as e:  # noqa: BLE001
            self._lost([task], e)
            return
        if not self.inflight:
            self.head_since = time.monotonic()
        self.inflight.append(task)

    def _answer_head(self) -> None:
        task = self.inflight[0]
        assert self.server is not None  # a job is in flight on it
        try:
            raw = self.server.recv(self.head_since + task.timeout + 30.0 - time.monotonic())
        except (EOFError, OSError, TimeoutError, ValueError) as e:
            self._lost([], e)
            return
        self.inflight.popleft()
        self.head_since = time.monotonic()
        try:
            task.future.set_result(build_verdict(raw, task.n_tests, task.mode))
        except BaseException as e:  # noqa: BLE001
            task.future.set_exception(e)

    def _lost(self, unsent: list[_Task], err: BaseException) -> None:
        """The server died or stopped answering: drop it; each job gets one more try."""
        if self.server is not None:
            self.core.drop(self.slot, self.server)
        self.server = None
        for t in unsent + list(self.inflight):
            t.attempts += 1
            if t.attempts >= 2:
                t.future.set_result(Verdict.failure(f"failed: sandbox error: {err!r}", t.n_tests))
            else:
                self.retry.append(t)
        self.inflight.clear()


class SandboxPool:
    """Runs :class:`Job` s (and trusted calls) in sandboxes, ``workers`` at a time.

    ``workers`` defaults to ``os.cpu_count()``. Each worker has two sandbox uids of its
    own that its runs alternate between (all listed in :attr:`sandbox_uids`, only used
    when this process is root).
    ``namespaces=False`` forces the fallback isolation (for tests of that path).
    Its fork servers, whenever they start (with their first jobs, or again after one died),
    get the environment this process had when the pool was made.
    """

    def __init__(
        self,
        workers: int | None = None,
        limits: Limits | None = None,
        *,
        namespaces: bool = True,
        warm_targets: Iterable[str] = (),
    ):
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.limits = limits or Limits()
        self.namespaces = namespaces
        self.warm_targets = list(warm_targets)
        n = next(_POOL_COUNTER)
        base = 100_000_000 + ((os.getpid() % 1_000_000) * 16 + n % 16) * 128
        per_worker = [[base + (2 * i + k) % 128 for k in range(2)] for i in range(self.workers)]
        self.sandbox_uids = sorted({u for pair in per_worker for u in pair})
        self._core = _Core(self.workers, per_worker, namespaces, self.warm_targets, dict(os.environ))
        self._closed = False
        _LIVE_POOLS.add(self)

    # ------------------------------------------------------------------ plumbing
    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._core.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def server_pids(self) -> list[int]:
        return [s.proc.pid for s in list(self._core.servers) if s is not None]

    @property
    def helper_pids(self) -> list[int]:
        """Trusted helper processes of the servers (each server's templates, idle forks of
        the server that clone every run's process); they never run untrusted code."""
        return [p for s in list(self._core.servers) if s is not None for p in s.helpers]

    @property
    def capabilities(self) -> dict:
        """The isolation layers the (first) fork server could set up."""
        return dict(self._core.server(0).caps)

    def _submit(self, message: dict, limits: Limits, n_tests: int, mode: str) -> Future:
        if self._closed:
            raise RuntimeError("SandboxPool is closed")
        message["limits"] = limits.to_wire()
        return self._core.submit(_Task(message, n_tests, mode, limits.timeout))

    def _submit_job(self, job: Job) -> Future:
        limits = job.limits or self.limits
        tests = list(job.tests)
        return self._submit(
            {"mode": "tests", "program": job.program, "tests": tests, "test_setup": job.test_setup},
            limits,
            len(tests),
            "tests",
        )

    def start(self, servers: int | None = None) -> None:
        """Start ``servers`` fork servers (default: one per worker) now, in the background,
        instead of with the first jobs: their start-up (an interpreter, the preloaded
        standard library, the template) then overlaps whatever the caller does next."""
        if self._closed:
            raise RuntimeError("SandboxPool is closed")
        self._core.start_threads(self.workers if servers is None else min(self.workers, servers))

    # ------------------------------------------------------------------ programs
    def run_one(self, job: Job) -> Verdict:
        return self._submit_job(job).result()

    def imap(self, jobs: Iterable[Job]) -> Iterator[tuple[int, Verdict]]:
        """Yield ``(index, verdict)`` as runs complete."""
        futures = {self._submit_job(j): i for i, j in enumerate(jobs)}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            for fut in futures:
                fut.cancel()

    def run(self, jobs: Iterable[Job], progress: Callable[[int], None] | None = None) -> list[Verdict]:
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
    def _submit_call(self, target: str, args: dict, limits: Limits | None) -> Future:
        if ":" not in target:
            raise ValueError("target must look like 'package.module:function'")
        limits = limits or self.limits
        return self._submit(
            {"mode": "call", "target": target, "args": args, "payload_cap": limits.max_payload_bytes}, limits, 1, "call"
        )

    def call(self, target: str, args: dict, limits: Limits | None = None) -> Verdict:
        """Run trusted ``target`` ("pkg.mod:func") with ``args`` in a sandbox."""
        return self._submit_call(target, args, limits).result()

    def call_many(self, target: str, args_list: Iterable[dict], limits: Limits | None = None) -> list[Verdict]:
        """``call`` for each args dict, in parallel; results in input order."""
        futs = [self._submit_call(target, a, limits) for a in args_list]
        return [f.result() for f in futs]


@atexit.register
def _shutdown_all() -> None:
    for pool in list(_LIVE_POOLS):
        with contextlib.suppress(Exception):
            pool.close()
