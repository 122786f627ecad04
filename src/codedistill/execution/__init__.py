"""Sandboxed execution of untrusted programs and their tests (see ``sandbox``)."""

from .pool import SandboxPool, default_pool
from .sandbox import Job, Limits, Verdict, run_program, sandbox_call

__all__ = ["Job", "Limits", "SandboxPool", "Verdict", "default_pool", "run_program",
           "sandbox_call"]
