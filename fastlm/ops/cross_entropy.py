"""Softmax cross-entropy: argument checks, custom ops, autograd, dispatch.

    fastlm::cross_entropy(logits (R, C), target, weight?, ignore_index, label_smoothing, z_loss, softcap)
        -> (loss, lse, coef), one float32 value per row
    fastlm::cross_entropy_bwd(dloss, logits, target, weight?, lse, coef, ..., backend) -> dlogits

The ops work on rows; ``cross_entropy`` below moves the class dim last, and reduces the
per-row losses with plain torch ops (which autograd and torch.compile see through): the
kernels never need to know the reduction. For "mean" the divisor is torch's: the summed
class weights of the counted targets (their count without weights), or the number of rows
for probability targets. Where that divisor is 0 (every target ignored) torch returns NaN;
fastlm returns 0 with zero gradients, on purpose.

On the "torch" backend (the CPU path) a call without fastlm's extras (z_loss, softcap) is
torch's own F.cross_entropy, with those two differences kept (see ``_native``); the reference
serves the extras. In eager mode the ops' bodies run through an EagerTwin (fastlm/ops/_eager.py):
the custom ops are what torch.compile and opcheck see.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import get_backend, native_backend, resolve
from ..errors import ArgumentError, ArgumentIndexError, ArgumentTypeError
from ..reference import cross_entropy as ref
from ._autocast import no_autocast
from ._eager import EagerTwin, compiling

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------- argument checks

def _check_float_option(fn: str, name: str, value, low: float, high: float = math.inf):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (low <= value <= high):
        bound = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ArgumentError(f"fastlm.{fn}: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_loss_options(fn: str, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """Validate the options shared by cross_entropy and linear_cross_entropy; returns
    (label_smoothing, z_loss, softcap) as floats, softcap 0.0 meaning none."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ArgumentTypeError(f"fastlm.{fn}: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ArgumentError(f"fastlm.{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    label_smoothing = _check_float_option(fn, "label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = _check_float_option(fn, "z_loss", z_loss, 0.0)
    if softcap is None:
        softcap = 0.0
    else:
        softcap = _check_float_option(fn, "softcap", softcap, 0.0)
        if softcap == 0.0:
            raise ArgumentError(f"fastlm.{fn}: softcap must be None or > 0, got {softcap!r}")
    return label_smoothing, z_loss, softcap


def _check_args(input, target, weight):
    fn = "cross_entropy"
    if not isinstance(input, Tensor):
        raise ArgumentTypeError(f"fastlm.{fn}: input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise ArgumentTypeError(f"fastlm.{fn}: input must be a floating-point tensor of logits, "
                                f"got dtype {input.dtype}")
    if input.dim() == 0:
        raise ArgumentError(f"fastlm.{fn}: input must have a class dimension, got a 0-d tensor")
    if not isinstance(target, Tensor):
        raise ArgumentTypeError(f"fastlm.{fn}: target must be a Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise ArgumentError(f"fastlm.{fn}: target is on {target.device} but input is on {input.device}")
    class_dim = 0 if input.dim() == 1 else 1
    classes = input.shape[class_dim]
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ArgumentError(f"fastlm.{fn}: probability targets must have the input's shape {list(input.shape)}, "
                                f"got {list(target.shape)}")
    elif target.dtype in (torch.int64, torch.int32):
        expected = input.shape[:class_dim] + input.shape[class_dim + 1:]
        if target.shape != expected:
            raise ArgumentError(f"fastlm.{fn}: class-index target must have shape {list(expected)} for input of shape "
                                f"{list(input.shape)}, got {list(target.shape)}")
    else:
        raise ArgumentTypeError(f"fastlm.{fn}: target must hold class indices (int64 or int32) or class probabilities "
                                f"(floating point), got dtype {target.dtype}")
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise ArgumentTypeError(f"fastlm.{fn}: weight must be a floating-point Tensor or None")
        if weight.device != input.device:
            raise ArgumentError(f"fastlm.{fn}: weight is on {weight.device} but input is on {input.device}")
        if weight.shape != (classes,):
            raise ArgumentError(f"fastlm.{fn}: weight must have shape [{classes}] (one per class), "
                                f"got {list(weight.shape)}")
    return class_dim, classes


def check_targets_in_range(fn: str, target: Tensor, classes: int, ignore_index: int) -> None:
    """On CPU, a class index outside [0, C) is an error naming it (the check costs nothing
    there); on CUDA it would cost a host sync, so the kernels give that row NaN instead."""
    if target.device.type != "cpu" or target.is_floating_point() or target.numel() == 0:
        return
    lo, hi = torch.aminmax(torch.where(target == ignore_index, 0, target))  # three small ops
    if lo.item() < 0 or hi.item() >= classes:
        bad = (target != ignore_index) & ((target < 0) | (target >= classes))
        value = int(target[bad][0])
        raise ArgumentIndexError(f"fastlm.{fn}: target holds class index {value}, outside [0, {classes}) and "
                                 f"not ignore_index={ignore_index}")


def _triton_unsupported(logits: Tensor, weight: Optional[Tensor]) -> Optional[str]:
    if logits.dtype not in _KERNEL_DTYPES:
        return f"input has dtype {logits.dtype}; the kernel takes float32, float16 and bfloat16"
    if weight is not None and weight.dtype not in _KERNEL_DTYPES:
        return f"weight has dtype {weight.dtype}"
    return None


def _cuda_unsupported(logits: Tensor, weight: Optional[Tensor], target: Optional[Tensor]) -> Optional[str]:
    if weight is not None:
        return "class weights are taken by the Triton kernel only (use the triton backend)"
    if target is not None and target.is_floating_point():
        return "probability targets are taken by the Triton kernel only (use the triton backend)"
    return _triton_unsupported(logits, None)


def pick_backend(fn: str, logits: Tensor, weight: Optional[Tensor], requested: Optional[str] = None,
                 target: Optional[Tensor] = None) -> str:
    device_type = logits.device.type
    if requested is None:
        if native_backend(device_type):  # the common CPU case, before any reason is formed
            return "torch"
    elif requested == "torch" or (requested == "auto" and device_type != "cuda"):
        return "torch"
    return resolve(fn, device_type, {
        "triton": _triton_unsupported(logits, weight),
        "cuda": _cuda_unsupported(logits, weight, target),
    }, requested)


def _cuda_ready(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The CUDA kernels' contract: unit column stride for the logits, int64 targets."""
    if logits.stride(1) != 1 and logits.shape[1] > 1:
        logits = logits.contiguous()
    return logits, target.to(torch.int64)


def _cuda_rows_fwd(logits, target, ignore_index, label_smoothing, z_loss, softcap):
    from fastlm.kernels.launch import empty

    from . import _cuda
    logits, target = _cuda_ready(logits, target)
    rows, classes = logits.shape
    loss, lse, coef = (empty((rows,), torch.float32, logits.device) for _ in range(3))
    with _cuda.device_of(logits):  # launch on the tensor's device, not the current one
        _cuda.load().cross_entropy_fwd(_cuda.dtype_code(logits.dtype), _cuda.addr(logits), _cuda.addr(target),
                                       _cuda.addr(loss), _cuda.addr(lse), _cuda.addr(coef), rows, classes,
                                       logits.stride(0), target.stride(0), ignore_index, float(label_smoothing),
                                       float(z_loss), float(softcap), _cuda.stream(logits))
    return loss, lse, coef


def _cuda_rows_bwd(dloss, logits, target, lse, coef, ignore_index, label_smoothing, softcap, out=None):
    from fastlm.kernels.launch import empty

    from . import _cuda
    src, target = _cuda_ready(logits, target)
    rows, classes = src.shape
    if out is None or (out.stride(1) != 1 and classes > 1) or (out is logits and src is not logits):
        dx = empty((rows, classes), logits.dtype, logits.device)
    else:
        dx = out
    dloss = dloss.float()
    with _cuda.device_of(src):  # launch on the tensor's device, not the current one
        _cuda.load().cross_entropy_bwd(_cuda.dtype_code(src.dtype), _cuda.addr(src), _cuda.addr(target), _cuda.addr(lse),
                                       _cuda.addr(coef), _cuda.addr(dloss), _cuda.addr(dx), rows, classes, src.stride(0),
                                       target.stride(0), dloss.stride(0), dx.stride(0), ignore_index,
                                       float(label_smoothing), float(softcap), _cuda.stream(src))
    if out is not None and dx is not out:
        return out.copy_(dx)
    return dx


# ----------------------------------------------------------------------------- custom ops

def rows_fwd(backend: str, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    """Per-row (loss, lse, coef) on an already chosen backend."""
    if backend == "cuda":
        return _cuda_rows_fwd(logits, target, ignore_index, label_smoothing, z_loss, softcap)
    if backend == "triton":
        from fastlm.kernels import cross_entropy as kernels
        return kernels.cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    return ref.cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)


def rows_fwd_bwd(backend: str, dloss, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                 out=None):
    """(loss, lse, coef, grad) of rows whose upstream gradient ``dloss`` is known at the forward:
    one kernel launch on Triton (each row's logits read for the loss and at once for the
    gradient); on the reference, when ``out`` is the logits, both formed over the logits in
    place (ref.cross_entropy_rows_fwd_bwd); rows_fwd then rows_bwd elsewhere."""
    if backend == "triton":
        from fastlm.kernels import cross_entropy as kernels
        return kernels.cross_entropy_fwd_bwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                                             softcap, dloss, out=out)
    if backend == "torch" and out is logits and ref.fwd_bwd_in_place(logits, target, softcap):
        # The CPU path: the loss and gradient in the logits' own memory, one (R, C) tensor held
        # (``dloss`` None there: the loss alone, the logits overwritten all the same).
        return ref.cross_entropy_rows_fwd_bwd(dloss, logits, target, weight, ignore_index, label_smoothing, z_loss)
    if dloss is None:
        return rows_fwd(backend, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap) + (None,)
    loss, lse, coef = rows_fwd(backend, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    grad = rows_bwd(backend, dloss, logits, target, weight, lse, coef, ignore_index, label_smoothing, softcap,
                    out=out)
    return loss, lse, coef, grad


def rows_bwd(backend: str, dloss, logits, target, weight, lse, coef, ignore_index, label_smoothing, softcap,
             out=None):
    """Gradient of the per-row losses on an already chosen backend (``out``: write it there)."""
    if backend == "cuda":
        return _cuda_rows_bwd(dloss, logits, target, lse, coef, ignore_index, label_smoothing, softcap, out=out)
    if backend == "triton":
        from fastlm.kernels import cross_entropy as kernels
        return kernels.cross_entropy_bwd(dloss, logits, target, weight, lse, coef, ignore_index,
                                         label_smoothing, softcap, out=out)
    grad = ref.cross_entropy_rows_bwd(dloss, logits, target, weight, lse, coef, ignore_index, label_smoothing,
                                      softcap, out=out)
    if out is not None and grad is not out:
        return out.copy_(grad)
    return grad


@no_autocast
def _cross_entropy_body(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                        label_smoothing: float, z_loss: float, softcap: float) -> tuple[Tensor, Tensor, Tensor]:
    check_targets_in_range("cross_entropy", target, logits.shape[1], ignore_index)
    backend = pick_backend("cross_entropy", logits, weight, target=target)
    return rows_fwd(backend, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)


_cross_entropy = torch.library.custom_op("fastlm::cross_entropy", mutates_args=())(_cross_entropy_body)


@_cross_entropy.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    rows = logits.shape[0]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # as the reference
    return tuple(logits.new_empty(rows, dtype=dtype) for _ in range(3))


@no_autocast
def _cross_entropy_bwd_body(dloss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
                            coef: Tensor, ignore_index: int, label_smoothing: float, softcap: float,
                            backend: str) -> Tensor:
    chosen = pick_backend("cross_entropy", logits, weight, backend, target=target)
    return rows_bwd(chosen, dloss, logits, target, weight, lse, coef, ignore_index, label_smoothing, softcap)


_cross_entropy_bwd = torch.library.custom_op("fastlm::cross_entropy_bwd", mutates_args=())(_cross_entropy_bwd_body)


@_cross_entropy_bwd.register_fake
def _(dloss, logits, target, weight, lse, coef, ignore_index, label_smoothing, softcap, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, z_loss, softcap = inputs
    _, lse, coef = output
    ctx.save_for_backward(logits, target, weight, lse, coef)
    ctx.options = (ignore_index, label_smoothing, softcap)
    ctx.backend = get_backend()


def _backward_with(cross_entropy_bwd):
    def backward(ctx, dloss, dlse, dcoef):
        logits, target, weight, lse, coef = ctx.saved_tensors
        ignore_index, label_smoothing, softcap = ctx.options
        dlogits = cross_entropy_bwd(dloss, logits, target, weight, lse, coef, ignore_index, label_smoothing,
                                    softcap, ctx.backend)
        return dlogits, None, None, None, None, None, None
    return backward


_cross_entropy.register_autograd(_backward_with(_cross_entropy_bwd), setup_context=_setup_context)
# Eager calls skip the custom-op dispatch (fastlm/ops/_eager.py); torch.compile sees _cross_entropy.
_cross_entropy_eager = EagerTwin(_cross_entropy, _cross_entropy_body, _setup_context,
                                 _backward_with(_cross_entropy_bwd_body), name="cross_entropy")


# ----------------------------------------------------------------------------- public function

def mean_divisor(target: Tensor, weight: Optional[Tensor], ignore_index: int, rows: int) -> Tensor:
    """torch's divisor for reduction="mean", as a tensor (no host sync), 1 where it would be 0."""
    if target.is_floating_point():
        return torch.full((), float(max(rows, 1)), device=target.device)  # no host-to-device copy
    counted = target != ignore_index
    if weight is None:  # a count: 0 becomes 1 by a clamp
        return counted.sum(dtype=torch.float32).clamp_min_(1.0)
    safe = torch.where(counted, target, 0).clamp(0, weight.shape[0] - 1).long()
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    divisor = (weight.to(acc)[safe] * counted).sum()
    return torch.where(divisor == 0, 1.0, divisor)


def reduce_rows(loss_rows: Tensor, reduction: str, divisor_fn, out_shape, dtype) -> Tensor:
    if reduction == "none":
        return loss_rows.reshape(out_shape).to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / divisor_fn()
    return total.to(dtype)


def _divisor_is_zero(target: Tensor, weight: Optional[Tensor], ignore_index: int) -> bool:
    """Whether torch's "mean" divisor is 0 (a host check: CPU tensors, targets in range)."""
    if target.is_floating_point():
        return target.numel() == 0
    counted = target != ignore_index
    if weight is None:
        return not bool(counted.any())
    return float((weight[torch.where(counted, target, 0)] * counted).sum()) == 0.0


@no_autocast
def _native(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
            label_smoothing: float, classes: int, host: bool, fn: str = "cross_entropy") -> Optional[Tensor]:
    """The "torch" backend without fastlm's extras: torch's own F.cross_entropy (one native
    log_softmax and nll_loss, torch's autograd), with fastlm's two documented differences:

    - "mean" over no counted target (a divisor of 0) gives 0 with zero gradients, where torch
      gives NaN. On CPU (``host``) torch's result is checked for NaN on the host (free there),
      and only a NaN whose divisor is 0 is replaced, by the "sum" (a divisor of 1); elsewhere
      (the "torch" backend on CUDA: no host sync) the loss is formed as sum / divisor.
    - a class index outside [0, C): on CPU torch raises IndexError, re-raised as fastlm's
      ArgumentIndexError (an IndexError and a ValueError) naming the index (the targets are
      scanned only then); elsewhere that row's loss and gradient are NaN (torch never sees
      the index: a device-side assert otherwise).

    None where torch has no native equivalent (class weights or probability targets in
    another dtype than 16-bit logits, which the reference takes in float32): the reference
    serves those. The loss comes back in the input's dtype; autocast is off inside (as in
    the ops' bodies), so a call under autocast computes what it computes without."""
    dtype = input.dtype
    wide = dtype == torch.float32 or dtype == torch.float64  # the reference computes in this dtype
    if weight is not None and weight.dtype != dtype:
        if not wide:
            return None
        weight = weight.to(dtype)
    soft = target.is_floating_point()
    if soft:
        if target.dtype != dtype:
            if not wide:
                return None
            target = target.to(dtype)
    elif target.dtype != torch.int64:
        target = target.long()  # torch takes int64 class indices only
    if not host:
        return _native_device(input, target, weight, ignore_index, reduction, label_smoothing, classes)
    try:
        loss = F.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    except (IndexError, RuntimeError):
        check_targets_in_range(fn, target, classes, ignore_index)  # raises, naming the index
        raise
    if reduction == "mean" and math.isnan(loss.item()) and _divisor_is_zero(target, weight, ignore_index):
        loss = F.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction="sum",
                               label_smoothing=label_smoothing)
    return loss if loss.dtype == dtype else loss.to(dtype)


def _native_device(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                   label_smoothing: float, classes: int) -> Tensor:
    """_native off the host: no host sync, and no out-of-range index ever reaches torch."""
    if target.is_floating_point():
        loss = F.cross_entropy(input, target, weight, reduction="sum" if reduction == "mean" else reduction,
                               label_smoothing=label_smoothing)
        if reduction == "mean":
            loss = loss / max(target.numel() // max(classes, 1), 1)
        return loss.to(input.dtype)
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    # Such a row is computed for class 0, then times NaN: NaN loss and NaN gradient there.
    rows = F.cross_entropy(input, torch.where(bad, 0, target), weight, ignore_index=ignore_index,
                           reduction="none", label_smoothing=label_smoothing)
    rows = rows * torch.where(bad, float("nan"), 1.0)
    if reduction == "none":
        return rows.to(input.dtype)
    loss = rows.sum()
    if reduction == "mean":
        loss = loss / mean_divisor(target.reshape(-1), weight, ignore_index, rows.numel())
    return loss.to(input.dtype)


def as_rows(input: Tensor, target: Tensor, classes: int) -> tuple[Tensor, Tensor, tuple]:
    """(logits (rows, C), targets by row, the per-row loss's shape): the class dim last, a view
    for (N, C) and (C,), a copy for (N, C, d...)."""
    if input.dim() == 1:
        return input.unsqueeze(0), target.unsqueeze(0), ()
    if input.dim() == 2:
        return input, target, target.shape[:1]
    logits = input.movedim(1, -1).reshape(-1, classes)
    tgt = target.movedim(1, -1).reshape(-1, classes) if target.is_floating_point() else target.reshape(-1)
    return logits, tgt, input.shape[:1] + input.shape[2:]


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average: Optional[bool] = None,
                  ignore_index: int = -100, reduce: Optional[bool] = None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: Optional[float] = None,
                  process_group=None) -> Tensor:
    """torch.nn.functional.cross_entropy on fastlm's kernels (torch 2.13's arguments in its
    order, the deprecated size_average and reduce included: given, they set the reduction as
    torch's legacy rule does, with torch's warning), plus the keyword-only z_loss and softcap.

    input (N, C), (C,) or (N, C, d1, ...); target class indices (int64/int32) or class
    probabilities (input's shape). z_loss adds z_loss * logsumexp^2 per counted row;
    softcap applies softcap * tanh(x / softcap) to the logits first. Differences from torch,
    on purpose: when every target is ignored, "mean" gives 0 (torch: NaN); a class index
    out of range raises fastlm.ArgumentIndexError on CPU (an IndexError as torch's, and a
    ValueError) and gives NaN for that row on CUDA. Bad arguments raise what torch raises
    (RuntimeError as a rule: fastlm.errors), naming the argument. Infinite and
    NaN logits (a vocabulary masked with -inf) give torch's result on every backend, its
    inf/NaN included; softcap maps +-inf to +-softcap (fastlm/reference/cross_entropy.py).
    process_group (a torch.distributed group): vocabulary-parallel, input this rank's contiguous
    block of the classes in rank order, targets global class ids (fastlm/ops/vocab_parallel.py).
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if process_group is not None:
        from . import vocab_parallel
        return vocab_parallel.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                            z_loss, softcap, process_group)
    class_dim, classes = _check_args(input, target, weight)
    if target.is_floating_point() and ignore_index != -100:
        raise ArgumentError("fastlm.cross_entropy: ignore_index is not supported with probability targets "
                            "(as in torch)")
    label_smoothing, z_loss, softcap = check_loss_options("cross_entropy", ignore_index, reduction,
                                                          label_smoothing, z_loss, softcap)
    if z_loss == 0.0 and softcap == 0.0 and not compiling():
        device_type = input.device.type
        out = _native(input, target, weight, ignore_index, reduction, label_smoothing, classes,
                      device_type == "cpu") if native_backend(device_type) else None
        if out is not None:
            return out
    logits, tgt, out_shape = as_rows(input, target, classes)
    loss_rows, _, _ = _cross_entropy_eager(logits, tgt, weight, ignore_index, label_smoothing, z_loss, softcap)
    return reduce_rows(loss_rows, reduction, lambda: mean_divisor(tgt, weight, ignore_index, logits.shape[0]),
                  out_shape, input.dtype)
