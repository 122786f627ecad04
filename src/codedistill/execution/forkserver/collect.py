"""Reading one run's pipes until it is over, enforcing its deadline."""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Callable

from . import records, syscalls, timing

_CHUNK = 65536


class Pipes:
    """The server's read ends of a run's pipes: records, stdout, stderr, control."""

    __slots__ = ("ctl", "err", "out", "res")

    def __init__(self, res: int, out: int, err: int, ctl: int):
        self.res, self.out, self.err, self.ctl = res, out, err, ctl


class RunCollector:
    """Collects one run: reads its pipes (each up to its cap) until the run is over and
    enforces the deadline.

    ``direct``: ``pid`` is D, the run's process and pid 1 of its namespaces, so killing it
    kills the whole run; else ``pid`` is B of the fallback layout, which enforces the
    deadline itself. When the harness's end record arrives the namespace is killed at
    once. If ``more()`` then says another job is queued, the run is *handed over*
    (:attr:`handed_over`): its result goes back without waiting for the namespace's
    teardown (milliseconds, mostly the kernel freeing the address space and mount
    namespace), and the server reaps D later, before the next run of the same uid and
    before it goes idle (the next run uses the other uid, in namespaces of its own).
    """

    def __init__(
        self, pid: int, pidfd: int, pipes: Pipes, lim: dict, t0: float, direct: bool, prof: dict | None = None
    ):
        self.pid, self.pidfd, self.pipes, self.t0, self.direct, self.prof = pid, pidfd, pipes, t0, direct, prof
        cap_out = int(lim["max_output_bytes"])
        cap_res = int(lim.get("max_payload_bytes", 1_000_000)) + 1_000_000
        self.caps = {pipes.res: cap_res, pipes.out: cap_out, pipes.err: cap_out, pipes.ctl: 1 << 16}
        self.bufs = {fd: bytearray() for fd in self.caps}
        self.truncated = dict.fromkeys(self.caps, False)
        self.open_fds = set(self.caps)
        self.hard_deadline = t0 + float(lim["timeout"]) + 10.0
        self.soft_deadline = t0 + float(lim["timeout"]) if direct else None
        self.timed_out = False
        self.ended = False  # the harness wrote its end record
        self.done = False  # pid has been reaped (or handed over)
        self.status: int | None = None  # pid's wait status
        self.grace_end: float | None = None
        self.handed_over = False

    def collect(self, more: Callable[[], bool] | None = None) -> dict:
        """Run to the end; the raw result (records, output, control information)."""
        while self.open_fds:
            now = time.monotonic()
            self._enforce_deadlines(now)
            if self.done and self.grace_end is None:
                self.grace_end = now + 0.5
            if self.grace_end is not None and now > self.grace_end:
                break
            self._read_ready(self._wait(now))
            if self.ended:
                self._finish(more is not None and more())
                break
            if not self.open_fds and not self.done:
                # every pipe closed: wait for B (it is finishing its bookkeeping)
                select.select([self.pidfd], [], [], max(0.0, self.hard_deadline - time.monotonic()))
        if not self.done:
            self._kill_and_reap()
        self._close()
        return self._result()

    def _kill_run(self) -> None:
        if not self.handed_over:
            syscalls.kill_pidfd(self.pidfd)

    def _enforce_deadlines(self, now: float) -> None:
        if not self.done and now > self.hard_deadline:  # B is wedged: should never happen
            _kill_listed_child(self.bufs[self.pipes.ctl])
            self._kill_run()
            os.kill(self.pid, signal.SIGKILL)
        if self.soft_deadline is not None and not self.done and not self.timed_out and now > self.soft_deadline:
            self.timed_out = True  # killing pid 1 of the namespace kills all of it
            self._kill_run()

    def _wait(self, now: float) -> list[int]:
        """The descriptors ready to read (``pidfd``: the process has exited)."""
        wait = 0.5 if self.grace_end is None else max(0.0, self.grace_end - now)
        if self.soft_deadline is not None and not self.timed_out:
            wait = min(wait, max(0.0, self.soft_deadline - now) + 0.001)
        fds = list(self.open_fds) + ([] if self.done else [self.pidfd])
        ready, _, _ = select.select(fds, [], [], wait)
        return ready

    def _read_ready(self, ready: list[int]) -> None:
        # The program's output before its records: whatever it wrote before the end
        # record is then in the buffers when the end record is seen.
        ready.sort(key=lambda fd: fd == self.pipes.res)
        for fd in ready:
            if fd == self.pidfd:
                if self.prof:
                    self.prof["s_cdone"] = timing.now()
                _, self.status = os.waitpid(self.pid, 0)
                self.done = True
                continue
            try:
                chunk = os.read(fd, _CHUNK)
            except OSError:
                chunk = b""
            if not chunk:
                self.open_fds.discard(fd)
                continue
            self._take(fd, chunk)
            if fd == self.pipes.res and self.direct and not self.truncated[fd]:
                self.ended = records.ended(self.bufs[fd])

    def _take(self, fd: int, chunk: bytes) -> None:
        room = self.caps[fd] - len(self.bufs[fd])
        if room > 0:
            self.bufs[fd] += chunk[:room]
        if len(chunk) > room:
            self.truncated[fd] = True

    def _drain(self, fd: int) -> None:
        """Read ``fd`` to its end (a non-blocking one: to what is in it now)."""
        while True:
            try:
                chunk = os.read(fd, _CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                return
            self._take(fd, chunk)

    def _finish(self, hand_over: bool) -> None:
        """The end record is in: every verdict is in. Kill the run's namespace now instead
        of waiting for it to wind down, and take what is left in the pipes: with
        ``hand_over``, what was written before the end record (D is reaped later); else
        all of it (no writer survives the namespace)."""
        if self.prof:
            self.prof["s_ended"] = timing.now()
        if hand_over:
            for fd in self.open_fds:
                os.set_blocking(fd, False)
                self._drain(fd)
        self._kill_run()
        if hand_over:
            self.handed_over = True
        else:
            if not self.done:  # (D is pid 1: then the whole namespace is gone)
                _, self.status = os.waitpid(self.pid, 0)
            for fd in self.open_fds:
                self._drain(fd)
        self.done = True
        if self.prof:
            self.prof["s_reaped"] = timing.now()
        self.open_fds.clear()

    def _kill_and_reap(self) -> None:
        try:
            pid, self.status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid = self.pid
        if pid == 0:
            self._kill_run()
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, self.status = os.waitpid(self.pid, 0)

    def _close(self) -> None:
        if not self.handed_over:
            os.close(self.pidfd)
        for fd in self.bufs:
            os.close(fd)

    def _ctl(self) -> dict:
        ctl: dict = {}
        for line in bytes(self.bufs[self.pipes.ctl]).splitlines():
            try:
                ctl.update(json.loads(line))
            except ValueError:
                pass
        if self.direct:
            ctl["timed_out"] = self.timed_out
            if self.status is not None and "error" not in ctl:  # D is our child
                if os.WIFSIGNALED(self.status):
                    ctl["signal"] = os.WTERMSIG(self.status)
                else:
                    ctl["exit_code"] = os.WEXITSTATUS(self.status)
        prof_d = ctl.pop("prof_d", {})
        if self.prof:
            self.prof["s_end"] = timing.now()
            self.prof.update(prof_d)
            ctl["prof"] = self.prof
        return ctl

    def _text(self, fd: int) -> str:
        return bytes(self.bufs[fd]).decode("utf-8", "replace")

    def _result(self) -> dict:
        p = self.pipes
        ctl = self._ctl()
        return {
            "records": self._text(p.res),
            "records_truncated": self.truncated[p.res],
            "stdout": self._text(p.out),
            "stderr": self._text(p.err),
            "stdout_truncated": self.truncated[p.out],
            "stderr_truncated": self.truncated[p.err],
            "ctl": ctl,
            "duration_s": time.monotonic() - self.t0,
        }


def _kill_listed_child(ctl: bytearray) -> None:
    """Kill C of the fallback layout, which B announced on the control pipe."""
    for line in bytes(ctl).splitlines():
        try:
            c = json.loads(line).get("child")
        except ValueError:
            continue
        if c:
            try:
                os.kill(c, signal.SIGKILL)
            except OSError:
                pass
