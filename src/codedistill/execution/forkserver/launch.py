"""The fork server's entry point, run as ``python -I -S launch.py`` by the pool.

Isolated mode puts neither this directory nor site-packages on ``sys.path``, and the
server must not import the ``codedistill.execution`` package (whose ``__init__`` pulls in
the pool, subprocess, concurrent.futures, ...): every run is a fork of the server, and
what the server holds, each fork copies (page tables) and each exit frees. So this
package is loaded from its directory under a name of its own (:data:`PACKAGE`); its
modules import the standard library and each other only.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

PACKAGE = "_codedistill_forkserver"


def load(module: str) -> ModuleType:
    """``module`` of this package, imported under :data:`PACKAGE`."""
    if PACKAGE not in sys.modules:
        here = os.path.dirname(os.path.abspath(__file__))
        spec = importlib.util.spec_from_file_location(
            PACKAGE, os.path.join(here, "__init__.py"), submodule_search_locations=[here]
        )
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{module}")


if __name__ == "__main__":
    load("server").serve()
