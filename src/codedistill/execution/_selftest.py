"""Trusted call targets used by the sandbox's own tests (``sandbox_call``)."""

from __future__ import annotations

import os
import time


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def whoami() -> dict:
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "listdir": sorted(os.listdir(".")),
    }


def run_untrusted(code: str) -> dict:
    """Execute untrusted code the way a tracer would and report its globals' names."""
    ns: dict = {}
    exec(code, ns)  # noqa: S102 - this runs inside the sandbox child
    return {"names": sorted(k for k in ns if not k.startswith("__"))}
