"""FullNorm's ``alpha_reference``: the estimates forget the history at the same rate per sample
at every batch size (exact identities of the moving average), its validation, and the ``fn``
method's default. The process-group case: two gloo processes (tests/_dist_helpers.py) against
one process that sees the concatenated batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from _dist_helpers import run_distributed

from normlab.functional import full_norm as fnf
from normlab.methods import get_method
from normlab.methods.fn import FN_ALPHA_REFERENCE
from normlab.nn.fullnorm import FullNorm1d, FullNorm2d

F64 = torch.float64


def _randn(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale + shift


@pytest.mark.parametrize("ratio", [1 / 64, 0.25, 1.0, 3.0])
@pytest.mark.parametrize(("alpha", "decay", "step"), [(0.1, 0.0, 50), (0.3, 0.5, 7)])
def test_schedule_forgets_per_sample(ratio, alpha, decay, step):
    # 1 - a(r) = (1 - a(1))^r: r batches of the reference size keep the history's weight that
    # one batch of r times the reference size keeps.
    base = fnf.alpha_schedule(step, alpha, decay, debias=False)
    assert base == pytest.approx(alpha * (step + 1) ** -decay)
    got = fnf.alpha_schedule(step, alpha, decay, debias=False, batch_ratio=ratio)
    assert 1.0 - got == pytest.approx((1.0 - base) ** ratio, rel=1e-12)
    # debias still floors the step at the cumulative average 1/(k+1); capped at 1.
    debiased = fnf.alpha_schedule(step, alpha, decay, debias=True, batch_ratio=ratio)
    assert debiased == pytest.approx(min(1.0, max(got, 1.0 / (step + 1))), rel=1e-12)
    assert fnf.alpha_schedule(0, alpha, decay, batch_ratio=ratio) == 1.0


def test_schedule_ratio_one_is_the_plain_schedule_and_alpha_one_stays_one():
    for k in (0, 3, 20):
        assert fnf.alpha_schedule(k, 0.1, batch_ratio=1.0) == fnf.alpha_schedule(k, 0.1)
    assert fnf.alpha_schedule(9, 1.0, debias=False, batch_ratio=0.01) == 1.0


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_schedule_rejects_a_bad_ratio(bad):
    with pytest.raises(ValueError, match="batch_ratio"):
        fnf.alpha_schedule(3, 0.1, batch_ratio=bad)


def test_single_samples_average_like_one_batch_of_the_reference_size():
    # Four batches of one sample at alpha_reference=4 leave the history (the prior mean) with
    # the weight one batch of four samples at alpha=0.3 leaves it, (1 - 0.3): the mean estimate
    # is the same exponentially weighted average whatever the batching.
    x = _randn(4, 3, seed=1, scale=2.0, shift=1.0)
    prior = _randn(3, seed=2)
    single = FullNorm1d(3, alpha=0.3, alpha_reference=4, debias=False).to(F64)
    single.running_mean.copy_(prior)
    alphas = []
    for i in range(4):
        alphas.append(single.current_alpha(1))
        single(x[i : i + 1])
    a = 1.0 - 0.7**0.25
    assert alphas == pytest.approx([a] * 4, rel=1e-12)
    expected = prior * (1 - a) ** 4 + sum(a * (1 - a) ** (3 - i) * x[i] for i in range(4))
    torch.testing.assert_close(single.running_mean, expected, rtol=1e-12, atol=1e-12)
    whole = FullNorm1d(3, alpha=0.3, alpha_reference=4, debias=False).to(F64)
    whole.running_mean.copy_(prior)
    assert whole.current_alpha(4) == pytest.approx(0.3, rel=1e-12)
    whole(x)
    torch.testing.assert_close(
        whole.running_mean, prior * 0.7 + 0.3 * x.mean(0), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("estimator", ["adaptive", "batch", "autograd"])
def test_layer_step_equals_the_functional_update_at_the_converted_alpha(estimator):
    # (N, C, H, W): N = 2 samples at reference 8 -> 1 - 0.8^(1/4); the whole training step
    # (output, estimates, input gradient) is the plain layer's at that alpha.
    a = 1.0 - 0.8**0.25
    ref_layer = FullNorm2d(3, alpha=a, debias=False, estimator=estimator).to(F64)
    layer = FullNorm2d(3, alpha=0.2, alpha_reference=8, debias=False, estimator=estimator)
    layer = layer.to(F64)
    for k in range(3):
        x = _randn(2, 3, 4, 5, seed=10 + k, scale=3.0, shift=k)
        g = _randn(2, 3, 4, 5, seed=20 + k)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [m(xi) for m, xi in zip((layer, ref_layer), xs, strict=True)]
        for out in outs:
            (out * g).sum().backward()
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_mean, ref_layer.running_mean)
        torch.testing.assert_close(layer.running_var, ref_layer.running_var)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "64"])
def test_bad_alpha_reference_raises(bad):
    with pytest.raises(ValueError, match="alpha_reference"):
        FullNorm1d(3, alpha_reference=bad)


def test_current_alpha_checks_the_batch_size_and_leaves_state_alone():
    layer = FullNorm1d(3, alpha_reference=16)
    layer(torch.randn(5, 3))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            layer.current_alpha(bad)
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # without alpha_reference the batch size does not matter
    plain = FullNorm1d(3)
    assert plain.current_alpha(1) == plain.current_alpha(64) == plain.current_alpha()


def test_fn_method_defaults_to_the_reference_batch_and_accepts_none():
    fn = get_method("fn")
    assert fn.defaults["alpha_reference"] == FN_ALPHA_REFERENCE == 64
    layer = fn.norm_layer()(4, "1d")
    assert layer.alpha_reference == 64 and "alpha_reference=64" in repr(layer)
    assert fn.norm_layer({"alpha_reference": None})(4, "2d").alpha_reference is None
    assert get_method("fn-batch").norm_layer()(4, "1d").alpha_reference == 64
    with pytest.raises(ValueError, match="alpha_reference"):
        fn.norm_layer({"alpha_reference": 0})
    # The bare layer keeps per-batch alpha (the fused kernels' and the tests' contract).
    assert FullNorm1d(4).alpha_reference is None


# -------------------------------------------------------------------------- process group

_SHARDS = [(1, 3), (0, 2), (2, 5)]  # rank 0's and rank 1's samples per step


def _worker(rank: int, world_size: int) -> int:
    assert world_size == 2
    layer = FullNorm1d(3, alpha=0.3, alpha_reference=4, process_group=dist.group.WORLD).to(F64)
    ref = FullNorm1d(3, alpha=0.3, alpha_reference=4).to(F64)
    for step, (n0, n1) in enumerate(_SHARDS):
        full = _randn(n0 + n1, 3, seed=step, scale=2.0, shift=step)
        rows = slice(0, n0) if rank == 0 else slice(n0, n0 + n1)
        # the step uses the group's total samples, so every rank uses the same alpha
        assert layer.current_alpha(n0 + n1) == ref.current_alpha(n0 + n1)
        out_ref = ref(full)
        out = layer(full[rows])
        torch.testing.assert_close(out, out_ref[rows], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-9, atol=1e-9)
    return len(_SHARDS)


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)
def test_process_group_uses_the_groups_total_batch_size():
    assert run_distributed(_worker, 2) == [len(_SHARDS)] * 2
