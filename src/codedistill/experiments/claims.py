"""Claims on a shared directory: jobs shared out among workers on one machine or many.

A claim on job ``J`` is the lock file ``DIR/J.lock`` naming its owner (host, pid, a random
token). It is published whole or not at all: a complete temporary file is hard-linked to
the lock's name, which fails when the name exists (``O_CREAT | O_EXCL`` where a file system
has no hard links), so of several workers exactly one gets it, on a network file system too.

While it works, the owner's heartbeat thread rewrites ``DIR/.J.lock.<token>.beat`` (its own
file: the lock itself is never rewritten) every lease/4 seconds and checks that the lock
still names it. A claim is stale when its owner's process is gone (same host) or its
heartbeat is older than the lease (any host: a node that never comes back). Ages are read
from file modification times, all set by the shared file system, so the nodes' clocks may
differ. A stale claim is taken over by renaming the lock aside: of
several takers one rename wins, and a taker that finds it moved a *newer* lock (another
taker's, made after it looked) puts it back. An owner whose lock no longer names it was
presumed dead (no heartbeat for a whole lease): its thread interrupts the main thread,
which stops with :class:`ClaimLost` instead of finishing a job that someone else now runs.

:func:`run_once` does a job exactly once among all workers (a done marker beside the lock):
the ablation's table, the sweep's test evaluation of its best trial.
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from codedistill.errors import CodedistillError
from codedistill.runs import write_text

Log = Callable[[str], None]
DEFAULT_LEASE = 300.0
LEASE_HELP = (
    "Seconds without a heartbeat after which a worker's claim (a sweep trial, an ablation variant, "
    "the final evaluation) is taken over by another worker; heartbeats every lease/4. A worker whose "
    "process is gone on the same host is taken over at once."
)


class ClaimLost(CodedistillError):
    """This worker's claim was taken over (it sent no heartbeat for a whole lease)."""


def hostname() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def heartbeat_interval(lease: float) -> float:
    return max(0.2, lease / 4)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def publish(path: Path, data: dict[str, Any]) -> bool:
    """Create ``path`` holding ``data`` only where it does not exist yet; True when this call
    created it. Readers never see it half-written (a hard link of a complete file)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.new")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: O_EXCL, then the content
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data))
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _beat_path(lock: Path, token: str) -> Path:
    return lock.with_name(f".{lock.name}.{token}.beat")


def owner_text(rec: dict[str, Any]) -> str:
    return f"{rec.get('host')}:{rec.get('pid')}"


def stale_reason(lock: Path, rec: dict[str, Any], lease: float, now: float | None = None) -> str | None:
    """Why the claim ``rec`` (the content of ``lock``) may be taken over, or None while it holds.
    Its heartbeat's age is the modification time of its beat file (the lock's before the first
    beat) against ``now``: the modification time of the judge's own beat file, just written on
    the same file system, so both times come from one clock (a network file system's server)."""
    if rec.get("host") == hostname() and not pid_alive(int(rec.get("pid", -1))):
        return f"its process {rec.get('pid')} on this host is gone"
    try:
        last = _beat_path(lock, str(rec.get("token"))).stat().st_mtime
    except FileNotFoundError:
        try:
            last = lock.stat().st_mtime
        except FileNotFoundError:
            return None  # released meanwhile
    age = (time.time() if now is None else now) - last
    if age > lease:
        return f"no heartbeat for {age:.0f} s (lease {lease:g} s)"
    return None


class Claim:
    """A held claim; ``with claim:`` runs its heartbeat and releases it at the end."""

    def __init__(self, lock: Path, rec: dict[str, Any], lease: float, taken_over: str | None):
        self.lock = lock
        self.rec = rec
        self.token = str(rec["token"])
        self.lease = lease
        self.taken_over = taken_over  # whose stale claim this replaced, and why
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prev_sigint: Any = None

    def beat(self) -> None:
        write_text(_beat_path(self.lock, self.token), json.dumps({"heartbeat": time.time()}))

    def still_mine(self) -> bool:
        cur = _read(self.lock)
        return cur is not None and cur.get("token") == self.token

    def _run(self) -> None:
        while not self._stop.wait(heartbeat_interval(self.lease)):
            if not self.still_mine():
                cur = _read(self.lock)
                self.lost = (
                    f"the claim on {self.lock.name} was taken over"
                    + (f" by {owner_text(cur)}" if cur else "")
                    + f": this worker sent no heartbeat for more than the lease ({self.lease:g} s)"
                )
                _thread.interrupt_main()
                return
            try:
                self.beat()
            except OSError:
                pass  # a transient error of a network file system: the next beat may pass

    def _on_sigint(self, signum: int, frame: Any) -> None:
        """SIGINT while held: the heartbeat thread's interruption (the claim is lost) stops
        the main thread; a real Ctrl-C does what it did before the claim."""
        prev = self._prev_sigint
        if self.lost or prev is None or prev == signal.SIG_DFL:
            raise KeyboardInterrupt
        if callable(prev):
            prev(signum, frame)
        # SIG_IGN: Ctrl-C stays ignored

    def __enter__(self) -> Claim:
        # The lost claim reaches the main thread as a simulated SIGINT, which Python drops
        # when SIGINT is ignored: a worker started in the background by a script (`cmd &`,
        # nohup) inherits SIGINT ignored and would never stop. So, on the main thread, the
        # claim handles SIGINT itself while it is held.
        if threading.current_thread() is threading.main_thread():
            self._prev_sigint = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {self.lock.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
        if self.lost and (exc_type is None or issubclass(exc_type, KeyboardInterrupt)):
            raise ClaimLost(self.lost) from None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._prev_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._prev_sigint)
            self._prev_sigint = None
        if self.still_mine():
            self.lock.unlink(missing_ok=True)
        _beat_path(self.lock, self.token).unlink(missing_ok=True)


def try_claim(directory: Path, job: str, lease: float = DEFAULT_LEASE, log: Log | None = None) -> Claim | None:
    """Claim ``job`` (free, or stale and taken over) or return None when a live worker holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / f"{job}.lock"
    now = time.time()
    rec = {"job": job, "host": hostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "since": now}
    beat = _beat_path(lock, str(rec["token"]))
    write_text(beat, json.dumps({"heartbeat": now}))
    taken_over: str | None = None
    for _ in range(4):
        if publish(lock, rec):
            if taken_over and log:
                log(f"took over {job} from {taken_over}")
            return Claim(lock, rec, lease, taken_over)
        cur = _read(lock)
        write_text(beat, json.dumps({"heartbeat": time.time()}))
        now = beat.stat().st_mtime  # now, on the shared file system's clock
        why: str | None
        if cur is None:
            try:
                age = now - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released in between: try again
            if age <= lease:
                break  # being written by a worker without hard links
            why, cur = f"an unreadable lock {age:.0f} s old", {}
        else:
            why = stale_reason(lock, cur, lease, now=now)
            if why is None:
                break
        aside = lock.with_name(f".{lock.name}.{rec['token']}.stale")
        try:
            os.rename(lock, aside)  # of several takers, exactly one moves a given lock
        except FileNotFoundError:
            continue
        moved = _read(aside) or {}
        if moved.get("token") != cur.get("token"):
            # a newer lock (another taker's, made after this one looked): put it back
            try:
                os.link(aside, lock)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            break
        aside.unlink(missing_ok=True)
        if cur.get("token"):
            _beat_path(lock, str(cur["token"])).unlink(missing_ok=True)
        taken_over = f"{owner_text(cur)} ({why})" if cur else why
    beat.unlink(missing_ok=True)
    return None


def holder(directory: Path, job: str) -> str | None:
    """``host:pid`` of the worker holding ``job``, if any."""
    rec = _read(directory / f"{job}.lock")
    return owner_text(rec) if rec else None


def run_once(
    directory: Path,
    job: str,
    work: Callable[[], Any],
    lease: float = DEFAULT_LEASE,
    log: Log = print,
    poll: float | None = None,
) -> bool:
    """Do ``work`` exactly once among all workers sharing ``directory``: the first to claim
    ``job`` does it and leaves ``job.done``; the others wait for that marker (taking the claim
    over if its holder dies). True when this call did the work."""
    done = directory / f"{job}.done"
    waited = False
    while not done.exists():
        claim = try_claim(directory, job, lease, log)
        if claim is not None:
            with claim:
                if done.exists():
                    return False
                work()
                write_text(done, json.dumps({"by": owner_text(claim.rec), "time": time.time()}) + "\n")
            return True
        if not waited:
            log(f"waiting for {holder(directory, job) or 'another worker'} to finish {job}")
            waited = True
        time.sleep(poll if poll is not None else min(5.0, heartbeat_interval(lease)))
    return False


def wait_poll(lease: float) -> float:
    """How often an idle worker looks again for work to take over."""
    return max(0.5, min(10.0, heartbeat_interval(lease)))
