"""Build (once) and load the fused CPU kernels with ``torch.utils.cpp_extension.load``.

The sources are compiled on first use into a build directory keyed by a digest of the sources,
the compiler flags, torch, Python and the CPU's vector extensions: ``$TORCH_EXTENSIONS_DIR``
when set (torch's own layout), else ``$XDG_CACHE_HOME/normlab/torch_extensions`` (default
``~/.cache/normlab/torch_extensions``). Later processes load the cached library in well under a
second. Builds are serialized across processes by an OS file lock held for the build, so a
build killed half-way (which leaves torch's own ``lock`` file behind, and would make every later
build wait on it forever) is detected and its stale lock removed, with a WARNING. Any failure
(no C++ compiler, no ninja, a compile error, ``NORMLAB_FUSED=0``) leaves :func:`load` returning
``None``; a failure is logged once at WARNING. See docs/performance.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["ENV_VAR", "build_directory", "env_enabled", "load", "load_error"]

_log = logging.getLogger("normlab.functional._fused")

#: Environment variable: ``0`` (or ``false``/``off``/``no``) forces the reference code.
ENV_VAR = "NORMLAB_FUSED"

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("ops.cpp", "bnp.cpp", "module.cpp")
_HEADERS = ("engine.h", "ops.h")
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False
_error: str | None = None


def env_enabled() -> bool:
    """``False`` when ``NORMLAB_FUSED`` is ``0``, ``false``, ``off`` or ``no``."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def _cpu_tag() -> str:
    # -march=native code must not be loaded on another CPU: key the build on its vector flags.
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _digest() -> str:
    h = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        h.update((_CSRC / name).read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(f"{torch.__version__} {sys.version} {_cpu_tag()}".encode())
    return h.hexdigest()[:16]


def build_directory(name: str) -> str | None:
    """Where extension ``name`` is built: ``None`` (torch's choice) when ``TORCH_EXTENSIONS_DIR``
    is set, else a folder under the user's cache."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = cache / "normlab" / "torch_extensions" / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _ninja_dir() -> str | None:
    # The folder of the ninja executable of the `ninja` pip package (a dependency of normlab),
    # for when its scripts folder is not on PATH (a virtual environment that is not activated).
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return None
    folder = getattr(ninja, "BIN_DIR", None)
    return folder if folder and shutil.which("ninja", path=folder) else None


def _missing_tool() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH)"
    if shutil.which("ninja") is None and _ninja_dir() is None:
        return "ninja is not on PATH (pip install ninja)"
    return None


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    # torch's build runs `ninja` from PATH: add the pip package's folder for the build only.
    folder = None if shutil.which("ninja") else _ninja_dir()
    if folder is None:
        yield
        return
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = folder + os.pathsep + before
    try:
        yield
    finally:
        os.environ["PATH"] = before


def load() -> ModuleType | None:
    """The compiled extension, building it on the first call; ``None`` where it cannot be built
    (the reason is :func:`load_error`, logged once at WARNING) or ``NORMLAB_FUSED=0``."""
    global _module, _tried, _error
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            if not env_enabled():
                _error = f"disabled by {ENV_VAR}={os.environ.get(ENV_VAR)!r}"
                _log.info("normlab fused kernels %s; using the reference code", _error)
            else:
                _module = _build()
        except Exception as exc:  # a failed build must never break the layers
            _module = None
            lines = str(exc).strip().splitlines()
            _error = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
        if _module is None and env_enabled():
            _log.warning(
                "normlab's fused CPU kernels are unavailable (%s); batch norm and Full "
                "Normalization use the slower pure-PyTorch reference code",
                _error,
            )
        _tried = True
    return _module


def _build() -> ModuleType | None:
    global _error
    missing = _missing_tool()
    if missing is not None:
        _error = missing
        return None
    from torch.utils import cpp_extension

    name = f"normlab_fused_{_digest()}"
    where = build_directory(name)
    t0 = time.perf_counter()
    _log.info(
        "loading normlab's fused CPU kernels %s (compiled on first use, about a minute)",
        name,
    )
    folder = where or cpp_extension._get_build_directory(name, verbose=False)
    with _ninja_on_path(), _exclusive_build(folder):
        module = cpp_extension.load(
            name=name,
            sources=[str(_CSRC / s) for s in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            extra_include_paths=[str(_CSRC)],
            build_directory=where,
            verbose=False,
        )
    _log.info("normlab fused kernels ready in %.1f s", time.perf_counter() - t0)
    return module


@contextlib.contextmanager
def _exclusive_build(folder: str) -> Iterator[None]:
    """Hold an exclusive OS lock on ``<folder>.normlab-build`` for the build.

    The OS releases the lock when its process dies, so whoever holds it knows that no other
    normlab process is building ``folder``: a ``lock`` file torch's build left there is then
    stale (a killed build) and is removed. Without ``fcntl`` (Windows) nothing is checked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    os.makedirs(folder, exist_ok=True)
    with open(folder.rstrip(os.sep) + ".normlab-build", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            _clear_stale_lock(folder)
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _clear_stale_lock(folder: str) -> bool:
    # Called with the build lock held: torch's `lock` file in `folder` belongs to a dead build.
    stale = Path(folder) / "lock"
    if not stale.exists():
        return False
    _log.warning("removing a stale build lock left by an interrupted build: %s", stale)
    stale.unlink(missing_ok=True)
    return True


def load_error() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` if it has not or it succeeded)."""
    return _error
