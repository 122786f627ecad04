"""The package's import graph: no private names across packages, no cycles, layers point down.

Every module of ``src/codedistill`` is parsed with ``ast`` and every import is read: at module
top, inside functions, under ``if TYPE_CHECKING:``. A lazy import is still a dependency, so it
counts like any other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT_PACKAGE = "codedistill"

# Each top-level unit of codedistill and its layer: a module may import its own layer and the
# ones below, never a higher one. The data flow reads bottom to top.
LAYERS: dict[str, int] = {
    "__init__": 0,
    "errors": 0,
    "runs": 0,
    "ui": 0,
    "metrics": 0,
    "results": 0,
    "resources": 0,
    "data": 1,
    "execution": 1,
    "models": 2,
    "generation": 3,
    "evaluation": 3,
    "evalplus_judge": 3,
    "prompts": 3,
    "config": 4,
    "egcfg": 4,
    "training": 4,
    "baseline": 5,
    "report": 5,
    "btp": 6,
    "experiments": 7,
    "cli": 8,
    "evaluate_command": 8,
    "__main__": 8,
}
# Units of one layer that must not know each other (either way).
INDEPENDENT = {frozenset({"data", "execution"})}


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module, dotted
    target: str  # the imported module, dotted (a submodule when the name is one)
    name: str | None  # the imported name for ``from X import name`` (None: ``import X``)
    line: int

    def where(self) -> str:
        return f"{self.importer}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / ROOT_PACKAGE).rglob("*.py"))}


MODULES = all_modules()


def absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_in(module: str, tree: ast.AST, is_package: bool = False) -> Iterator[Import]:
    """Every codedistill import anywhere in ``tree`` (functions and TYPE_CHECKING blocks too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == ROOT_PACKAGE:
                    yield Import(module, alias.name, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = absolute(module, is_package, node)
            if source.split(".")[0] != ROOT_PACKAGE:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                yield Import(module, sub if sub in MODULES else source, alias.name, node.lineno)


IMPORTS = [
    imp
    for m, p in MODULES.items()
    for imp in imports_in(m, ast.parse(p.read_text(encoding="utf-8"), str(p)), p.name == "__init__.py")
]


def unit(module: str) -> str:
    """The top-level unit of a module: ``codedistill.btp.loop`` -> ``btp``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_part(imp: Import) -> str | None:
    """The private module or name ``imp`` reaches into, or None."""
    for part in imp.target.split(".")[1:]:
        if is_private(part):
            return part
    if imp.name is not None and is_private(imp.name):
        return imp.name
    return None


def test_every_unit_has_a_layer():
    missing = sorted({unit(m) for m in MODULES} - set(LAYERS))
    assert not missing, f"declare the layer of {missing} in LAYERS"


def test_no_import_of_another_packages_private_names():
    bad = sorted(
        {
            f"{imp.where()} imports {imp.target}{'.' + imp.name if imp.name else ''} ({private_part(imp)} is "
            f"private to {unit(imp.target)})"
            for imp in IMPORTS
            if unit(imp.importer) != unit(imp.target) and private_part(imp)
        }
    )
    assert not bad, "private names used across packages:\n" + "\n".join(bad)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for imp in IMPORTS:
        if imp.target != imp.importer and imp.target in MODULES:
            graph.setdefault(imp.importer, set()).add(imp.target)
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def layer_violation(imp: Import) -> str | None:
    a, b = unit(imp.importer), unit(imp.target)
    if a == b or a not in LAYERS or b not in LAYERS:
        return None
    if LAYERS[b] > LAYERS[a]:
        return f"{a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]})"
    if frozenset({a, b}) in INDEPENDENT:
        return f"{a} imports {b}, which it must not know"
    return None


def test_layers_point_down():
    bad = sorted({f"{imp.where()} -> {imp.target}: {why}" for imp in IMPORTS if (why := layer_violation(imp))})
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from codedistill.execution._server import Server", "_server"),
        ("from codedistill.btp.plots import _plt", "_plt"),
        ("import codedistill.egcfg._tiny", "_tiny"),
        ("from codedistill.egcfg import _tiny", "_tiny"),
        ("from codedistill import __version__", None),
        ("from codedistill.generation.base import Generator", None),
    ],
)
def test_private_names_are_recognised(source, expected):
    imps = list(imports_in("codedistill.report.build", ast.parse(source)))
    assert [private_part(i) for i in imps] == [expected]


def test_relative_imports_resolve():
    tree = ast.parse("from .base import Candidate\nfrom ..errors import ConfigError")
    assert [i.target for i in imports_in("codedistill.generation.hf", tree)] == [
        "codedistill.generation.base",
        "codedistill.errors",
    ]


def test_cycles_are_found():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []
