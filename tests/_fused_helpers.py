"""Comparisons shared by the C++ and Triton fused-kernel tests."""

from __future__ import annotations

import copy

import torch


def close_or_closer(got, want, tol, truth=None, label="fused"):
    """``got`` (fused) equals ``want`` (reference) within ``tol`` (atol/rtol; NaN equal to NaN);
    where it does not, ``got`` must be at least as close as ``want`` to ``truth``, the reference
    run in float64 on the same values (float32 sums of many terms round differently in another
    order or precision)."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, i
        try:
            torch.testing.assert_close(a, b, equal_nan=True, **tol)
        except AssertionError:
            if truth is None:
                raise
            t = truth[i].double()
            err_got, err_want = (a.double() - t).abs(), (b.double() - t).abs()
            bound = err_want + tol["atol"] + tol["rtol"] * t.abs()
            bad = ~((err_got <= bound) | (a.isnan() & b.isnan()))
            assert not bad.any(), (
                f"result {i}: {label} error {err_got[bad].max().item():.3g} exceeds the "
                f"reference's {err_want[bad].max().item():.3g} (+ tolerance)"
            )


def twin(a):
    """The float64 copy of an argument: the same values, for the float64 truth."""
    if isinstance(a, torch.nn.Module):
        return copy.deepcopy(a).double()
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.detach().double().requires_grad_(a.requires_grad)
    return a
