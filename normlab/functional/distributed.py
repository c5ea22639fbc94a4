r"""Per-channel moments and batch normalization synchronized over a process group.

Each collective here is ONE packed all-reduce (``SUM``) of per-channel sums, so a layer costs one
collective in the forward and one in the backward, whatever the number of ranks. Ranks may hold
different batch sizes, zero included: a rank with no samples contributes zeros, and it must still
call every function here that its peers call (a collective blocks until every rank joins).

Packets are float64 for float64 inputs and float32 otherwise (half precision included). The
forward packet holds, per channel, the count and the sums of :math:`x-K` and :math:`(x-K)^2` for a
shift :math:`K` that must be the same on every rank (a layer passes its running mean); see
docs/distributed.md for the layout, the byte counts and the precision argument.

With no process group initialised, or a group of one rank, the functions run locally and no
collective is issued. Nothing here holds state: the caller owns buffers and process groups.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlab.errors import BatchTooSmallError
from normlab.functional.batch_norm import Moments, channel_shape, reduce_dims

__all__ = [
    "SyncBatchNormTrainFn",
    "all_reduce_packed",
    "group_size",
    "needs_sync",
    "packet_dtype",
    "sync_batch_norm_train",
    "sync_bytes_per_step",
    "sync_moments",
]

log = logging.getLogger(__name__)


def group_size(group: Any = None) -> int:
    """World size of ``group`` (``None``: the default group); 1 when no group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def needs_sync(group: Any = None) -> bool:
    """Whether statistics must be reduced over ``group``: initialised and more than one rank."""
    return group_size(group) > 1


def packet_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the all-reduced per-channel sums for inputs of ``dtype``: float64 stays float64,
    everything else (float32, float16, bfloat16) is reduced in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sync_bytes_per_step(num_features: int, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes all-reduced per rank by one synchronized batch-norm layer of ``num_features``
    channels for inputs of ``dtype``: ``(forward, backward)`` = ``((2C + 1) s, 2C s)`` with
    ``s`` = 8 for float64 inputs and 4 otherwise. The backward packet is sent only when the
    layer's input requires a gradient."""
    size = torch.empty((), dtype=packet_dtype(dtype)).element_size()
    return (2 * num_features + 1) * size, 2 * num_features * size


def all_reduce_packed(tensors: Sequence[Tensor], group: Any = None) -> list[Tensor]:
    """Sum each tensor over the ranks of ``group`` with a single all-reduce.

    The tensors (same dtype and device, any shapes) are flattened into one buffer, reduced with
    ``SUM`` and split back; the inputs are not modified. Without an initialised group of more
    than one rank, copies of the inputs are returned and no collective is issued.

    Raises:
        ValueError: if ``tensors`` is empty or mixes dtypes or devices.
    """
    if len(tensors) == 0:
        raise ValueError("all_reduce_packed expected at least one tensor, got none")
    first = tensors[0]
    for t in tensors:
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                "all_reduce_packed expected tensors of one dtype and device, got "
                f"{first.dtype} on {first.device} and {t.dtype} on {t.device}"
            )
    packet = torch.cat([t.reshape(-1) for t in tensors])
    if needs_sync(group):
        dist.all_reduce(packet, op=dist.ReduceOp.SUM, group=group)
    parts = packet.split([t.numel() for t in tensors])
    return [p.view_as(t) for p, t in zip(parts, tensors, strict=True)]


def _stat(x: Tensor) -> Tensor:
    # Half-precision values are accumulated in float32 (as normlab's local batch norm does).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v if x.dim() == 2 else v.view(channel_shape(x))


@torch.no_grad()
def sync_moments(x: Tensor, shift: Tensor | None = None, group: Any = None) -> Moments:
    r"""Per-channel mean and biased variance of the union of every rank's ``x``.

    One packed all-reduce of :math:`(\sum (x-K),\ \sum (x-K)^2)` per channel and the count
    (:func:`packet_dtype`; ``2C + 1`` values). Each rank forms its sums from a two-pass local mean
    and centred second moment; globally :math:`\mu = K + S/n` and
    :math:`\sigma^2 = \max(Q/n - (S/n)^2, 0)`, whose rounding error relative to :math:`\sigma^2`
    grows like :math:`(\mu-K)^2/\sigma^2`: a shift near the mean (the running mean) keeps it small.

    Args:
        x: ``(N, C, *)``; ``N`` may be 0 (the rank contributes nothing but joins the collective).
        shift: ``K``, shape ``(C,)``, identical on every rank, or ``None`` for 0. Non-finite
            entries are replaced by 0.
        group: process group (``None``: the default group).
    Returns:
        :class:`~normlab.functional.Moments` ``(mean, var, count)`` in the packet dtype;
        ``count`` is the global number of values per channel (exact below :math:`2^{24}` for
        float32 packets). With ``count == 0`` mean and var are zeros. No gradient flows.
    Raises:
        ValueError: ``x`` has fewer than 2 dimensions.
    """
    if x.dim() < 2:
        raise ValueError(f"sync_moments expected an (N, C, *) tensor, got shape {tuple(x.shape)}")
    c = x.shape[1]
    n_local = x.numel() // c if c else 0
    pdt = packet_dtype(x.dtype)
    packet = torch.zeros(2 * c + 1, dtype=pdt, device=x.device)
    k = torch.zeros(c, dtype=pdt, device=x.device) if shift is None else shift.detach().to(pdt)
    if shift is not None:
        k = torch.where(torch.isfinite(k), k, torch.zeros_like(k))
    if n_local > 0:
        xs = _stat(x)
        dims = reduce_dims(x)
        mean_r = xs.mean(dims, dtype=pdt)  # (N, C, *) -> (C,)
        xc = xs - _per_channel(mean_r, x).to(xs.dtype)
        m2 = xc.square_().sum(dims, dtype=pdt)  # local centred second moment, (C,)
        d = mean_r - k
        packet[:c] = d * n_local
        packet[c : 2 * c] = m2 + d * d * n_local
        packet[2 * c] = n_local
    if needs_sync(group):
        dist.all_reduce(packet, op=dist.ReduceOp.SUM, group=group)
    count = int(round(float(packet[2 * c])))  # one host sync: the count decides what follows
    if count == 0:
        return Moments(torch.zeros_like(k), torch.zeros_like(k), 0)
    dm = packet[:c] / count
    var = (packet[c : 2 * c] / count - dm * dm).clamp_min_(0.0)
    return Moments(k + dm, var, count)


class SyncBatchNormTrainFn(torch.autograd.Function):
    r"""Normalization with given global moments, and the synchronized backward.

    ``forward(x, weight, bias, mean, var, count, eps, group)`` returns
    :math:`y = \gamma (x-\mu)/\sqrt{\sigma^2+\epsilon} + \beta` with the global ``mean`` and biased
    ``var`` (``(C,)``, no gradient) over ``count`` values per channel. The backward is the formula
    of :func:`~normlab.functional.batch_norm_backward` with the per-channel sums
    :math:`\sum g` and :math:`\sum g (x-\mu)` taken over every rank: one packed all-reduce of
    ``2C`` values, issued only when ``x`` needs a gradient (which must then hold on every rank).
    ``weight`` and ``bias`` get this rank's share of their gradients (summing over ranks, as DDP
    does, gives the gradient of the summed loss). Once differentiable.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        count: int,
        eps: float,
        group: Any,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, mean, var)
        ctx.count, ctx.eps, ctx.group = count, eps, group
        if x.numel() == 0:
            return torch.empty_like(x)
        xs = _stat(x)
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        y = xs - _per_channel(mean, x).to(xs.dtype)  # the one tensor-sized allocation
        y.mul_(_per_channel(scale, x).to(y.dtype))
        if bias is not None:
            y.add_(_per_channel(bias, x).to(y.dtype))
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        x, weight, mean, var = ctx.saved_tensors
        needs = ctx.needs_input_grad
        c = x.shape[1]
        pdt = mean.dtype
        invstd = torch.rsqrt(var + ctx.eps)
        xc = None
        if x.numel() > 0:
            xs, gs = _stat(x), _stat(grad_y)
            dims = reduce_dims(x)
            mean_b = _per_channel(mean, x).to(xs.dtype)
            # One tensor-sized buffer: g (x - mean) for the reduction, then x - mean again.
            xc = xs - mean_b
            sum_gxc = xc.mul_(gs).sum(dims, dtype=pdt)  # (C,)
            torch.sub(xs, mean_b, out=xc)
            sum_g = gs.sum(dims, dtype=pdt)  # (C,), this rank's dL/dbeta
        else:
            sum_g = torch.zeros(c, dtype=pdt, device=x.device)
            sum_gxc = torch.zeros(c, dtype=pdt, device=x.device)
        grad_x = grad_w = grad_b = None
        if weight is not None:
            grad_w = (sum_gxc * invstd).to(weight.dtype) if needs[1] else None
            grad_b = sum_g.to(weight.dtype) if needs[2] else None
        if needs[0]:
            g_all, gxc_all = all_reduce_packed([sum_g, sum_gxc], ctx.group)
            a = invstd if weight is None else invstd * weight.to(pdt)  # gamma / sqrt(var + eps)
            k = a / -ctx.count
            b = k * invstd * invstd * gxc_all  # -a * invstd * sum(g xhat) / n
            cc = k * g_all  # -a * sum(g) / n
            if xc is None:
                grad_x = torch.empty_like(x)
            else:
                # grad_x = a * (g - mean(g) - xhat * mean(g xhat)) = a g + b (x - mean) + c
                xc.mul_(_per_channel(b, x).to(xc.dtype)).add_(_per_channel(cc, x).to(xc.dtype))
                xc.addcmul_(_stat(grad_y), _per_channel(a, x).to(xc.dtype))
                grad_x = xc if xc.dtype == x.dtype else xc.to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def sync_batch_norm_train(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    group: Any = None,
    shift: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    r"""Training-mode batch normalization with statistics over the union of every rank's batch.

    :math:`y = \gamma (x-\mu)/\sqrt{\sigma^2+\epsilon} + \beta`, :math:`\mu, \sigma^2` (biased)
    from :func:`sync_moments` (one all-reduce), backward by :class:`SyncBatchNormTrainFn` (one
    all-reduce). Every rank of ``group`` must call it, an empty batch included.

    Args:
        x: ``(N, C, *)``, ``N`` may be 0 (the output is then empty too).
        weight, bias: :math:`\gamma, \beta` of shape ``(C,)``, or ``None``.
        eps: added to the variance inside the square root.
        group: process group (``None``: the default group).
        shift: per-channel shift for the moment sums, identical on every rank (see
            :func:`sync_moments`); ``None`` for 0.
    Returns:
        ``(y, mean, var, count)``: ``mean``/``var`` (biased) carry no gradient and are in the
        packet dtype; ``count`` is the global number of values per channel.
    Raises:
        BatchTooSmallError: fewer than 2 values per channel over all ranks (raised on every rank,
            after the forward collective; no backward collective follows).
    """
    mean, var, count = sync_moments(x, shift, group)
    if count < 2:
        raise BatchTooSmallError(
            f"synchronized batch norm expected more than 1 value per channel over all "
            f"{group_size(group)} ranks when training, got {count} (this rank's input has shape "
            f"{tuple(x.shape)})"
        )
    y = SyncBatchNormTrainFn.apply(x, weight, bias, mean, var, count, eps, group)
    return y, mean, var, count
