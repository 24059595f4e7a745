"""The fused lm-head + loss: cross_entropy(input @ weight.T + bias, target) without ever
holding the (N, V) logits or their gradient.

The tokens go in chunks. For each chunk: logits = x_chunk @ weight.T (+ bias) by cuBLAS
(or the CPU's BLAS), the per-row loss by the cross-entropy kernel, and, when gradients are
wanted, the logits' gradient written over the logits in place by the backward kernel, then
folded at once into dx (d @ weight), dweight (+= d.T @ x_chunk) and dbias. Peak extra memory
is one chunk of logits, not N * V.

With reduction "mean" or "sum" the upstream gradient of the loss is a scalar, so the forward
computes the gradients for an upstream gradient of 1 while the logits are at hand (three
matmuls in all, as the unfused path), and the backward only scales them. With "none" the
upstream gradient is per row and unknown at the forward: the backward recomputes each chunk's
logits (one matmul more) and scales rows as it goes.

    fastlm::linear_cross_entropy(x, weight, target, bias?, ..., reduction, compute_grads)
        -> (loss, dx, dweight, dbias)     (grads empty unless compute_grads)
    fastlm::linear_cross_entropy_bwd(dloss, x, weight, target, bias?, ..., backend)
        -> (dx, dweight, dbias)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..backend import get_backend
from ._autocast import autocast_inputs, no_autocast
from .cross_entropy import check_loss_options, check_targets_in_range, mean_divisor, pick_backend, rows_bwd, rows_fwd

_REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: a chunk of logits (chunk x V) about the size of the input (N x H),
    a power of two; so the logits never cost more memory than the activations already do."""
    chunks = max(1, math.ceil(vocab / max(hidden, 1)))
    size = max(1, math.ceil(tokens / chunks))
    return 1 << (size - 1).bit_length()


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _logits(x_chunk: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if bias is None:
        return x_chunk @ weight.t()
    return torch.addmm(bias, x_chunk, weight.t())


def _accumulate_grads(d: Tensor, x_chunk: Tensor, weight: Tensor, dx_chunk: Tensor, dweight: Tensor,
                      dbias: Optional[Tensor]) -> None:
    torch.mm(d, weight, out=dx_chunk)
    dweight.addmm_(d.t(), x_chunk)
    if dbias is not None:
        dbias += d.sum(0, dtype=torch.float32)


@torch.library.custom_op("fastlm::linear_cross_entropy", mutates_args=())
@no_autocast
def _linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int,
                          label_smoothing: float, z_loss: float, softcap: float, chunk_size: int,
                          reduction: int, compute_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_targets_in_range("linear_cross_entropy", target, weight.shape[0], ignore_index)
    backend = pick_backend("linear_cross_entropy", x, None)
    n = x.shape[0]
    loss_rows = torch.empty(n, dtype=torch.float32, device=x.device)
    empty = x.new_empty(0)
    dx, dweight, dbias = empty, empty.clone(), empty.clone()
    if compute_grads:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dweight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        dbias = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device) if bias is not None else empty
        # Upstream gradient of each row's loss for a loss gradient of 1: 1/divisor for "mean".
        scale = (1.0 / mean_divisor(target, None, ignore_index, n)) if reduction == 2 else \
            torch.ones((), device=x.device)
    for start, end in _chunks(n, chunk_size):
        x_chunk, t_chunk = x[start:end], target[start:end]
        logits = _logits(x_chunk, weight, bias)
        loss, lse, coef = rows_fwd(backend, logits, t_chunk, None, ignore_index, label_smoothing, z_loss, softcap)
        loss_rows[start:end] = loss
        if compute_grads:
            d = rows_bwd(backend, scale.expand(end - start), logits, t_chunk, None, lse, coef, ignore_index,
                         label_smoothing, softcap, out=logits)
            _accumulate_grads(d, x_chunk, weight, dx[start:end], dweight,
                              dbias if bias is not None else None)
    if reduction == 0:
        loss_out = loss_rows
    else:
        loss_out = loss_rows.sum()
        if reduction == 2:
            loss_out = loss_out / mean_divisor(target, None, ignore_index, n)
    if bias is not None and compute_grads:
        dbias = dbias.to(bias.dtype)
    return loss_out, dx, dweight, dbias


@_linear_cross_entropy.register_fake
def _(x, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, chunk_size, reduction,
      compute_grads):
    loss = x.new_empty(x.shape[0] if reduction == 0 else (), dtype=torch.float32)
    if not compute_grads:
        return loss, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return (loss, torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), dbias)


@torch.library.custom_op("fastlm::linear_cross_entropy_bwd", mutates_args=())
@no_autocast
def _linear_cross_entropy_bwd(dloss: Tensor, x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                              ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                              chunk_size: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    chosen = pick_backend("linear_cross_entropy", x, None, backend)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dweight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    dbias = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device) if bias is not None else None
    for start, end in _chunks(x.shape[0], chunk_size):
        x_chunk, t_chunk = x[start:end], target[start:end]
        logits = _logits(x_chunk, weight, bias)
        _, lse, coef = rows_fwd(chosen, logits, t_chunk, None, ignore_index, label_smoothing, z_loss, softcap)
        d = rows_bwd(chosen, dloss[start:end], logits, t_chunk, None, lse, coef, ignore_index, label_smoothing,
                     softcap, out=logits)
        _accumulate_grads(d, x_chunk, weight, dx[start:end], dweight, dbias)
    return dx, dweight, (dbias.to(bias.dtype) if bias is not None else x.new_empty(0))


@_linear_cross_entropy_bwd.register_fake
def _(dloss, x, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, chunk_size, backend):
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), dbias)


def _setup_context(ctx, inputs, output):
    x, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, chunk_size, reduction, \
        compute_grads = inputs
    _, dx, dweight, dbias = output
    ctx.precomputed = compute_grads
    ctx.has_bias = bias is not None
    if compute_grads:
        ctx.save_for_backward(dx, dweight, dbias)
    else:
        ctx.save_for_backward(x, weight, target, bias)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_size)
        ctx.reduction = reduction
        ctx.backend = get_backend()


def _backward(ctx, dloss, _ddx, _ddweight, _ddbias):
    if ctx.precomputed:
        dx, dweight, dbias = ctx.saved_tensors
        dx, dweight = dx * dloss.to(dx.dtype), dweight * dloss.to(dweight.dtype)
        dbias = dbias * dloss.to(dbias.dtype) if ctx.has_bias else None
    else:
        x, weight, target, bias = ctx.saved_tensors
        if ctx.reduction != 0:  # a scalar loss whose gradients were not formed in the forward
            if ctx.reduction == 2:
                dloss = dloss / mean_divisor(target, None, ctx.options[0], x.shape[0])
            dloss = dloss.expand(x.shape[0])
        dx, dweight, dbias = _linear_cross_entropy_bwd(dloss, x, weight, target, bias, *ctx.options, ctx.backend)
        dbias = dbias if ctx.has_bias else None
    return dx, dweight, None, dbias, None, None, None, None, None, None, None


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def _check_args(input, weight, target, bias):
    fn = "linear_cross_entropy"
    for name, t in (("input", input), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fastlm.{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"fastlm.{fn}: input must be floating point, got dtype {input.dtype}")
    if input.dim() < 1:
        raise ValueError(f"fastlm.{fn}: input must be (N, H) (or (..., H)), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"fastlm.{fn}: weight must be (V, H) with H = input.shape[-1] = {input.shape[-1]}, "
                         f"got shape {list(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"fastlm.{fn}: weight has dtype {weight.dtype} but input has {input.dtype}; they must match")
    if weight.device != input.device:
        raise ValueError(f"fastlm.{fn}: weight is on {weight.device} but input is on {input.device}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"fastlm.{fn}: target must hold class indices (int64 or int32), got dtype {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise ValueError(f"fastlm.{fn}: target must have shape {list(input.shape[:-1])} (input without its last "
                         f"dim), got {list(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"fastlm.{fn}: target is on {target.device} but input is on {input.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"fastlm.{fn}: bias must be a Tensor of shape [{weight.shape[0]}] or None")
        if bias.dtype != input.dtype:
            raise TypeError(f"fastlm.{fn}: bias has dtype {bias.dtype} but input has {input.dtype}; they must match")
        if bias.device != input.device:
            raise ValueError(f"fastlm.{fn}: bias is on {bias.device} but input is on {input.device}")


def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                         z_loss: float = 0.0, softcap: Optional[float] = None,
                         chunk_size: Optional[int] = None) -> Tensor:
    """cross_entropy(input @ weight.T + bias, target, ...) without materialising the logits.

    input (N, H) or (..., H); weight (V, H) as nn.Linear stores it; target (N,) or (...,)
    class indices; bias (V,) or None. Options as fastlm.cross_entropy (no class weights).
    chunk_size: tokens per chunk (default: chunk logits about the size of the input).
    Gradients flow to input, weight and bias; dweight accumulates across chunks in the
    weight's dtype.
    """
    input, weight, bias = autocast_inputs(input, weight, bias)
    _check_args(input, weight, target, bias)
    label_smoothing, z_loss, softcap = check_loss_options("linear_cross_entropy", ignore_index, reduction,
                                                          label_smoothing, z_loss, softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"fastlm.linear_cross_entropy: chunk_size must be a positive int or None, got {chunk_size!r}")
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1)
    chunk = chunk_size or default_chunk_size(x.shape[0], x.shape[1], weight.shape[0])
    code = _REDUCTION_CODES[reduction]
    wants_grad = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (input, weight, bias))
    loss, _, _, _ = _linear_cross_entropy(x, weight, t, bias, ignore_index, label_smoothing, z_loss, softcap,
                                          chunk, code, wants_grad and code != 0)
    if code == 0:
        loss = loss.reshape(target.shape)
    return loss.to(input.dtype)
