"""Sandboxed execution of untrusted programs and their tests (see ``sandbox``)."""

from .pool import SandboxPool
from .sandbox import default_pool, run_program, sandbox_call
from .types import Job, Limits, Verdict

__all__ = ["Job", "Limits", "SandboxPool", "Verdict", "default_pool", "run_program", "sandbox_call"]
