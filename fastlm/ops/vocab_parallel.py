"""Vocabulary-parallel softmax cross-entropy: the classes sharded over a process group.

Each rank of ``process_group`` holds the logits of a contiguous block of the classes, the
blocks in rank order (rank 0 the first C_0 classes, rank 1 the next C_1, ...); the blocks may
differ in size (each rank's size is its input's class dimension), so a vocabulary that does
not divide by the world size needs no padding. Targets are global class ids, the same on
every rank; class weights, when given, are sharded as the logits (each rank its block's).

The loss is the single-process fastlm.cross_entropy's (fastlm/reference/cross_entropy.py
defines it), assembled from per-row pieces combined by all-reduces, never the full logits:

    m = max_c x[c]                      all_reduce(MAX)
    s = sum_c exp(x[c] - m)             all_reduce(SUM), lse = m + log(s)
    x[y], w[y] (from the owning rank, 0 elsewhere), sum_c w[c] x[c], sum_c w[c]
                                        one all_reduce(SUM) together

    loss = (1 - eps) * w[y] * (lse - x[y]) + (eps / C) * (lse * sum_c w[c] - sum_c w[c] x[c])
           + z_loss * lse^2

(x soft-capped first when asked; w = 1 without weights.) A third small all-reduce, of the
block sizes, gives each rank its offset and C, kept as tensors: no host sync but the
collectives themselves. Every rank ends with the same per-row losses, so the reduction
(none, sum, mean with torch's divisor) is formed identically on each, and the backward
needs no communication: each rank forms its block of (p * coef - q) * dloss from the saved
global lse, with q = (1 - eps) * w[y] * onehot(y) + (eps / C) * w and
coef = sum_c q[c] + 2 * z_loss * lse, times the cap's derivative under softcap.

Computed in float32 (float64 for float64 logits), on torch ops: this is the CPU / any-device
path, not a kernel. Probability targets are not taken (they would be sharded as well; not
needed yet). A row whose logits hold +inf or NaN gives NaN, as in one process; a class index
outside [0, C) gives that row NaN (loss and gradient), on every device.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ArgumentError
from ._autocast import no_autocast


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _shard_bounds(local_classes: int, device, group) -> tuple[Tensor, Tensor]:
    """(offset, C) of this rank's block, as int64 tensors: each rank writes its block's size
    at its own place, one all_reduce(SUM) gives all of them."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = local_classes
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM, group=group)
    return sizes[:rank].sum(), sizes.sum()


class _VocabParallelCE(torch.autograd.Function):
    """Per-row losses (R,) of sharded logits (R, C_local), plus the "mean" divisor (torch's:
    the summed weights of the counted targets, their count without weights; 1 where 0)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                label_smoothing: float, z_loss: float, softcap: float, group):
        dtype = _compute_dtype(logits)
        rows, local = logits.shape
        offset, classes = _shard_bounds(local, logits.device, group)
        x = logits.to(dtype, copy=True)
        if softcap > 0:
            x.div_(softcap).tanh_().mul_(softcap)
        w = weight.to(dtype) if weight is not None else None

        target = target.long()
        counted = target != ignore_index
        valid = counted & (target >= 0) & (target < classes)
        local_t = target - offset
        mine = valid & (local_t >= 0) & (local_t < local)
        safe = torch.where(mine, local_t, 0).clamp_(0, max(local - 1, 0))

        # 1) the global max per row (a block of no classes contributes -inf)
        m = x.amax(-1) if local else x.new_full((rows,), -torch.inf)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m_safe = torch.where(torch.isfinite(m), m, 0.0)  # only -inf: lse -inf; +inf / NaN: NaN below

        # 2) one SUM of the pieces: sum-exp, the target logit, its weight, sum w x, sum w
        pieces = x.new_zeros(rows, 5)
        pieces[:, 0] = (x - m_safe[:, None]).exp_().sum(-1)
        if local:
            pieces[:, 1] = torch.where(mine, x.gather(-1, safe[:, None])[:, 0], 0.0)
            if w is not None:
                pieces[:, 2] = torch.where(mine, w[safe], 0.0)
            if label_smoothing > 0:
                pieces[:, 3] = (x * w).sum(-1) if w is not None else x.sum(-1)
                pieces[:, 4] = w.sum() if w is not None else float(local)
        dist.all_reduce(pieces, op=dist.ReduceOp.SUM, group=group)
        sum_exp, x_t, w_t, sum_wx, sum_w = pieces.unbind(-1)
        if w is None:
            w_t = valid.to(dtype)
        lse = sum_exp.log() + m_safe
        # where a row holds +inf or NaN, torch's log_softmax gives NaN; so does this
        bad_row = torch.isnan(m) | (m == torch.inf)
        lse = torch.where(bad_row, float("nan"), lse)

        eps = label_smoothing
        c = classes.to(dtype)
        loss = (lse - x_t) * w_t * (1 - eps)
        coef = w_t * (1 - eps)
        if eps > 0:
            loss = loss + (lse * sum_w - sum_wx) * (eps / c)
            coef = coef + sum_w * (eps / c)
        loss = torch.where(valid, loss, 0.0)
        coef = torch.where(valid, coef, 0.0)
        if z_loss > 0:
            loss = torch.where(counted, loss + z_loss * lse.square(), 0.0)
            coef = torch.where(counted, coef + 2 * z_loss * lse, 0.0)
        invalid = counted & ~valid
        loss = loss.masked_fill(invalid, float("nan"))

        divisor = (w_t * counted).sum() if weight is not None else counted.sum().to(dtype)
        divisor = torch.where(divisor == 0, 1.0, divisor)

        ctx.save_for_backward(logits, weight, lse, coef, mine, safe, valid, invalid, classes)
        ctx.options = (label_smoothing, softcap)
        ctx.mark_non_differentiable(divisor)
        return loss, divisor

    @staticmethod
    def backward(ctx, dloss: Tensor, _ddivisor):
        logits, weight, lse, coef, mine, safe, valid, invalid, classes = ctx.saved_tensors
        eps, softcap = ctx.options
        dtype = _compute_dtype(logits)
        g = dloss.to(dtype).masked_fill(invalid, float("nan"))
        x = logits.to(dtype, copy=True)
        th = None
        if softcap > 0:
            th = x.div_(softcap).tanh_()
            x = th * softcap
        grad = x.sub_(lse[:, None]).exp_().mul_((coef * g)[:, None])           # p * coef * dloss
        w = weight.to(dtype) if weight is not None else None
        if logits.shape[1]:
            w_t = w[safe] if w is not None else 1.0
            take = torch.where(mine, (1 - eps) * g * w_t, 0.0)                  # the target's share
            grad.scatter_add_(-1, safe[:, None], -take[:, None])
        if eps > 0:                                                              # the smoothing share
            share = torch.where(valid, g * (eps / classes.to(dtype)), 0.0)[:, None]  # none on ignored rows
            grad.sub_(share * w if w is not None else share)
        if th is not None:
            grad.mul_(th.square_().neg_().add_(1))
        return grad.to(logits.dtype), None, None, None, None, None, None, None


@no_autocast
def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                  label_smoothing: float, z_loss: float, softcap: Optional[float], process_group) -> Tensor:
    """fastlm.cross_entropy(..., process_group=group): ``input`` this rank's block of the classes
    (module docstring); the result, the same on every rank, is the single-process loss."""
    from .cross_entropy import _check_args, check_loss_options  # (that module calls this one)

    fn = "cross_entropy"
    if not dist.is_available() or not dist.is_initialized():
        raise ArgumentError(f"fastlm.{fn}: process_group given but torch.distributed is not initialized")
    class_dim, classes = _check_args(input, target, weight)
    if target.is_floating_point():
        raise ArgumentError(f"fastlm.{fn}: probability targets are not supported with process_group "
                            "(give class indices)")
    label_smoothing, z_loss, softcap = check_loss_options(fn, ignore_index, reduction, label_smoothing, z_loss,
                                                          softcap)
    if input.dim() == 1:
        logits, tgt, out_shape = input.unsqueeze(0), target.unsqueeze(0), ()
    elif input.dim() == 2:
        logits, tgt, out_shape = input, target, target.shape[:1]
    else:
        logits = input.movedim(1, -1).reshape(target.numel(), classes)  # (a block may have no classes)
        tgt, out_shape = target.reshape(-1), input.shape[:1] + input.shape[2:]
    rows, divisor = _VocabParallelCE.apply(logits, tgt, weight, ignore_index, label_smoothing, z_loss, softcap,
                                           process_group)
    if reduction == "none":
        return rows.reshape(out_shape).to(input.dtype)
    total = rows.sum()
    if reduction == "mean":
        total = total / divisor
    return total.to(input.dtype)
