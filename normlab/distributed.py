"""Running normlab on several processes: the launcher, joining torchrun, and rank helpers.

:func:`launch` runs a function on ``nproc`` local processes (``torch.multiprocessing`` spawn),
joined in one process group by a ``file://`` rendezvous in a temporary directory: gloo on CPU,
nccl on CUDA (one GPU per rank; gloo with CUDA tensors when there are fewer GPUs than ranks).
Every rank calls the function; :func:`normlab.train.train` then runs under
``DistributedDataParallel`` (see docs/distributed.md).

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` in the environment, multi-node included) normlab
joins the group torchrun set up instead of spawning (:func:`join_torchrun`, ``env://``). The
command line's rank 0 then runs the experiment and hands each batch of training runs to the
other ranks (:func:`run_on_all_ranks`), which wait for it in :func:`follow`.

Failure: a rank that raises, dies or stops answering makes the run fail, never hang. The
launcher stops every rank as soon as one exits with an error and raises
:class:`DistributedError`; a rank that hangs makes its peers' next collective fail after the
process group's timeout (``timeout``, the command line's ``--dist-timeout``, default
:data:`DEFAULT_TIMEOUT` seconds), which ends the run the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normlab.train import resolve_device

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedError",
    "backend_for",
    "follow",
    "is_main_process",
    "exit_quietly",
    "join_torchrun",
    "launch",
    "launched_by_torchrun",
    "leading",
    "rank",
    "run_on_all_ranks",
    "threads_per_process",
    "world_size",
]

log = logging.getLogger(__name__)

#: Seconds a collective waits for a silent peer before it fails (the process group's timeout).
DEFAULT_TIMEOUT = 300.0


class DistributedError(RuntimeError):
    """A distributed run failed: a rank raised, was killed, or timed out waiting for a peer.
    The message names the rank and its error; ``tracebacks`` holds the ranks' tracebacks."""

    def __init__(self, message: str, tracebacks: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.tracebacks = tracebacks or {}


def rank() -> int:
    """This process's rank in the default group (0 when none is initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the default group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (the one that writes), or the only one."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another ``env://`` launcher) started this process: ``RANK`` and
    ``WORLD_SIZE`` are set in the environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _check_timeout(timeout: Any) -> float:
    ok = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
    if not ok or timeout != timeout or timeout == float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def backend_for(device: str, nproc: int) -> str:
    """The process-group backend for ``nproc`` local ranks training on ``device``: ``"nccl"``
    for CUDA with a GPU per rank, ``"gloo"`` otherwise (CPU, or CUDA tensors when several
    ranks share a GPU, which nccl refuses).

    Raises:
        ValueError: an unknown or unavailable device (:func:`normlab.train.resolve_device`).
    """
    kind = resolve_device(device).type
    if kind == "cuda" and dist.is_nccl_available() and nproc <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


def _set_cuda_device(device: str, local_rank: int) -> None:
    if resolve_device(device).type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def join_torchrun(device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> None:
    """Join the process group of a torchrun launch (``env://``), unless one is initialised.

    Selects ``cuda:LOCAL_RANK`` (modulo the GPUs present) when ``device`` is CUDA.

    Raises:
        ValueError: not launched by torchrun, or a bad ``device`` / ``timeout``.
    """
    timeout = _check_timeout(timeout)
    if not launched_by_torchrun():
        raise ValueError("join_torchrun: RANK and WORLD_SIZE are not set (not under torchrun)")
    if dist.is_initialized():
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    _set_cuda_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend_for(device, local_world),
        init_method="env://",
        timeout=datetime.timedelta(seconds=timeout),
    )
    log.info("joined torchrun group as rank %d of %d", dist.get_rank(), dist.get_world_size())


# ---- the leader/follower protocol of a torchrun command line --------------------------------

_STOP = "stop"


def run_on_all_ranks(fn: Callable[..., Any], *args: Any) -> Any:
    """On rank 0 of a group whose other ranks wait in :func:`follow`: send ``fn`` and ``args``
    (pickled: module-level functions and plain data) to every rank, run ``fn(*args)`` here too,
    and return this rank's result. Without a group of several ranks, just ``fn(*args)``."""
    if world_size() > 1:
        if rank() != 0:
            raise RuntimeError("run_on_all_ranks is called on rank 0; the others follow()")
        dist.broadcast_object_list([(fn, args)], src=0)
    return fn(*args)


def follow() -> int:
    """On a rank other than 0: run every ``fn(*args)`` that rank 0 sends with
    :func:`run_on_all_ranks`, until rank 0 leaves :func:`leading`; return 0. A stop message
    carrying rank 0's error raises :class:`DistributedError`."""
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0][0] == _STOP:
            if message[0][1]:
                raise DistributedError(f"rank 0 failed: {message[0][1]}")
            return 0
        fn, args = message[0]
        fn(*args)


@contextlib.contextmanager
def leading() -> Iterator[None]:
    """On rank 0 of a group whose other ranks :func:`follow`: on leaving, tell them to stop
    (with rank 0's error, if it raised). Does nothing without a group of several ranks."""
    if world_size() <= 1:
        yield
        return
    error = ""
    try:
        yield
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise
    finally:
        with contextlib.suppress(Exception):  # a broken group: the followers time out instead
            dist.broadcast_object_list([(_STOP, error)], src=0)


# ---- the local launcher ---------------------------------------------------------------------


def threads_per_process(nproc: int) -> int:
    """Torch threads for each of ``nproc`` processes sharing this machine: the current count
    where ``OMP_NUM_THREADS`` sets it, else the CPU count divided among the processes (at least
    1), so that the processes together do not oversubscribe the cores."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) // nproc)


def _worker(
    local_rank: int,
    fn: Callable[..., Any],
    nproc: int,
    init_method: str,
    backend: str,
    device: str,
    timeout: float,
    log_level: int,
    threads: int,
    result_dir: str,
    args: tuple[Any, ...],
) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    logging.basicConfig(format=f"%(levelname)s rank {local_rank} %(name)s: %(message)s")
    logging.getLogger("normlab").setLevel(log_level)
    torch.set_num_threads(threads)
    _set_cuda_device(device, local_rank)
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=local_rank,
        world_size=nproc,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        result = fn(*args)
        if local_rank == 0:
            torch.save(result, os.path.join(result_dir, "result.pt"))
    except BaseException:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        raise
    exit_quietly(0)


def exit_quietly(status: int) -> None:
    """Leave the process group together with the other ranks and end the process without
    interpreter finalization.

    Gloo's worker threads can still hold tensors when Python tears itself down; destroying them
    then aborts the process ("terminate called without an active exception", SIGABRT) although
    all work is done. Every rank passes a barrier, destroys the group, flushes its output and
    leaves with ``os._exit``.
    """
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(status)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def launch(
    fn: Callable[..., Any],
    nproc: int,
    *args: Any,
    device: str = "auto",
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """Run ``fn(*args)`` on ``nproc`` local processes joined in one process group; return rank
    0's result.

    Each process is spawned (``torch.multiprocessing``, start method ``spawn``), sets ``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, uses ``max(1, cpus // nproc)`` threads (unless
    ``OMP_NUM_THREADS`` is set), selects its GPU for CUDA, joins the group (backend
    :func:`backend_for`, ``file://`` rendezvous in a temporary directory, collectives timing
    out after ``timeout`` seconds), calls ``fn(*args)`` and leaves the group. ``fn`` and
    ``args`` are pickled: ``fn`` must be a module-level function of an importable module, and
    rank 0's result must be picklable. Logging of the ``normlab`` logger keeps this process's
    level.

    Raises:
        ValueError: ``nproc`` is not an int >= 1, a bad ``timeout`` or ``device``.
        DistributedError: a rank raised (the message holds its exception), was killed by a
            signal, or exited early; every other rank is stopped first. A rank that hangs
            makes a peer's collective fail after ``timeout`` seconds, which is reported the
            same way.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    timeout = _check_timeout(timeout)
    backend = backend_for(device, nproc)
    threads = threads_per_process(nproc)
    level = logging.getLogger("normlab").getEffectiveLevel()
    with tempfile.TemporaryDirectory(prefix="normlab-dist-") as tmp:
        init_method = Path(tmp, "store").resolve().as_uri()
        log.info("launching %d %s processes (timeout %g s)", nproc, backend, timeout)
        started = time.monotonic()
        context = mp.start_processes(
            _worker,
            args=(fn, nproc, init_method, backend, device, timeout, level, threads, tmp, args),
            nprocs=nproc,
            join=False,
            start_method="spawn",
        )
        try:
            while not context.join():
                pass
        except mp.ProcessRaisedException as exc:
            raise _raised(exc, timeout, started) from None
        except mp.ProcessExitedException as exc:
            how = (
                f"was killed by {exc.signal_name or _signal_name(-exc.exit_code)}"
                if exc.exit_code < 0
                else f"exited with status {exc.exit_code} before finishing"
            )
            raise DistributedError(
                f"rank {exc.error_index} {how}; the other ranks were stopped"
            ) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
        result_path = Path(tmp, "result.pt")
        return torch.load(result_path, weights_only=False) if result_path.exists() else None


def _raised(exc: mp.ProcessRaisedException, timeout: float, started: float) -> DistributedError:
    text = str(exc)
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "unknown error"
    message = f"rank {exc.error_index} failed: {last}"
    if "timed out" in text.lower() or "timeout" in last.lower():
        message += (
            f" (a peer did not answer within the process group's timeout, {timeout:g} s; "
            "set it with --dist-timeout)"
        )
    log.info(
        "rank %d traceback after %.1f s:\n%s", exc.error_index, time.monotonic() - started, text
    )
    return DistributedError(message + "; the other ranks were stopped", {exc.error_index: text})
