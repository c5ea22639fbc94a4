"""The public API: every name in a package's ``__all__`` is importable and every public function
and method has type hints (the package ships ``py.typed``)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

PACKAGES = [
    "normlab",
    "normlab.functional",
    "normlab.nn",
    "normlab.optim",
    "normlab.diagnostics",
    "normlab.data",
    "normlab.methods",
    "normlab.models",
    "normlab.train",
    "normlab.experiments",
    "normlab.registry",
    "normlab.errors",
]


def _public_functions(package: str):
    module = importlib.import_module(package)
    for name in module.__all__:
        obj = getattr(module, name)  # raises if __all__ names something missing
        if inspect.isfunction(obj):
            yield f"{package}.{name}", obj
        elif inspect.isclass(obj) and not getattr(obj, "_is_protocol", False):
            for attr, value in vars(obj).items():
                if inspect.isfunction(value) and (attr == "__init__" or not attr.startswith("_")):
                    yield f"{package}.{name}.{attr}", value


@pytest.mark.parametrize("package", PACKAGES)
def test_public_functions_have_type_hints(package):
    missing = []
    for qualname, fn in _public_functions(package):
        sig = inspect.signature(fn)
        for pname, p in sig.parameters.items():
            if pname in ("self", "cls", "ctx") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.annotation is inspect.Parameter.empty:
                missing.append(f"{qualname}({pname})")
        if fn.__name__ != "__init__" and sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{qualname} -> ?")
    assert not missing, missing


def test_py_typed_ships():
    import normlab

    assert (Path(normlab.__file__).parent / "py.typed").is_file()
