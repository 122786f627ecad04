"""Per-step timestamps of a run, when ``CODEDISTILL_SANDBOX_PROFILE`` is set in the pool's
environment (they come back in ``ctl["prof"]`` of each raw result)."""

from __future__ import annotations

import os
import time

ENABLED = bool(os.environ.get("CODEDISTILL_SANDBOX_PROFILE"))


def now() -> int:
    return time.perf_counter_ns()


def minflt() -> int:
    """Minor page faults of this process so far."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[7])
