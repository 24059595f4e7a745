"""cross_entropy_with_stats: the loss and its training statistics from the same pass.

    fastlm::cross_entropy_with_stats(logits (R, C), target (R,), weight?, ignore_index, label_smoothing,
                                     z_loss, softcap) -> (loss, lse, coef, argmax)

The op is fastlm::cross_entropy plus each row's argmax of the (soft-capped) logits, int32:
on Triton the forward kernel's STATS variant tracks it in its one online-softmax pass (the
plain ``cross_entropy`` compiles the variant without it, so its cost is unchanged); the
reference takes torch.argmax of the capped logits. The statistics are then formed from
per-row vectors with torch ops on the device: no further pass over the logits, no host sync
(beyond the CPU-only target range check that ``cross_entropy`` makes as well). The CUDA
backend's hand-written kernel has no argmax: a call that would pick it runs the Triton
kernel instead.

Class-probability targets are refused (ArgumentError): "accuracy" has no single meaning
there. Gradients flow through the loss only; the statistics are detached.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..reference import cross_entropy as ref
from ._autocast import no_autocast
from ._eager import EagerTwin
from .cross_entropy import (
    _backward_with,
    _check_args,
    _cross_entropy_bwd,
    _cross_entropy_bwd_body,
    as_rows,
    check_loss_options,
    check_targets_in_range,
    mean_divisor,
    pick_backend,
    reduce_rows,
)

_FN = "cross_entropy_with_stats"


class CrossEntropyStats(NamedTuple):
    """Statistics of one cross_entropy_with_stats call, all detached tensors on the input's device.

    lse: each row's log-sum-exp of the (soft-capped) logits, float32 (float64 for float64
        input), shaped as the loss with reduction="none".
    z_loss: the z-loss term alone, z_loss * lse^2 over the counted rows, reduced as the loss
        (for "mean": by the loss's own divisor), so that it is exactly its share of ``loss``.
    accuracy: float32 scalar, the fraction of counted (non-ignored) rows whose argmax (first
        index of the max, as torch.argmax) is the target; 0 when no row is counted.
    """

    lse: Tensor
    z_loss: Tensor
    accuracy: Tensor


def _stats_backend(logits: Tensor, weight: Optional[Tensor], target: Tensor) -> str:
    backend = pick_backend(_FN, logits, weight, target=target)
    # The CUDA backend's kernel computes no argmax; Triton takes whatever it takes.
    return "triton" if backend == "cuda" else backend


def _argmax_rows(logits: Tensor, softcap: float) -> Tensor:
    """The reference's argmax of the capped logits (capping can tie saturated logits)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.argmax(ref._capped(logits, dtype, softcap), dim=-1).to(torch.int32)


@no_autocast
def _stats_body(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                label_smoothing: float, z_loss: float, softcap: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_targets_in_range(_FN, target, logits.shape[1], ignore_index)
    backend = _stats_backend(logits, weight, target)
    if backend == "triton":
        from fastlm.kernels import cross_entropy as kernels
        return kernels.cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                                         stats=True)
    loss, lse, coef = ref.cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    return loss, lse, coef, _argmax_rows(logits, softcap)


_stats_op = torch.library.custom_op("fastlm::cross_entropy_with_stats", mutates_args=())(_stats_body)


@_stats_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    rows = logits.shape[0]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # as the reference
    return tuple(logits.new_empty(rows, dtype=dtype) for _ in range(3)) + (logits.new_empty(rows, dtype=torch.int32),)


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, z_loss, softcap = inputs
    _, lse, coef, _ = output
    ctx.save_for_backward(logits, target, weight, lse, coef)
    ctx.options = (ignore_index, label_smoothing, softcap)
    # The backward runs where the forward ran (its lse and coef): Triton in place of CUDA.
    ctx.backend = _stats_backend(logits, weight, target)


def _backward_with_stats(cross_entropy_bwd):
    backward = _backward_with(cross_entropy_bwd)

    def backward_stats(ctx, dloss, dlse, dcoef, darg):
        return backward(ctx, dloss, dlse, dcoef)
    return backward_stats


_stats_op.register_autograd(_backward_with_stats(_cross_entropy_bwd), setup_context=_setup_context)
_stats_eager = EagerTwin(_stats_op, _stats_body, _setup_context, _backward_with_stats(_cross_entropy_bwd_body),
                         name=_FN)


def cross_entropy_with_stats(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                             size_average: Optional[bool] = None, ignore_index: int = -100,
                             reduce: Optional[bool] = None, reduction: str = "mean", label_smoothing: float = 0.0,
                             *, z_loss: float = 0.0, softcap: Optional[float] = None, process_group=None
                             ) -> tuple[Tensor, CrossEntropyStats]:
    """fastlm.cross_entropy (every argument, same loss) and its :class:`CrossEntropyStats`
    (lse, z_loss term, accuracy) from the same kernel pass, with no host sync.

    Class-index targets only: probability targets raise fastlm.ArgumentError (an accuracy
    against a distribution has no single meaning). Rows with NaN logits have an unspecified
    argmax. Gradients flow through ``loss`` only. process_group: vocabulary-parallel, as
    fastlm.cross_entropy's (input this rank's block of the classes); the statistics are the
    single-process ones, the same on every rank (the global argmax rides in the loss's own
    all-reduce: fastlm/ops/vocab_parallel.py).
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if process_group is not None:
        from . import vocab_parallel
        return vocab_parallel.cross_entropy_with_stats(input, target, weight, ignore_index, reduction,
                                                       label_smoothing, z_loss, softcap, process_group)
    class_dim, classes = _check_args(input, target, weight)
    if target.is_floating_point():
        raise ArgumentError(f"fastlm.{_FN}: target must hold class indices; probability targets have no "
                            f"accuracy (use fastlm.cross_entropy)")
    label_smoothing, z_loss, softcap = check_loss_options(_FN, ignore_index, reduction, label_smoothing,
                                                          z_loss, softcap)
    logits, tgt, out_shape = as_rows(input, target, classes)
    loss_rows, lse, _, arg = _stats_eager(logits, tgt, weight, ignore_index, label_smoothing, z_loss, softcap)
    divisor = []

    def divisor_fn():  # formed once, shared by the loss and its z-loss term
        if not divisor:
            divisor.append(mean_divisor(tgt, weight, ignore_index, logits.shape[0]))
        return divisor[0]

    loss = reduce_rows(loss_rows, reduction, divisor_fn, out_shape, input.dtype)
    return loss, statistics(lse, arg == tgt, tgt, ignore_index, z_loss, reduction, divisor_fn, out_shape,
                            input.dtype)


def statistics(lse: Tensor, correct: Tensor, tgt: Tensor, ignore_index: int, z_loss: float, reduction: str,
               divisor_fn, out_shape, dtype) -> CrossEntropyStats:
    """CrossEntropyStats from per-row lse and whether each row's argmax is its target
    (device ops on (R,) vectors, no sync); ``divisor_fn`` gives the loss's own "mean"
    divisor. (The single-process ops and the vocabulary-parallel ones share it.)"""
    lse = lse.detach()
    counted = tgt != ignore_index
    if z_loss > 0:
        z_rows = torch.where(counted, z_loss * lse * lse, 0.0)  # an ignored row's lse may be inf
    else:
        z_rows = torch.zeros_like(lse)
    z_term = reduce_rows(z_rows, reduction, divisor_fn, out_shape, dtype)
    correct = correct & counted
    accuracy = correct.sum(dtype=torch.float32) / counted.sum(dtype=torch.float32).clamp_min(1.0)
    return CrossEntropyStats(lse.reshape(out_shape), z_term, accuracy)
