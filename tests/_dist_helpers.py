"""Run a function in N CPU processes joined by a gloo process group, for distributed tests.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes (torch.multiprocessing,
``spawn``), each of which initialises gloo with ``init_method="file://<tmpdir>/store"``, calls
``fn(rank, world_size, *args)`` and saves its return value with ``torch.save``; the parent returns
the values in rank order. ``fn`` must be a module-level function of an importable module (a test
module is: the children inherit ``sys.path``). A worker that raises fails the call with its
traceback; a run that exceeds ``timeout`` seconds is killed and raises ``TimeoutError``, and the
process group's own timeout makes a collective that a peer never joins fail instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normlab.distributed import exit_quietly

__all__ = ["run_distributed"]


def _worker(
    rank: int, fn: Callable[..., Any], world_size: int, tmpdir: str, timeout: float, args: tuple
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmpdir}/store",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(tmpdir, f"result{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    # barrier, destroy, and no interpreter finalization (gloo's threads can abort it)
    exit_quietly(0)


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0
) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own process
    of a gloo group of ``world_size``; see the module docstring."""
    with tempfile.TemporaryDirectory() as tmpdir:
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, tmpdir, timeout / 2, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(deadline - time.monotonic(), 0.01)):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"distributed run of {fn.__name__} exceeded {timeout} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        return [
            torch.load(os.path.join(tmpdir, f"result{rank}.pt"), weights_only=False)
            for rank in range(world_size)
        ]
