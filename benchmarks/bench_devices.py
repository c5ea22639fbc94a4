"""normlab's layers against torch's native BatchNorm on a device (CUDA, or the CPU), fp32 and bf16.

Command (from the repository root)::

    python benchmarks/bench_devices.py --device cuda

For each shape, forward + backward of torch's ``nn.BatchNorm``, normlab's ``BatchNorm`` and
normlab's ``FullNorm`` (default estimator), training mode, timed with the device synchronized,
in one process, interleaved (the order rotates every repeat), median over repeats; ratios to
torch side by side, and the peak memory a forward + backward allocates (CUDA only, beyond the
input). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import normlab

SHAPES = [(256, 1024), (1024, 100), (64, 64, 32, 32), (8, 256, 14, 14), (64, 256, 56, 56)]


def _layers(shape: tuple[int, ...], device: torch.device) -> dict[str, nn.Module]:
    c, kind = shape[1], len(shape) - 2 or 1
    torch_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[kind]
    ours = {1: normlab.nn.BatchNorm1d, 2: normlab.nn.BatchNorm2d}[kind]
    fn = {1: normlab.nn.FullNorm1d, 2: normlab.nn.FullNorm2d}[kind]
    return {
        "torch": torch_cls(c).to(device),
        "normlab bn": ours(c).to(device),
        "normlab fn": fn(c).to(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, dtype, steps: int) -> float:
    device = x.device
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            y = layer(x)
        y.backward(g)
        x.grad = None
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _peak(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, dtype) -> float | None:
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    base = torch.cuda.memory_allocated(x.device)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        y = layer(x)
    y.backward(g)
    x.grad = None
    torch.cuda.synchronize(x.device)
    return (torch.cuda.max_memory_allocated(x.device) - base) / x.nelement() / x.element_size()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"## {name}, torch {torch.__version__}: forward + backward, training mode\n")
    print(
        "| shape | precision | torch ms | normlab bn / torch | normlab fn / torch | "
        "peak memory (x input): torch / bn / fn |"
    )
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        for precision in args.precisions:
            dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
            x = torch.randn(*shape, device=device).requires_grad_(True)
            g = torch.randn(*shape, device=device)
            if dtype is not None:
                g = g.to(dtype)
            layers = _layers(shape, device)
            times: dict[str, list[float]] = {k: [] for k in layers}
            for layer in layers.values():  # warm-up
                _time(layer, x, g, dtype, 3)
            names = list(layers)
            for r in range(args.repeats):
                for k in names[r % len(names) :] + names[: r % len(names)]:
                    times[k].append(_time(layers[k], x, g, dtype, args.steps))
            med = {k: statistics.median(v) for k, v in times.items()}
            peaks = [_peak(layers[k], x, g, dtype) for k in names]
            peak_text = " / ".join("-" if p is None else f"{p:.2f}" for p in peaks)
            print(
                f"| {tuple(shape)} | {precision} | {med['torch'] * 1e3:.3f} | "
                f"{med['normlab bn'] / med['torch']:.2f} | {med['normlab fn'] / med['torch']:.2f} "
                f"| {peak_text} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
