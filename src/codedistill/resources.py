"""Files shipped inside the codedistill package, found through ``importlib.resources``.

Works the same for an editable checkout and for a wheel installed into site-packages:
nothing here looks at the source tree around the package.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource_path(name: str) -> Path:
    """The file or folder ``name`` (relative to the package root, e.g.
    ``"assets/accelerate/fsdp.yaml"`` or ``"data/files/mbpp"``) on disk."""
    res = files("codedistill").joinpath(*name.split("/"))
    if not isinstance(res, Path):
        raise FileNotFoundError(
            f"codedistill's {name} is not on the file system (package imported from {res!r}); "
            "install codedistill unpacked (pip install codedistill), not as a zip."
        )
    if not res.exists():
        raise FileNotFoundError(
            f"codedistill's packaged {name} is missing at {res}; reinstall codedistill "
            "(pip install --force-reinstall codedistill) or, in a checkout, run `make setup`."
        )
    return res
