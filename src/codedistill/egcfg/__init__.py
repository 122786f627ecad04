"""EG-CFG: execution-guided line-by-line code generation (Lavon, Katz, Wolf 2025).

Public API (imported lazily: ``codedistill.egcfg.tracer`` runs inside the sandbox and must
not pull in torch through this package):

* :class:`EGCFGSolver` (``agents``): ``solve(problem, prompt, stop, seed) -> (Candidate, log)``
* :class:`EGCFGConfig` / :class:`AgentSpec` (``config``)
* :func:`cfg_generate` (``cfg``): batched CFG decoding with KV caches (greedy/sample/beam)
* :func:`make_egcfg_sampler` (``runner``): the ``baseline --method egcfg`` hook
* ``tracer.trace``: the sandboxed line tracer
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "EGCFGSolver": "codedistill.egcfg.agents",
    "append_log": "codedistill.egcfg.agents",
    "EGCFGConfig": "codedistill.egcfg.config",
    "AgentSpec": "codedistill.egcfg.config",
    "cfg_generate": "codedistill.egcfg.cfg",
    "CFGResult": "codedistill.egcfg.cfg",
    "make_egcfg_sampler": "codedistill.egcfg.runner",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
