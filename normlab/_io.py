"""Atomic file writes and run-directory metadata (write to a temporary file, then rename)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from normlab.errors import CheckpointError

__all__ = [
    "atomic_save",
    "atomic_write_json",
    "atomic_write_text",
    "environment_info",
    "load_checkpoint",
    "read_jsonl",
    "save_checkpoint",
]


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    _atomic(Path(path), lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename."""
    _atomic(Path(path), lambda f: torch.save(obj, f))


def _sha256_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` atomically, with its SHA-256 in ``<path>.sha256`` beside it."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    _atomic(path, lambda f: f.write(data))
    atomic_write_text(_sha256_path(path), hashlib.sha256(data).hexdigest() + "\n")


def load_checkpoint(path: str | os.PathLike, map_location: Any = None) -> Any:
    """Load a checkpoint written by :func:`save_checkpoint`, verifying its checksum, with
    ``torch.load(..., weights_only=True)``.

    Raises:
        CheckpointError: a missing or wrong checksum, or a file torch cannot read. The message
            names the file and the way out (``--fresh``).
    """
    path = Path(path)
    hint = "start over with --fresh (or delete it)"
    try:
        data = path.read_bytes()
        expected = _sha256_path(path).read_text().strip()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({exc}); {hint}") from exc
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch); {hint}")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot load checkpoint {path} ({first}); {hint}") from exc


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (a missing file has none)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info() -> dict[str, Any]:
    """Versions and machine facts recorded with every run."""
    import numpy

    from normlab._version import __version__

    return {
        "normlab": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "git_sha": _git_sha(),
    }
