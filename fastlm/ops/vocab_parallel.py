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

Statistics (``cross_entropy_with_stats``, fastlm/ops/cross_entropy_stats.py's meaning): the
lse is the one above; the accuracy needs whether the GLOBAL argmax (torch.argmax's: the
first index of the max) is the target, and that rides in the same SUM as two more columns,
without a collective of its own: the owning rank adds whether x[y] == m, and every rank
adds how many of its classes before y (in global order) reach m. The argmax is y exactly
when the first is 1 and the second 0. (Exact: m is one of the logits, passed on unchanged by
the MAX.)

The sharded lm-head (``linear_cross_entropy``): input (N, H) the same on every rank, each rank
the (C_local, H) block of the head's rows that produces its block of the logits. Rows go in
chunks, as in fastlm/ops/linear_cross_entropy.py: per chunk the local logits by a matmul, the
two all-reduces above, and, for a scalar loss that needs gradients, the chunk's gradient at
once, folded into dx_local = d @ W_local, dW_local += d.T @ x_chunk, dbias_local += sum d.
The backward scales those (for "none" it recomputes each chunk with the saved global lse
and coef: a matmul, no collective) and then all-reduces dx once: every rank's dx_local is
its block's share of the input's gradient, and the input is replicated, so its gradient is
their SUM. dW and dbias are this rank's blocks, with no communication.

Computed in float32 (float64 for float64 logits), on torch ops: this is the CPU / any-device
path, not a kernel. Probability targets are not taken (they would be sharded as well; not
needed yet). A row whose logits hold +inf or NaN gives NaN, as in one process; a class index
outside [0, C) gives that row NaN (loss and gradient), on every device (one process raises
on CPU; here C is known only as a tensor, and a check would be a host sync).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ArgumentError
from ._autocast import autocast_inputs, no_autocast


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_distributed(fn: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ArgumentError(f"fastlm.{fn}: process_group given but torch.distributed is not initialized")


def _shard_bounds(local_classes: int, device, group) -> tuple[Tensor, Tensor]:
    """(offset, C) of this rank's block, as int64 tensors: each rank writes its block's size
    at its own place, one all_reduce(SUM) gives all of them."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = local_classes
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM, group=group)
    return sizes[:rank].sum(), sizes.sum()


# ----------------------------------------------------------------------------- the shared row math

class _Targets(NamedTuple):
    """Where each row's (global) target lies, relative to this rank's block."""
    counted: Tensor  # not ignore_index
    valid: Tensor    # counted and in [0, C)
    mine: Tensor     # valid and in this rank's block
    safe: Tensor     # the local index where mine, else 0 (always a legal index)
    local_t: Tensor  # target - offset (any value)
    invalid: Tensor  # counted but outside [0, C): NaN loss and gradient


def _targets(target: Tensor, ignore_index: int, offset: Tensor, local: int, classes: Tensor) -> _Targets:
    target = target.long()
    counted = target != ignore_index
    valid = counted & (target >= 0) & (target < classes)
    local_t = target - offset
    mine = valid & (local_t >= 0) & (local_t < local)
    safe = torch.where(mine, local_t, 0).clamp_(0, max(local - 1, 0))
    return _Targets(counted, valid, mine, safe, local_t, counted & ~valid)


class _Rows(NamedTuple):
    loss: Tensor               # per-row loss, the same on every rank
    lse: Tensor                # for the loss and gradient: NaN where a row holds +inf or NaN (as log_softmax)
    lse_stat: Tensor           # torch.logsumexp's (+inf for a row with +inf): the statistic
    coef: Tensor               # sum_c q[c] (+ 2 z_loss lse): the gradient's softmax factor
    w_t: Tensor                # the target's class weight (1 without weights), 0 where not valid
    correct: Optional[Tensor]  # (stats) whether the global argmax is the target


def _rows_forward(x: Tensor, t: _Targets, w: Optional[Tensor], label_smoothing: float, z_loss: float,
                  offset: Tensor, classes: Tensor, group, stats: bool) -> _Rows:
    """Per-row loss pieces of this rank's (capped, compute-dtype) logits x (R, C_local),
    combined over the group by two all-reduces (module docstring). x is not written."""
    rows, local = x.shape
    dtype = x.dtype
    # 1) the global max per row (a block of no classes contributes -inf)
    m = x.amax(-1) if local else x.new_full((rows,), -torch.inf)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m_safe = torch.where(torch.isfinite(m), m, 0.0)  # only -inf: lse -inf; +inf / NaN: NaN below

    # 2) one SUM of the pieces: sum-exp, the target logit, its weight, sum w x, sum w
    #    (+ for stats: whether x[y] reaches m, how many classes before y reach m)
    pieces = x.new_zeros(rows, 7 if stats else 5)
    pieces[:, 0] = (x - m_safe[:, None]).exp_().sum(-1)
    if local:
        pieces[:, 1] = torch.where(t.mine, x.gather(-1, t.safe[:, None])[:, 0], 0.0)
        if w is not None:
            pieces[:, 2] = torch.where(t.mine, w[t.safe], 0.0)
        if label_smoothing > 0:
            pieces[:, 3] = (x * w).sum(-1) if w is not None else x.sum(-1)
            pieces[:, 4] = w.sum() if w is not None else float(local)
        if stats:
            at_max = x == m[:, None]
            pieces[:, 5] = torch.where(t.mine, at_max.gather(-1, t.safe[:, None])[:, 0], False).to(dtype)
            before = torch.arange(local, device=x.device) < t.local_t[:, None]
            pieces[:, 6] = (at_max & before).sum(-1, dtype=dtype)
    dist.all_reduce(pieces, op=dist.ReduceOp.SUM, group=group)
    sum_exp, x_t, w_t, sum_wx, sum_w = pieces[:, :5].unbind(-1)
    if w is None:
        w_t = t.valid.to(dtype)
    lse_stat = sum_exp.log() + m_safe
    # where a row holds +inf or NaN, torch's log_softmax gives NaN; so does this
    bad_row = torch.isnan(m) | (m == torch.inf)
    lse = torch.where(bad_row, float("nan"), lse_stat)

    eps = label_smoothing
    c = classes.to(dtype)
    loss = (lse - x_t) * w_t * (1 - eps)
    coef = w_t * (1 - eps)
    if eps > 0:
        loss = loss + (lse * sum_w - sum_wx) * (eps / c)
        coef = coef + sum_w * (eps / c)
    loss = torch.where(t.valid, loss, 0.0)
    coef = torch.where(t.valid, coef, 0.0)
    if z_loss > 0:
        loss = torch.where(t.counted, loss + z_loss * lse.square(), 0.0)
        coef = torch.where(t.counted, coef + 2 * z_loss * lse, 0.0)
    loss = loss.masked_fill(t.invalid, float("nan"))
    correct = t.valid & (pieces[:, 5] > 0) & (pieces[:, 6] == 0) if stats else None
    return _Rows(loss, lse, lse_stat, coef, w_t, correct)


def _rows_grad(raw: Tensor, t: _Targets, w: Optional[Tensor], lse: Tensor, coef: Tensor, dloss: Tensor,
               label_smoothing: float, softcap: float, classes: Tensor) -> Tensor:
    """This rank's block of the gradient of the per-row losses (given their gradient dloss)
    with respect to the uncapped logits ``raw`` (R, C_local), compute dtype, which it
    overwrites: (p * coef - q) * dloss, times 1 - tanh^2 under softcap."""
    eps = label_smoothing
    dtype = raw.dtype
    g = dloss.to(dtype).masked_fill(t.invalid, float("nan"))
    x, th = raw, None
    if softcap > 0:
        th = raw.div_(softcap).tanh_()
        x = th * softcap
    grad = x.sub_(lse[:, None]).exp_().mul_((coef * g)[:, None])           # p * coef * dloss
    if raw.shape[1]:
        w_t = w[t.safe] if w is not None else 1.0
        take = torch.where(t.mine, (1 - eps) * g * w_t, 0.0)                  # the target's share
        grad.scatter_add_(-1, t.safe[:, None], -take[:, None])
    if eps > 0:                                                                # the smoothing share
        share = torch.where(t.valid, g * (eps / classes.to(dtype)), 0.0)[:, None]  # none on ignored rows
        grad.sub_(share * w if w is not None else share)
    if th is not None:
        grad.mul_(th.square_().neg_().add_(1))
    return grad


def _capped(raw: Tensor, softcap: float) -> Tensor:
    return raw.div(softcap).tanh_().mul_(softcap) if softcap > 0 else raw


def _divisor(w_t: Tensor, counted: Tensor, weighted: bool) -> Tensor:
    """torch's "mean" divisor (the summed weights of the counted targets, their count
    without weights), 1 where it would be 0."""
    divisor = (w_t * counted).sum() if weighted else counted.sum().to(w_t.dtype)
    return torch.where(divisor == 0, 1.0, divisor)


def _reduce(rows: Tensor, reduction: str, divisor: Tensor, out_shape, dtype: torch.dtype) -> Tensor:
    from .cross_entropy import reduce_rows  # (lazily: that module calls this one)

    return reduce_rows(rows, reduction, lambda: divisor, out_shape, dtype)


def _stats(lse_stat: Tensor, correct: Tensor, target: Tensor, ignore_index: int, z_loss: float, reduction: str,
           divisor: Tensor, out_shape, dtype: torch.dtype):
    """CrossEntropyStats as the single-process cross_entropy_with_stats forms them (its own
    ``statistics``, given the divisor all ranks formed)."""
    from .cross_entropy_stats import statistics  # (imported lazily: that module may call this one)

    return statistics(lse_stat, correct, target, ignore_index, z_loss, reduction, lambda: divisor, out_shape, dtype)


# ----------------------------------------------------------------------------- cross_entropy

class _VocabParallelCE(torch.autograd.Function):
    """Per-row losses (R,) of sharded logits (R, C_local), the "mean" divisor (torch's: the
    summed weights of the counted targets, their count without weights; 1 where 0), and,
    with ``stats``, each row's lse (logsumexp's) and whether its global argmax is the target
    (else two empty tensors)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                label_smoothing: float, z_loss: float, softcap: float, group, stats: bool = False):
        dtype = _compute_dtype(logits)
        local = logits.shape[1]
        offset, classes = _shard_bounds(local, logits.device, group)
        w = weight.to(dtype) if weight is not None else None
        t = _targets(target, ignore_index, offset, local, classes)
        x = _capped(logits.to(dtype), softcap)  # (read only: a view of the logits may do)
        r = _rows_forward(x, t, w, label_smoothing, z_loss, offset, classes, group, stats)
        divisor = _divisor(r.w_t, t.counted, weight is not None)

        ctx.save_for_backward(logits, target, weight, r.lse, r.coef, offset, classes)
        ctx.options = (ignore_index, label_smoothing, softcap)
        empty = logits.new_empty(0, dtype=dtype)
        lse_stat = r.lse_stat if stats else empty
        correct = r.correct if stats else empty.bool()
        ctx.mark_non_differentiable(divisor, lse_stat, correct)
        return r.loss, divisor, lse_stat, correct

    @staticmethod
    def backward(ctx, dloss: Tensor, _ddivisor, _dlse, _dcorrect):
        logits, target, weight, lse, coef, offset, classes = ctx.saved_tensors
        ignore_index, eps, softcap = ctx.options
        dtype = _compute_dtype(logits)
        t = _targets(target, ignore_index, offset, logits.shape[1], classes)
        w = weight.to(dtype) if weight is not None else None
        grad = _rows_grad(logits.to(dtype, copy=True), t, w, lse, coef, dloss, eps, softcap, classes)
        return grad.to(logits.dtype), None, None, None, None, None, None, None, None


def _ce_rows(fn: str, input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
             label_smoothing: float, z_loss: float, softcap: Optional[float], process_group, stats: bool):
    """The checks and the row view shared by cross_entropy and cross_entropy_with_stats."""
    from .cross_entropy import _check_args, check_loss_options  # (that module calls this one)

    _check_distributed(fn)
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
    out = _VocabParallelCE.apply(logits, tgt, weight, ignore_index, label_smoothing, z_loss, softcap,
                                 process_group, stats)
    return out, tgt, out_shape, z_loss


@no_autocast
def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                  label_smoothing: float, z_loss: float, softcap: Optional[float], process_group) -> Tensor:
    """fastlm.cross_entropy(..., process_group=group): ``input`` this rank's block of the classes
    (module docstring); the result, the same on every rank, is the single-process loss."""
    (rows, divisor, _, _), _, out_shape, _ = _ce_rows("cross_entropy", input, target, weight, ignore_index,
                                                      reduction, label_smoothing, z_loss, softcap, process_group,
                                                      stats=False)
    return _reduce(rows, reduction, divisor, out_shape, input.dtype)


@no_autocast
def cross_entropy_with_stats(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                             reduction: str, label_smoothing: float, z_loss: float, softcap: Optional[float],
                             process_group):
    """fastlm.cross_entropy_with_stats(..., process_group=group): (loss, CrossEntropyStats), each
    the single-process one, the same on every rank: lse per row (global, after the cap), the
    z-loss term reduced as the loss, and the accuracy against the GLOBAL argmax (first index
    of the max over the whole vocabulary, as torch.argmax). The statistics cost no
    collective of their own (module docstring) and no host sync; they are detached."""
    (rows, divisor, lse, correct), tgt, out_shape, z_loss = _ce_rows(
        "cross_entropy_with_stats", input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
        softcap, process_group, stats=True)
    loss = _reduce(rows, reduction, divisor, out_shape, input.dtype)
    return loss, _stats(lse, correct, tgt, ignore_index, z_loss, reduction, divisor, out_shape, input.dtype)


# ----------------------------------------------------------------------------- linear_cross_entropy

def _grad_buffers(x: Tensor, linear_weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype):
    """dx, the dweight accumulator (float32 for 16-bit weights), dbias (or None) of one call."""
    from .linear_cross_entropy import resolve_acc_dtype

    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.zeros(linear_weight.shape, dtype=resolve_acc_dtype(linear_weight.dtype, None), device=x.device),
            torch.zeros(linear_weight.shape[0], dtype=dtype, device=x.device) if bias is not None else None)


class _VocabParallelLCE(torch.autograd.Function):
    """The sharded lm-head + loss (module docstring). Returns the loss (reduced, compute dtype),
    each row's lse (logsumexp's), the "mean" divisor and, with ``stats``, whether each row's
    global argmax is its target (else an empty tensor)."""

    @staticmethod
    def forward(ctx, x: Tensor, linear_weight: Tensor, bias: Optional[Tensor], target: Tensor,
                class_weight: Optional[Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
                softcap: float, chunk: int, reduction: str, compute_grads: bool, stats: bool, group):
        from .linear_cross_entropy import _accumulate_grads, _chunks, _logits

        dtype = _compute_dtype(x)
        n, local = x.shape[0], linear_weight.shape[0]
        offset, classes = _shard_bounds(local, x.device, group)
        w = class_weight.to(dtype) if class_weight is not None else None
        loss_rows, lse, lse_stat, coef, w_t = (torch.empty(n, dtype=dtype, device=x.device) for _ in range(5))
        correct = torch.empty(n if stats else 0, dtype=torch.bool, device=x.device)
        counted = target != ignore_index
        if compute_grads:  # the gradients of the summed rows; the backward scales them
            dx, dweight, dbias = _grad_buffers(x, linear_weight, bias, dtype)
        for start, end in _chunks(n, chunk):
            x_chunk = x[start:end]
            t = _targets(target[start:end], ignore_index, offset, local, classes)
            raw = _logits(x_chunk, linear_weight, bias).to(dtype)  # (this chunk's logits: ours to overwrite)
            r = _rows_forward(_capped(raw, softcap), t, w, label_smoothing, z_loss, offset, classes, group, stats)
            loss_rows[start:end], lse[start:end], lse_stat[start:end] = r.loss, r.lse, r.lse_stat
            coef[start:end], w_t[start:end] = r.coef, r.w_t
            if stats:
                correct[start:end] = r.correct
            if compute_grads:
                d = _rows_grad(raw, t, w, r.lse, r.coef, torch.ones_like(r.loss), label_smoothing, softcap, classes)
                _accumulate_grads(d.to(x.dtype), x_chunk, linear_weight, dx[start:end], dweight, dbias)
            raw = r = d = None  # one chunk of logits held at a time
        divisor = _divisor(w_t, counted, class_weight is not None)
        if reduction == "none":
            loss = loss_rows
        else:
            loss = loss_rows.sum()
            if reduction == "mean":
                loss = loss / divisor

        ctx.set_materialize_grads(False)  # (only the loss has a gradient; the rest may go unused)
        ctx.precomputed = compute_grads
        ctx.has_bias = bias is not None
        ctx.options = (ignore_index, label_smoothing, softcap, chunk, reduction, group)
        if compute_grads:
            ctx.save_for_backward(dx, dweight.to(linear_weight.dtype),
                                  dbias.to(bias.dtype) if bias is not None else None, divisor)
        else:
            ctx.save_for_backward(x, linear_weight, bias, target, class_weight, lse, coef, offset, classes, divisor)
        ctx.mark_non_differentiable(lse_stat, divisor, correct)
        return loss, lse_stat, divisor, correct

    @staticmethod
    def backward(ctx, dloss: Optional[Tensor], _dlse, _ddivisor, _dcorrect):
        from .linear_cross_entropy import _accumulate_grads, _chunks, _logits

        none = (None,) * 14
        if dloss is None:  # only the statistics were used
            return none
        ignore_index, eps, softcap, chunk, reduction, group = ctx.options
        want_dx, want_dw, want_db = ctx.needs_input_grad[:3]
        if ctx.precomputed:
            dx, dweight, dbias, divisor = ctx.saved_tensors
            scale = dloss / divisor if reduction == "mean" else dloss
            dx = dx * scale.to(dx.dtype) if want_dx else None
            dweight = dweight * scale.to(dweight.dtype) if want_dw else None
            dbias = dbias * scale.to(dbias.dtype) if want_db else None
        else:
            x, linear_weight, bias, target, class_weight, lse, coef, offset, classes, divisor = ctx.saved_tensors
            dtype = _compute_dtype(x)
            n, local = x.shape[0], linear_weight.shape[0]
            g = dloss.to(dtype)
            if reduction != "none":  # (a scalar loss whose gradients were not formed in the forward)
                g = (g / divisor if reduction == "mean" else g).expand(n)
            w = class_weight.to(dtype) if class_weight is not None else None
            dx, dweight, dbias = _grad_buffers(x, linear_weight, bias, dtype)
            for start, end in _chunks(n, chunk):
                x_chunk = x[start:end]
                t = _targets(target[start:end], ignore_index, offset, local, classes)
                raw = _logits(x_chunk, linear_weight, bias).to(dtype)
                d = _rows_grad(raw, t, w, lse[start:end], coef[start:end], g[start:end], eps, softcap, classes)
                _accumulate_grads(d.to(x.dtype), x_chunk, linear_weight, dx[start:end], dweight, dbias)
                raw = d = None
            dweight = dweight.to(linear_weight.dtype) if want_dw else None
            dbias = dbias.to(bias.dtype) if want_db else None
            dx = dx if want_dx else None
        if dx is not None:
            # The input is replicated: its gradient is the sum of every rank's share. Once, here;
            # the caller must not all-reduce it again (see linear_cross_entropy).
            dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=group)
        return (dx, dweight, dbias) + none[3:]


@no_autocast
def _lce(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
         weight: Optional[Tensor], ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
         softcap: float, chunk_size: Optional[int], process_group, stats: bool):
    from .linear_cross_entropy import _CPU_MIN_CHUNK, default_chunk_size

    x = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
    t = target.reshape(-1)
    n = x.shape[0]
    chunk = chunk_size or default_chunk_size(n, x.shape[1], linear_weight.shape[0])
    if chunk_size is None and x.is_cpu:
        # As the single-process op: on a CPU every chunk re-reads dW_local (and here costs two
        # collectives), so chunks of at least _CPU_MIN_CHUNK rows.
        chunk = max(chunk, min(n, _CPU_MIN_CHUNK))
    compute_grads = reduction != "none" and torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (input, linear_weight, linear_bias))
    loss, lse, divisor, correct = _VocabParallelLCE.apply(
        x, linear_weight, linear_bias, t, weight, ignore_index, label_smoothing, z_loss, softcap, chunk, reduction,
        compute_grads, stats, process_group)
    loss = loss.reshape(target.shape).to(input.dtype) if reduction == "none" else loss.to(input.dtype)
    if not stats:
        return loss
    return loss, _stats(lse, correct, t, ignore_index, z_loss, reduction, divisor, target.shape, input.dtype)


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
                         weight: Optional[Tensor], ignore_index: Optional[int], reduction: str,
                         label_smoothing: float, z_loss: float, softcap: Optional[float], chunk_size: Optional[int],
                         process_group, stats: bool = False):
    """fastlm.linear_cross_entropy(..., process_group=group): the lm-head's rows sharded.

    input (N, H) (or (..., H)), the SAME on every rank; linear_weight this rank's (C_local, H)
    block of the head's rows, the blocks contiguous in rank order (sizes may differ, even 0);
    linear_bias (C_local,) or None; weight (the class weights) this rank's (C_local,) block or
    None; target global class ids, input.shape[:-1], the same on every rank. The loss (the same
    on every rank) is the single-process fastlm.linear_cross_entropy over the concatenated
    head; the (N, C_local) logits are never held whole (chunk_size rows at a time; None: the
    single-process default for (N, H, C_local)). ``stats=True`` returns (loss,
    CrossEntropyStats) as cross_entropy_with_stats (global lse, the z-loss term, accuracy
    against the global argmax).

    Gradients: linear_weight's and linear_bias's are this rank's blocks (no communication).
    input's is the FULL gradient with respect to the replicated input: the backward
    all-reduces (SUM) the ranks' shares once, so the caller must not all-reduce it again (a
    Megatron-style copy-to-region whose backward all-reduces would double it: feed the
    replicated activation straight in). Every rank must run the backward (it holds a
    collective), with the same upstream gradient and the same requires_grad on input.
    Class indices only (probability targets and a K-dimensional head raise ArgumentError);
    a class index outside [0, C) gives that row NaN (no host sync to check it).
    """
    from .cross_entropy import check_loss_options
    from .linear_cross_entropy import _check_args

    fn = "linear_cross_entropy"
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        input, linear_weight, linear_bias = autocast_inputs(input, linear_weight, linear_bias)
    out_features, probabilities = _check_args(input, linear_weight, target, linear_bias, weight)
    if probabilities:
        raise ArgumentError(f"fastlm.{fn}: probability targets are not supported with process_group "
                            "(give class indices)")
    if out_features:
        raise ArgumentError(f"fastlm.{fn}: linear_weight must be (C_local, H) with process_group (a K-dimensional "
                            f"loss is not supported), got shape {list(linear_weight.shape)}")
    ignore_index = -100 if ignore_index is None else ignore_index
    label_smoothing, z_loss, softcap = check_loss_options(fn, ignore_index, reduction, label_smoothing, z_loss,
                                                          softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ArgumentError(f"fastlm.{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_distributed(fn)
    return _lce(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, chunk_size, process_group, bool(stats))
