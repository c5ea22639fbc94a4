"""The package's import structure: no cycles, and imports point down the layers.

functional <- nn <- optim <- diagnostics; methods depends on nn and optim; models on nn only;
train on methods, models, data; experiments on train and diagnostics; cli on everything.
docs/architecture.md draws the same picture.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "normlab"

BASE = {"registry", "errors", "_io", "_version"}  # dependency-free helpers anyone may import
ALLOWED: dict[str, set[str]] = {
    "registry": set(),
    "_version": set(),
    "errors": set(),
    "_io": {"errors", "_version"},
    "functional": {"functional"} | BASE,
    "data": {"data"} | BASE,
    "nn": {"functional", "nn"} | BASE,
    "optim": {"functional", "nn", "optim"} | BASE,
    "diagnostics": {"functional", "nn", "optim", "diagnostics"} | BASE,
    "methods": {"functional", "nn", "optim", "methods"} | BASE,
    "models": {"nn", "models"} | BASE,
    "train": {"functional", "nn", "optim", "diagnostics", "data", "methods", "models", "train"}
    | BASE,
    "distributed": {
        "functional",
        "nn",
        "optim",
        "diagnostics",
        "data",
        "methods",
        "models",
        "train",
        "distributed",
    }
    | BASE,
    "experiments": {
        "distributed",
        "functional",
        "nn",
        "optim",
        "diagnostics",
        "data",
        "methods",
        "models",
        "train",
        "experiments",
    }
    | BASE,
    "report": {
        "distributed",
        "functional",
        "nn",
        "optim",
        "diagnostics",
        "data",
        "methods",
        "models",
        "train",
        "experiments",
        "report",
    }
    | BASE,
    "cli": {
        "distributed",
        "report",
        "functional",
        "nn",
        "optim",
        "diagnostics",
        "data",
        "methods",
        "models",
        "train",
        "experiments",
        "cli",
    }
    | BASE,
}


def _module_name(path: Path) -> str:
    parts = ["normlab", *path.relative_to(ROOT).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """normlab modules that module ``name`` imports (anywhere in the file, also in functions);
    ``from pkg import sub`` counts as importing ``pkg.sub`` when ``sub`` is a module."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "normlab"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "normlab":
                continue
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found |= subs or {node.module}
            if len(subs) < len(node.names):
                found.add(node.module)
    return {m for m in found if m in MODULES} - {name}


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "normlab"


def test_the_walk_sees_the_package():
    assert {"normlab.methods.base", "normlab.nn.batchnorm", "normlab.cli"} <= MODULES.keys()
    assert "normlab.methods.base" in GRAPH["normlab.methods"]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _layer(n) in ALLOWED))
def test_imports_point_down(name):
    layer = _layer(name)
    wrong = sorted(m for m in GRAPH[name] if _layer(m) not in ALLOWED[layer])
    assert not wrong, (
        f"{name} ({layer}) imports {wrong}; {layer} may import {sorted(ALLOWED[layer])}"
    )


def test_every_package_has_a_layer():
    layers = {_layer(n) for n in MODULES} - {"normlab", "__main__"}
    assert layers <= ALLOWED.keys(), sorted(layers - ALLOWED.keys())


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


FUSED = "normlab.functional._fused"
SOURCES = (".py", ".cpp", ".h")
# A module named in a string for a run-time import: Python's import_module, pybind11's import.
_DYNAMIC_IMPORT = re.compile(r"""import(?:_module)?\(\s*["']([\w.]+)["']""")


def test_the_fused_kernels_reach_nothing_above_them():
    # The reference modules import the kernels and register the graph backwards with them
    # (_fused/_graph.py), so the kernel package imports nothing of normlab but itself: neither
    # statically nor by a module name looked up at run time (Python or C++).
    inside = sorted(n for n in MODULES if n == FUSED or n.startswith(FUSED + "."))
    assert f"{FUSED}._graph" in inside
    for name in inside:
        outside = sorted(m for m in GRAPH[name] if not m.startswith(FUSED))
        assert not outside, f"{name} imports {outside}"
    sources = [p for p in (ROOT / "functional" / "_fused").rglob("*") if p.suffix in SOURCES]
    assert any(p.suffix == ".cpp" for p in sources)
    for path in sources:
        named = _DYNAMIC_IMPORT.findall(path.read_text())
        outside = sorted(n for n in named if n.startswith("normlab") and not n.startswith(FUSED))
        assert not outside, f"{path.name} imports {outside} at run time"
