"""normlab's layers against torch's native BatchNorm on a device (CUDA, or the CPU), fp32 and bf16.

Command (from the repository root)::

    python benchmarks/bench_devices.py --device cuda

For each shape, forward + backward of torch's ``nn.BatchNorm``, normlab's ``BatchNorm`` and
normlab's ``FullNorm`` (default estimator), training mode, timed with the device synchronized,
in one process, interleaved (the order rotates every repeat), median over repeats; ratios to
torch side by side, and the peak memory a forward + backward allocates (CUDA only, beyond the
input). Prints a Markdown table.

``--fused`` instead times normlab's fused kernels (Triton on CUDA, C++ on CPU) against torch's
native layer and normlab's pure-PyTorch reference (``NORMLAB_FUSED`` off for that column), on
the layer's training forward + backward, with real bf16 inputs for bf16 (the layers' parameters
and buffers in float32, as in mixed-precision training)::

    python benchmarks/bench_devices.py --device cuda --fused
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import normlab
from normlab.functional import _fused

SHAPES = [(256, 1024), (1024, 100), (64, 64, 32, 32), (8, 256, 14, 14), (64, 256, 56, 56)]
FUSED_SHAPES = [(256, 1024), (1024, 100), (64, 64, 32, 32), (8, 256, 14, 14)]


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


def _step_fn(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, fused: bool | None):
    # One training forward + backward; fused None: the layer's own path (torch's layer).
    def step() -> None:
        if fused is None:
            y = layer(x)
        else:
            with _fused.use(fused):
                y = layer(x)
        y.backward(g)
        x.grad = None

    return step


def _time_fn(step, device: torch.device, steps: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def fused_table(device: torch.device, precisions: list[str], repeats: int, steps: int) -> None:
    """Markdown table: torch's layer, normlab's fused layer and normlab's reference, forward +
    backward in training mode, interleaved repeats (the order rotates), medians."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    kind = "Triton" if device.type == "cuda" else "C++"
    print(f"## {name}, torch {torch.__version__}: normlab fused ({kind}) vs torch native BN\n")
    print(f"{repeats} interleaved repeats of {steps} steps each, medians; forward + backward.\n")
    print("| shape | precision | torch ms | fused ms | fused / torch | reference / torch |")
    print("|---|---|---|---|---|---|")
    for shape in FUSED_SHAPES:
        for precision in precisions:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(*shape, device=device, generator=gen).to(dtype).requires_grad_(True)
            g = torch.randn(*shape, device=device, generator=gen).to(dtype)
            layers = _layers(shape, device)
            steps_fn = {
                "torch": _step_fn(layers["torch"], x, g, None),
                "fused": _step_fn(layers["normlab bn"], x, g, True),
                "reference": _step_fn(layers["normlab bn"], x, g, False),
            }
            for step in steps_fn.values():  # warm-up (and Triton's compilation)
                _time_fn(step, device, 3)
            names = list(steps_fn)
            times: dict[str, list[float]] = {k: [] for k in names}
            for r in range(repeats):
                for k in names[r % len(names) :] + names[: r % len(names)]:
                    times[k].append(_time_fn(steps_fn[k], device, steps))
            med = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"| {tuple(shape)} | {precision} | {med['torch'] * 1e3:.3f} | "
                f"{med['fused'] * 1e3:.3f} | {med['fused'] / med['torch']:.2f} | "
                f"{med['reference'] / med['torch']:.2f} |",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument(
        "--fused", action="store_true", help="fused kernels vs torch and the reference"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.fused:
        fused_table(device, args.precisions, args.repeats, args.steps)
        return 0
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
