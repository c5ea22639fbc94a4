"""The one training loop. It reads top to bottom; scenarios are samplers and transforms.

A run directory holds ``config.json`` (resolved config, seed, versions), ``metrics.jsonl`` (one JSON
record per logged step and per evaluation) and ``checkpoint.pt`` (written atomically). Running
again in the same directory resumes from the checkpoint; the resumed run's metrics equal an
uninterrupted run's (apart from wall-clock times), because the checkpoint holds the model,
optimizer, method hook, sampler position and RNG state, and ``metrics.jsonl`` is cut back to
the checkpoint's offset.

**Distributed.** When ``torch.distributed`` is initialised with more than one rank (by
:mod:`normlab.distributed`'s launcher, torchrun, or the caller), every rank calls :func:`train`
with the same config and the loop runs under ``DistributedDataParallel``: the scenario's sampler
gives each rank its share of every epoch (``batch_size`` per rank), each step's loss is the mean
over the union of the ranks' batches, rank 0 alone writes ``config.json``, ``metrics.jsonl`` and
the checkpoint (with every rank's sampler, hook and RNG state), every rank resumes from it, and
evaluations are sums all-reduced over the ranks' shares of each split, evaluated with rank 0's
model. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from normlab._io import (
    atomic_write_json,
    environment_info,
    load_checkpoint,
    read_jsonl,
    save_checkpoint,
)
from normlab.data import DATASETS, Dataset, get_scenario, load_dataset
from normlab.data.sources import as_source
from normlab.errors import (
    BatchTooSmallError,
    ConfigMismatchError,
    DivergenceError,
    NonFiniteBatchError,
)
from normlab.methods import Method, resolve_method
from normlab.models import MODELS, build_model

__all__ = [
    "OPTIMIZERS",
    "RunResult",
    "TrainConfig",
    "build_model_for",
    "build_optimizer",
    "evaluate",
    "evaluate_batches",
    "check_logger",
    "load_named_data",
    "resolve_device",
    "train",
    "validate_config",
]

OPTIMIZERS = ("sgd", "momentum", "adam")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The device ``name`` stands for (``"auto"``: CUDA if available, else CPU).

    Raises:
        ValueError: an unknown device string, or a device this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} requested but MPS is not available here")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    return device


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults: an MLP on the bundled digits."""

    dataset: str = "digits"  # a name from normlab.data.DATASETS
    data_root: str | None = None  # directory for file-based datasets (mnist, cifar10)
    model: str = "mlp"  # mlp | cnn | resnet
    widths: tuple[int, ...] = (100, 100, 100)  # MLP hidden widths
    activation: str = "relu"  # MLP nonlinearity: relu | sigmoid | tanh
    model_options: dict[str, Any] = field(default_factory=dict)  # more options of the model
    method: str = "bn"  # a name from normlab.methods.METHODS
    scenario: str = "shuffled"  # a name from normlab.data.SCENARIOS
    batch_size: int | None = None  # overrides the scenario's batch size
    k: int | None = None  # overrides k of the k-labels (classes per batch), noniid (per rank)
    scale: tuple[float, float] | None = None  # per-sample random input scaling (lo, hi)
    optimizer: str = "sgd"  # sgd | momentum | adam
    lr: float = 0.1
    momentum: float = 0.9  # used by optimizer="momentum"
    weight_decay: float = 0.0
    epochs: int = 10
    max_steps: int | None = None  # stop early after this many steps (None: all epochs)
    seed: int = 0
    eval_every: int = 0  # also evaluate every this many steps (0: at epoch ends only)
    log_every: int = 1  # write a step record every this many steps (0: none)
    checkpoint_every: int = 0  # also checkpoint every this many steps (0: at epoch ends only)
    eval_batch_size: int = 1000
    eval_train: bool = True  # also evaluate on the training set at each evaluation
    precise_bn: bool = False  # exact population statistics (BN, FN, OnlineNorm) before each eval
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's layers and hook
    holdout: float = 0.0  # > 0: train on the rest, evaluate on this fraction of train ("val_")
    device: str = "auto"  # auto (CUDA if available, else CPU) | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16 (torch.autocast; fp16 with a GradScaler)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class RunResult:
    """What :func:`train` returns: evaluation records, the last one, and the run's size."""

    config: TrainConfig
    evaluations: list[dict[str, Any]]
    steps: int
    seconds: float
    out_dir: Path | None
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def final(self) -> dict[str, Any]:
        return self.evaluations[-1] if self.evaluations else {}


def _positive(name: str, value: Any, kind: type = float, allow_zero: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if ok:
        ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        want = f"{'a non-negative' if allow_zero else 'a positive'} {kind.__name__}"
        raise ValueError(f"TrainConfig.{name} must be {want}, got {value!r}")


def _check_model_options(name: str, options: Any) -> None:
    factory = MODELS[name]
    if not isinstance(options, Mapping):
        raise TypeError(f"TrainConfig.model_options must be a dict, got {type(options).__name__}")
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY]
    valid = [k for k in valid if k not in ("norm_layer", "bias")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"model {name!r} got unknown option(s) {', '.join(unknown)}; valid: "
            f"{', '.join(valid) or 'none'}"
        )


def validate_config(cfg: TrainConfig) -> None:
    """Check names and values of ``cfg`` before anything is built or written.

    Raises:
        TypeError: ``cfg`` is not a :class:`TrainConfig`.
        ValueError: an unknown dataset, model, method, method option, scenario or optimizer
            (the message lists the valid ones), or a value out of range (lr <= 0, batch size < 1,
            ...).
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"expected a TrainConfig, got {type(cfg).__name__}")
    if ":" in cfg.dataset:
        _user_factory(cfg.dataset, "--dataset")
    else:
        DATASETS[cfg.dataset]
    if ":" in cfg.model:
        _user_factory(cfg.model, "--model")
        if cfg.model_options:
            raise ValueError("TrainConfig.model_options apply to registered models only")
    else:
        _check_model_options(cfg.model, cfg.model_options)
    resolve_device(cfg.device)
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}; valid: {', '.join(PRECISIONS)}")
    resolve_method(cfg.method, cfg.method_options)
    _scenario(cfg)
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {cfg.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
        )
    _positive("lr", cfg.lr)
    if (
        isinstance(cfg.holdout, bool)
        or not isinstance(cfg.holdout, (int, float))
        or not (0.0 <= cfg.holdout < 1.0)
    ):
        raise ValueError(f"TrainConfig.holdout must be a float in [0, 1), got {cfg.holdout!r}")
    _positive("momentum", cfg.momentum, allow_zero=True)
    _positive("weight_decay", cfg.weight_decay, allow_zero=True)
    _positive("epochs", cfg.epochs, int, allow_zero=True)
    _positive("eval_batch_size", cfg.eval_batch_size, int)
    for name in ("eval_every", "log_every", "checkpoint_every"):
        _positive(name, getattr(cfg, name), int, allow_zero=True)
    for name in ("batch_size", "k"):
        if getattr(cfg, name) is not None:
            _positive(name, getattr(cfg, name), int)
    if cfg.max_steps is not None:  # 0: evaluate the initial model only
        _positive("max_steps", cfg.max_steps, int, allow_zero=True)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"TrainConfig.seed must be a non-negative int, got {cfg.seed!r}")


def build_model_for(
    model: str,
    input_shape: Sequence[int],
    num_classes: int,
    method: str | Method,
    options: Mapping[str, Any] | None = None,
    **model_options: Any,
) -> nn.Module:
    """Registered model ``model`` with its slots filled by ``method`` (with ``options``) and the
    biases the method asks for."""
    m, resolved = resolve_method(method, options)
    return build_model(
        model, input_shape, num_classes, m.norm_layer(resolved), m.bias, **model_options
    )


def build_optimizer(cfg: TrainConfig, params: Iterable[Any]) -> torch.optim.Optimizer:
    """SGD, SGD with (heavy-ball) momentum, or Adam, from the config."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(
        f"unknown optimizer {cfg.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
    )


def loss_fn_for(task: str) -> Callable[[Tensor, Tensor], Tensor]:
    if task == "regression":
        return lambda out, y: F.mse_loss(out.squeeze(-1), y)
    return F.cross_entropy


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, task: str, batch_size: int = 1000
) -> dict[str, float]:
    """Mean loss (and accuracy for classification) of ``model`` in its current mode."""
    batches = (
        (x[start : start + batch_size], y[start : start + batch_size])
        for start in range(0, len(x), batch_size)
    )
    return evaluate_batches(model, batches, task)


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    task: str,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, float]:
    """Mean loss (and accuracy for classification) of ``model`` over ``(x, y)`` batches."""
    return _eval_means(*_eval_sums(model, batches, task, autocast), task)


def _eval_sums(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    task: str,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> tuple[float, int, int]:
    # (summed loss, correct predictions, samples) of model over the batches.
    loss_fn = loss_fn_for(task)
    total_loss, correct, n = 0.0, 0, 0
    for xb, yb in batches:
        with autocast():
            out = model(xb).float()
        total_loss += float(loss_fn(out, yb)) * len(xb)
        if task == "classification":
            correct += int((out.argmax(-1) == yb).sum())
        n += len(xb)
    return total_loss, correct, n


def _eval_means(total_loss: float, correct: float, n: float, task: str) -> dict[str, float]:
    # evaluate_batches' result from the sums of _eval_sums.
    result = {"loss": total_loss / n}
    if task == "classification":
        result["acc"] = correct / n
    return result


def _scenario(cfg: TrainConfig):
    overrides = {
        key: value
        for key, value in (("batch_size", cfg.batch_size), ("k", cfg.k), ("scale", cfg.scale))
        if value is not None
    }
    return get_scenario(cfg.scenario, **overrides)


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


LOGGERS = ("csv", "tensorboard")


def check_logger(logger: str | None) -> None:
    """``ValueError`` unless ``logger`` is None or a usable one of :data:`LOGGERS`."""
    if logger is None:
        return
    if logger not in LOGGERS:
        raise ValueError(f"unknown logger {logger!r}; valid: {', '.join(LOGGERS)}")
    if logger == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError(
                "logger 'tensorboard' needs the tensorboard package (pip install tensorboard)"
            ) from None


class _MetricsLog:
    """Append-only JSON lines; ``offset`` is recorded in checkpoints to cut back on resume.

    ``logger`` mirrors every record for live curves: ``"csv"`` appends ``kind,step,key,value``
    rows to ``metrics.csv``; ``"tensorboard"`` writes scalars under ``tensorboard/``.
    ``metrics.jsonl`` stays the record of the run (the mirrors are not cut back on resume)."""

    def __init__(self, path: Path | None, offset: int | None, logger: str | None = None) -> None:
        self.path = path
        self._csv: Path | None = None
        self._tb: Any = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                f.truncate(offset if offset is not None else 0)
            if logger == "csv":
                self._csv = path.with_name("metrics.csv")
                if not self._csv.exists():
                    self._csv.write_text("kind,step,key,value\n")
            elif logger == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = {
            k: v
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step",)
        }
        if self._csv is not None:
            with open(self._csv, "a") as f:
                for key, value in scalars.items():
                    f.write(f"{record.get('kind', '')},{record.get('step', '')},{key},{value}\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{record.get('kind', '')}/{key}", value, record.get("step", 0))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    @property
    def offset(self) -> int:
        return self.path.stat().st_size if self.path is not None and self.path.exists() else 0


@contextlib.contextmanager
def _progress(total: int, enabled: bool, desc: str) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, position=1)
    try:
        yield bar
    finally:
        bar.close()


def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    model: nn.Module | None = None,
    data: Any = None,
    dataset: Dataset | None = None,
    progress: bool = False,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    on_eval: Callable[[nn.Module, dict[str, Any]], Mapping[str, Any] | None] | None = None,
    logger: str | None = None,
) -> RunResult:
    """Train ``cfg.model`` normalized by ``cfg.method`` under ``cfg.scenario``.

    Args:
        cfg: the run's configuration.
        out_dir: run directory (config, metrics, checkpoint); ``None`` keeps everything in memory.
            An existing checkpoint there is resumed from.
        model: the user's own model (any ``nn.Module``) instead of ``cfg.model``: its
            normalization layers are converted to ``cfg.method`` in place
            (:func:`normlab.convert`), its other layers are left as they are.
        data: the user's own data instead of ``cfg.dataset``: a normlab
            :class:`~normlab.data.Dataset`, or a ``(train, test)`` pair of
            ``torch.utils.data.Dataset`` objects or ``DataLoader`` objects (their datasets are
            read sample by sample in the scenario's batches; labels are read once up front).
        dataset: the former name of ``data`` for a normlab Dataset.
        progress: show a tqdm progress bar (the CLI turns it on for terminals).
        on_step: called as ``on_step(step, record)`` after every step (for tests and callers).
        on_eval: called as ``on_eval(model, record)`` at every evaluation, with the model in eval
            mode and the method hook paused; the mapping it returns is merged into the record
            (so extra measurements are saved in ``metrics.jsonl`` and survive a resume).
        logger: also mirror the metrics for live curves: ``"csv"`` (``metrics.csv``) or
            ``"tensorboard"`` (``tensorboard/``; needs the tensorboard package).

    Returns:
        :class:`RunResult` with every evaluation record.

    The caller's global RNG state is the same after the call as before it.

    Distributed (``torch.distributed`` initialised with more than one rank): every rank of the
    default group must call ``train`` with the same ``cfg`` and ``out_dir`` (a directory every
    rank can read). The model (built on every rank from ``cfg.seed``) is wrapped in
    ``DistributedDataParallel`` with torch's defaults (gradients averaged, buffers broadcast
    from rank 0 at each forward); on CUDA each rank uses its current device. Each rank trains on
    its own batches (:meth:`normlab.data.Scenario.make_sampler` with its rank), scaled so that
    the gradient is that of the mean loss over the union of the ranks' batches; step records
    hold that union's loss and accuracy. Rank 0 writes the run directory; every rank resumes
    from its checkpoint, which must have been written with the same number of ranks.
    Evaluations use rank 0's parameters and buffers on every rank, each rank evaluating every
    ``W``-th batch of a split, with the sums all-reduced. ``on_step`` and ``on_eval`` run on
    every rank (``on_eval`` with the rank's own buffers, and it may issue collectives; rank 0's
    mapping is written). A batch too small on one rank raises ``BatchTooSmallError`` on every
    rank; any other failure of one rank makes its peers fail within the process group's
    timeout.

    Raises:
        ValueError/TypeError: a bad config (:func:`validate_config`), before anything is written.
        normlab.errors.BatchTooSmallError: a batch-dependent method got batches of one sample.
        normlab.errors.DivergenceError: the loss became NaN or infinite.
        normlab.errors.CheckpointError: the run directory's checkpoint is corrupt or unreadable.
        normlab.errors.ConfigMismatchError: the run directory's checkpoint was written by a run
            with a different config or number of ranks.
        Anything else a layer raises (a bug or bad input) propagates unchanged. After a failure
        the run directory holds the last good checkpoint.
    """
    validate_config(cfg)
    check_logger(logger)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        return _train(
            cfg,
            out_dir,
            model,
            data if data is not None else dataset,
            progress,
            on_step,
            on_eval,
            logger,
        )


# torch's BatchNorm raises a plain ValueError at batch size 1; this is its message.
_TORCH_BN_TOO_SMALL = "Expected more than 1 value per channel when training"


def _user_factory(spec: str, what: str) -> Callable[..., Any]:
    """``package.module:name`` -> the object it names (a model or dataset factory)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{what} {spec!r}: cannot import it ({exc})") from None
    if not callable(factory):
        raise ValueError(f"{what} {spec!r} is not callable")
    return factory


def _build(cfg, method, options, source, model):
    num_outputs = source.num_classes if source.task == "classification" else 1
    if model is None and ":" in cfg.model:
        model = _user_factory(cfg.model, "--model")(source.input_shape, num_outputs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"--model {cfg.model!r} returned {type(model).__name__}, not a Module")
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        from normlab.methods import convert

        return convert(model, method, options)
    model_options: dict[str, Any] = {}
    if cfg.model == "mlp":
        model_options = {"widths": cfg.widths, "activation": cfg.activation}
    model_options.update(cfg.model_options)
    return build_model_for(
        cfg.model, source.input_shape, num_outputs, method, options, **model_options
    )


def load_named_data(name: str, root: str | None = None, seed: int = 0) -> Any:
    """The data ``TrainConfig.dataset`` names: a registered dataset, or ``package.module:factory``
    called as ``factory(root=root, seed=seed)``, which returns a normlab
    :class:`~normlab.data.Dataset` or a ``(train, test)`` pair of torch Datasets/DataLoaders."""
    if ":" in name:
        return _user_factory(name, "--dataset")(root=root, seed=seed)
    return load_dataset(name, root=root, seed=seed)


def _holdout(cfg: TrainConfig, data: Any) -> Any:
    if not cfg.holdout:
        return data
    if not isinstance(data, Dataset):
        raise TypeError(
            "TrainConfig.holdout needs a normlab Dataset; carve the validation split from "
            f"streamed data yourself (got {type(data).__name__})"
        )
    return data.holdout(cfg.holdout, cfg.seed)


def _load_data(cfg: TrainConfig, data: Any) -> Any:
    return data if data is not None else load_named_data(cfg.dataset, cfg.data_root, cfg.seed)


def _rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when none is
    initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device(device: torch.device) -> torch.device:
    # Small control tensors (step totals, evaluation sums) live where the backend reduces them.
    return device if device.type == "cuda" else torch.device("cpu")


def _forward_synced(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_of: Callable[[Tensor], Tensor],
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    task: str,
    world: int,
    device: torch.device,
) -> tuple[Tensor, Tensor, float, float]:
    """One distributed training forward: ``(output, loss to backpropagate, union loss, union
    accuracy)``; ``loss_of(output)`` is this rank's mean loss. The step's totals (loss sum,
    correct, samples, too-small flag) are all-reduced in one collective, so a failure or a
    non-finite loss is seen by every rank; the local mean loss is scaled by ``W n_r / N`` so that
    DDP's averaged gradient is that of the union's mean loss (a factor of exactly 1 for equal
    batches)."""
    failure: ValueError | None = None
    out_batch = loss = None
    with autocast():
        try:
            out_batch = net(x)
        except ValueError as exc:
            if not (isinstance(exc, BatchTooSmallError) or _TORCH_BN_TOO_SMALL in str(exc)):
                raise
            failure = exc
        else:
            loss = loss_of(out_batch)
    n = len(x)
    totals = [0.0, 0.0, float(n), 1.0 if failure is not None else 0.0]
    if loss is not None:
        totals[0] = loss.item() * n
        if task == "classification":
            totals[1] = float((out_batch.argmax(-1) == y).sum())
    reduced = torch.tensor(totals, dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(reduced)
    loss_sum, correct, count, failed = reduced.tolist()
    if failed or failure is not None:
        message = str(failure) if failure is not None else "a batch too small on another rank"
        raise BatchTooSmallError(f"{message} ({int(failed)} of {world} ranks)") from failure
    assert out_batch is not None and loss is not None
    return out_batch, loss * (world * n / count), loss_sum / count, correct / count


@torch.no_grad()
def _evaluate_shard(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    task: str,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    rank: int,
    world: int,
    device: torch.device,
) -> dict[str, float]:
    """:func:`evaluate_batches` over the ranks: this rank evaluates batches ``rank, rank + W,
    ...``; the sums are all-reduced, so every rank returns the same means."""
    shard = (batch for i, batch in enumerate(batches) if i % world == rank)
    total_loss, correct, n = _eval_sums(model, shard, task, autocast)
    sums = torch.tensor([total_loss, correct, n], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(sums)
    return _eval_means(*sums.tolist(), task)


def _gather_states(state: dict[str, Any], rank: int, world: int) -> list[Any] | None:
    """Every rank's ``state`` on rank 0 (rank order), ``None`` elsewhere."""
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(state, gathered, dst=0)
    return gathered


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _train(cfg, out_dir, user_model, data, progress, on_step, on_eval, logger=None) -> RunResult:
    out = Path(out_dir) if out_dir is not None else None
    method, options = resolve_method(cfg.method, cfg.method_options)
    scenario = _scenario(cfg)
    device = resolve_device(cfg.device)
    amp_dtype = PRECISIONS[cfg.precision]
    rank, world = _rank_world()
    distributed = world > 1
    if distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    # Data, model, optimizer, method hook, sampler: all seeded from cfg.seed.
    torch.manual_seed(cfg.seed)
    source = as_source(_holdout(cfg, _load_data(cfg, data)), scenario, cfg.seed, device)
    model = _build(cfg, method, options, source, user_model).to(device)
    optimizer = build_optimizer(cfg, model.parameters())
    hook = method.training_hook(model, options)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    sampler = scenario.make_sampler(source.labels, cfg.seed, rank=rank, world_size=world)
    sampler.set_epoch(0)
    loss_fn = loss_fn_for(source.task)

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    step, epoch, elapsed, evaluations, offset = 0, 0, 0.0, [], None
    ckpt_path = out / "checkpoint.pt" if out is not None else None
    config = _config_dict(cfg)
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        if ckpt.get("config") != config:
            old = ckpt.get("config") or {}
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ConfigMismatchError(
                f"{out} holds a checkpoint of a run with a different config "
                f"(differs in: {', '.join(diff)}); use another directory or start over "
                "with --fresh"
            )
        if ckpt.get("world_size", 1) != world:
            raise ConfigMismatchError(
                f"{out} holds a checkpoint of a run on {ckpt.get('world_size', 1)} process(es), "
                f"this run has {world}; resume with the same number of processes or start over "
                "with --fresh"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        own = ckpt["ranks"][rank] if distributed else ckpt  # this rank's sampler, hook, RNG
        if hook is not None:
            hook.load_state_dict(own["hook"])
        sampler.load_state_dict(own["sampler"])
        torch.set_rng_state(own["rng"].cpu())
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, epoch, elapsed = ckpt["step"], ckpt["epoch"], ckpt["elapsed"]
        evaluations, offset = ckpt["evaluations"], ckpt["metrics_offset"]
        log.info("resuming %s at epoch %d, step %d", out, epoch, step)
    elif out is not None and rank == 0:
        info = {"config": config, "seed": cfg.seed, "environment": environment_info()}
        if distributed:
            info["world_size"] = world
        atomic_write_json(out / "config.json", info)
    writes = out is not None and rank == 0
    metrics = _MetricsLog(out / "metrics.jsonl" if writes else None, offset, logger)
    net = _wrap_ddp(model, device) if distributed else model

    skipped_seen = [0]

    def run_evaluation() -> dict[str, Any]:
        if cfg.precise_bn:
            from normlab.nn.stats import recompute_statistics

            batches = [x for x, _ in source.batches("train", cfg.eval_batch_size)]
            with hook.paused() if hook is not None else contextlib.nullcontext():
                recompute_statistics(model, batches)
        model.eval()
        with hook.paused() if hook is not None else contextlib.nullcontext():
            record: dict[str, Any] = {"kind": "eval", "step": step, "epoch": epoch, "time": elapsed}
            own_buffers = []
            if distributed:  # evaluate rank 0's model everywhere, then restore the rank's own
                own_buffers = [b.detach().clone() for b in model.buffers()]
                for b in model.buffers():
                    dist.broadcast(b, src=0)
            for split in ("test", "train") if cfg.eval_train else ("test",):
                batches = source.batches(split, cfg.eval_batch_size)
                if distributed:
                    values = _evaluate_shard(
                        model, batches, source.task, autocast, rank, world, device
                    )
                else:
                    values = evaluate_batches(model, batches, source.task, autocast)
                name = "val" if split == "test" and cfg.holdout else split
                for key, value in values.items():
                    record[f"{name}_{key}"] = value
            with torch.no_grad():
                for b, saved in zip(model.buffers(), own_buffers, strict=False):
                    b.copy_(saved)
            if on_eval is not None:
                record.update(on_eval(model, record) or {})
            skipped = sum(int(getattr(m, "non_finite_batches", 0)) for m in model.modules())
            if skipped:  # accelerators skip non-finite batches on the device without a host read
                record["non_finite_batches"] = skipped
                if skipped > skipped_seen[0]:
                    log.warning(
                        "%d training batches with non-finite statistics were skipped by the "
                        "normalization layers by step %d",
                        skipped,
                        step,
                    )
                    skipped_seen[0] = skipped
        model.train()
        metrics.write(record)
        evaluations.append(record)
        return record

    def checkpoint() -> None:
        if ckpt_path is None:
            return
        own = {
            "hook": hook.state_dict() if hook is not None else None,
            "sampler": sampler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        ranks = _gather_states(own, rank, world) if distributed else None
        if rank != 0:
            return
        state = {
            "config": config,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            **own,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "epoch": epoch,
            "elapsed": elapsed,
            "evaluations": evaluations,
            "metrics_offset": metrics.offset,
        }
        if distributed:
            state.update(world_size=world, ranks=ranks)
        save_checkpoint(state, ckpt_path)

    total_steps = cfg.epochs * len(sampler)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    done = lambda: epoch >= cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)  # noqa: E731
    model.train()
    try:
        with _progress(total_steps, progress and rank == 0, f"{cfg.method}/{scenario.name}") as bar:
            if bar is not None:
                bar.update(step)
            while not done():
                for idx in sampler:
                    t0 = time.perf_counter()
                    x, y = source.train_batch(idx)
                    if distributed:
                        out_batch, loss, union_loss, union_acc = _forward_synced(
                            net,
                            x,
                            y,
                            lambda out, y=y: loss_fn(out.float(), y),
                            autocast,
                            source.task,
                            world,
                            device,
                        )
                    else:
                        with autocast():
                            try:
                                out_batch = model(x)
                            except NonFiniteBatchError as exc:
                                if torch.is_tensor(x) and bool(torch.isfinite(x).all()):
                                    raise DivergenceError(
                                        f"activations became non-finite at step {step + 1} "
                                        f"(method {cfg.method}, lr {cfg.lr}): {exc}"
                                    ) from exc
                                raise
                            except ValueError as exc:
                                if _TORCH_BN_TOO_SMALL in str(exc):
                                    raise BatchTooSmallError(str(exc)) from exc
                                raise
                            loss = loss_fn(out_batch.float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is None:
                        loss.backward()
                        if hook is not None:
                            hook.before_step()
                        optimizer.step()
                    else:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)  # the hook works on the true gradients
                        if hook is not None:
                            hook.before_step()
                        scaler.step(optimizer)
                        scaler.update()
                    elapsed += time.perf_counter() - t0
                    step += 1
                    record = {
                        "kind": "step",
                        "step": step,
                        "epoch": epoch,
                        "loss": union_loss if distributed else loss.item(),
                        "time": elapsed,
                    }
                    if source.task == "classification":
                        record["acc"] = (
                            union_acc
                            if distributed
                            else (out_batch.argmax(-1) == y).float().mean().item()
                        )
                    if not math.isfinite(record["loss"]):
                        raise DivergenceError(
                            f"loss became {record['loss']} at step {step} "
                            f"(method {cfg.method}, lr {cfg.lr})"
                        )
                    if cfg.log_every and step % cfg.log_every == 0:
                        metrics.write(record)
                    if cfg.eval_every and step % cfg.eval_every == 0:
                        run_evaluation()
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                        checkpoint()
                    if bar is not None:
                        bar.update(1)
                        if step % 10 == 0:
                            bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
                    if on_step is not None:
                        on_step(step, record)
                    if cfg.max_steps is not None and step >= cfg.max_steps:
                        break
                else:  # the epoch ran to its end
                    epoch += 1
                    sampler.set_epoch(epoch)
                    if not (cfg.eval_every and step % cfg.eval_every == 0):
                        run_evaluation()
                    checkpoint()
                    continue
                break  # max_steps reached inside the epoch
            if not evaluations or evaluations[-1]["step"] != step:
                run_evaluation()
                checkpoint()
    finally:
        metrics.close()
        if hook is not None:
            hook.remove()
    return RunResult(cfg, evaluations, step, elapsed, out, model)


def load_run(run_dir: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(config.json contents, metrics records)`` of a run directory."""
    run = Path(run_dir)
    config_path = run / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{run} is not a run directory: {config_path} is missing")
    return json.loads(config_path.read_text()), read_jsonl(run / "metrics.jsonl")
