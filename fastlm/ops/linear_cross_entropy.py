"""The fused lm-head + loss: cross_entropy(input @ weight.T + bias, target) without ever
holding the (N, V) logits or their gradient.

The tokens go in chunks. For each chunk: logits = x_chunk @ weight.T (+ bias) by cuBLAS
(or the CPU's BLAS), the per-row loss by the cross-entropy kernel, and, when gradients are
wanted, the logits' gradient written over the logits in place by the backward kernel, then
folded at once into dx (d @ weight), dweight (+= d.T @ x_chunk) and dbias. Peak extra memory
is one chunk of logits, not N * V.

dweight is a sum of one product per chunk: it is accumulated in ``acc_dtype`` (float32 for
16-bit weights by default, the name torch 2.13's LinearCrossEntropyOptions gives this choice)
and cast to the weight's dtype once at the end; a 16-bit running sum would be rounded once
per chunk. On CUDA the float32 sum of 16-bit products is formed by the GEMM itself
(addmm with out_dtype=float32, where torch takes a float32 accumulator there); elsewhere
(CPU BLAS takes no mixed dtypes) the chunk's two factors are up-cast, a chunk-sized copy,
never a (V, H) one.

With reduction "mean" or "sum" the upstream gradient of the loss is a scalar, so the forward
computes the gradients for an upstream gradient of 1 while the logits are at hand (three
matmuls in all, as the unfused path), and the backward only scales them. With "none" the
upstream gradient is per row and unknown at the forward: the backward recomputes each chunk's
logits (one matmul more) and scales rows as it goes.

    fastlm::linear_cross_entropy(x, weight, target, bias?, class_weight?, ..., reduction, compute_grads,
                                 acc_dtype?) -> (loss, dx, dweight, dbias)  (grads empty unless compute_grads)
    fastlm::linear_cross_entropy_bwd(dloss, x, weight, target, bias?, class_weight?, ..., backend, acc_dtype?)
        -> (dx, dweight, dbias)

(Inside the ops ``weight`` is the projection, torch's ``linear_weight``, and ``class_weight``
torch's ``weight``, the per-class rescaling: each row's loss and gradient are scaled by
w[target] by the cross-entropy kernels, and "mean" divides by the summed w of the counted
targets, torch's weighted mean.)

On the "torch" backend (the CPU path) a call without z_loss or softcap whose logits fit in one
chunk (or are small: at most _SMALL_LOGITS elements, when chunk_size is not given) is
F.linear then torch's F.cross_entropy (fastlm.cross_entropy's native path, with its
semantics): one chunk holds the same logits as the unfused path, and torch's autograd is the
cheapest there is. Otherwise the ops run, in eager mode through an EagerTwin
(fastlm/ops/_eager.py); the custom ops are what torch.compile and opcheck see.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import get_backend, native_backend
from ..errors import ArgumentError, ArgumentTypeError
from . import cross_entropy as _ce
from ._autocast import autocast_inputs, no_autocast
from ._eager import EagerTwin, compiling
from .cross_entropy import (check_loss_options, check_targets_in_range, mean_divisor, pick_backend, rows_bwd,
                            rows_fwd, rows_fwd_bwd)
from .cross_entropy_stats import CrossEntropyStats, _argmax_rows, statistics

_REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}
# Logits of at most this many elements (1 MiB in float32) are formed whole on the CPU path
# when chunk_size is not given: below that the chunking saves nothing that matters.
_SMALL_LOGITS = 1 << 18


_CPU_MIN_CHUNK = 256  # rows per chunk at least, on CPU tensors (see linear_cross_entropy)


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


_ACC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Whether this torch's CUDA addmm sums 16-bit products into a float32 accumulator in place
# (addmm(acc, a, b, out_dtype=float32, out=acc)); learnt on the first call that tries it.
_MIXED_ADDMM = {"cuda": None}


def _row_dtype(x: Tensor) -> torch.dtype:
    """Per-row losses and dbias: float32, float64 for float64 inputs (the reference's own)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def resolve_acc_dtype(weight_dtype: torch.dtype, acc_dtype: Optional[torch.dtype]) -> torch.dtype:
    """dweight's accumulator: float32 for 16-bit weights unless asked otherwise."""
    if acc_dtype is not None:
        return acc_dtype
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def _add_weight_grad(dweight: Tensor, d: Tensor, x_chunk: Tensor) -> None:
    """dweight += d.T @ x_chunk, summed in dweight's dtype."""
    if dweight.dtype == d.dtype:
        dweight.addmm_(d.t(), x_chunk)
        return
    if dweight.device.type == "cuda" and dweight.dtype == torch.float32 and _MIXED_ADDMM["cuda"] is not False:
        try:
            torch.addmm(dweight, d.t(), x_chunk, out_dtype=torch.float32, out=dweight)
            _MIXED_ADDMM["cuda"] = True
            return
        except (RuntimeError, TypeError):  # an older torch, or one that wants a 16-bit addend
            _MIXED_ADDMM["cuda"] = False
    dweight.addmm_(d.t().to(dweight.dtype), x_chunk.to(dweight.dtype))


def _accumulate_grads(d: Tensor, x_chunk: Tensor, weight: Tensor, dx_chunk: Tensor, dweight: Tensor,
                      dbias: Optional[Tensor]) -> None:
    torch.mm(d, weight, out=dx_chunk)
    _add_weight_grad(dweight, d, x_chunk)
    if dbias is not None:
        dbias += d.sum(0, dtype=dbias.dtype)


def _skip_mode(backend: str, x: Tensor, skip: bool) -> Optional[str]:
    """How ignored rows are skipped: "device" (Triton: the counted rows sorted to the front and
    counted on the device, the kernels stop at the count; no host sync), "host" (a CPU tensor:
    the count is known for free, the counted rows are gathered), or None (every row computed:
    skip_ignored=False, or the reference on a GPU, where finding the rows would sync)."""
    if not skip:
        return None
    if backend == "torch":
        return "host" if x.device.type == "cpu" else None
    return "device"


class _Rows:
    """The rows a call computes: all of them, or the counted ones (see _skip_mode).

    ``x``, ``target``: the rows in the order the chunks take them; ``count``: a one-element
    int64 device tensor (device mode: only sorted rows before it are live) or None; ``index``:
    where each of those rows goes back to (None: in place)."""

    def __init__(self, mode: Optional[str], x: Tensor, target: Tensor, ignore_index: int):
        self.mode, self.count, self.index = mode, None, None
        self.x, self.target = x, target
        if mode is None:
            return
        counted = target != ignore_index
        if mode == "host":
            index = counted.nonzero().squeeze(1)  # a CPU tensor: nothing to wait for
            if index.numel() == x.shape[0]:
                self.mode = None
                return
        else:
            # Counted rows first, each group in row order: a stable sort of a 0/1 key, all on
            # the device (sort's own temporary storage aside, two (N,) tensors).
            index = torch.sort(torch.logical_not(counted).to(torch.uint8), stable=True).indices
            self.count = counted.sum(dtype=torch.int64).reshape(1)
        self.index = index
        self.x, self.target = x.index_select(0, index), target.index_select(0, index)

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def limit(self, start: int):
        """The kernels' ``limit`` argument for the chunk starting at ``start``."""
        return (self.count, start) if self.mode == "device" else None

    def gather(self, rows: Tensor) -> Tensor:
        """A per-row (N,) tensor in the chunks' order."""
        return rows if self.index is None else rows.index_select(0, self.index)

    def scatter(self, rows: Tensor, n: int) -> Tensor:
        """Per-row results (chunks' order) back in the input's order; rows never computed
        (host mode) are 0, as an ignored row's loss, lse and gradient."""
        if self.index is None:
            return rows
        if self.mode == "host":
            out = rows.new_zeros((n,) + rows.shape[1:])
        else:
            out = torch.empty((n,) + rows.shape[1:], dtype=rows.dtype, device=rows.device)
        return out.index_copy_(0, self.index, rows)


def _chunk_loss(backend: str, dloss: Optional[Tensor], logits: Tensor, target: Tensor, class_weight, ignore_index,
                label_smoothing, z_loss, softcap, stats: bool, limit):
    """One chunk's (loss, lse, grad, argmax): grad (over the logits, in place) only with
    ``dloss``, argmax (int32) only with ``stats``; the kernels' LIMIT with ``limit``."""
    if backend == "triton":
        from fastlm.kernels import cross_entropy as kernels
        if dloss is not None:
            r = kernels.cross_entropy_fwd_bwd(logits, target, class_weight, ignore_index, label_smoothing, z_loss,
                                              softcap, dloss, out=logits, stats=stats, limit=limit)
            return r[0], r[1], r[3], (r[4] if stats else None)
        r = kernels.cross_entropy_fwd(logits, target, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                                      stats=stats, limit=limit)
        return r[0], r[1], None, (r[3] if stats else None)
    # The reference (CPU path) and the CUDA backend: the argmax before the logits are overwritten.
    arg = _argmax_rows(logits, softcap) if stats else None
    if dloss is None and backend != "torch":
        loss, lse, _ = rows_fwd(backend, logits, target, class_weight, ignore_index, label_smoothing, z_loss, softcap)
        return loss, lse, None, arg
    # (dloss None on the reference: the loss over the logits in place, one chunk held.)
    loss, lse, _, d = rows_fwd_bwd(backend, dloss, logits, target, class_weight, ignore_index, label_smoothing,
                                   z_loss, softcap, out=logits)
    return loss, lse, d, arg


def _plan(fn: str, x: Tensor, class_weight, stats: bool, skip_ignored: bool,
          requested: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(backend, skip mode) of a call. The statistics' argmax and the live-row limit are in the
    Triton kernels only: the CUDA backend's choice runs them there."""
    backend = pick_backend(fn, x, class_weight, requested)
    skip = _skip_mode("triton" if backend == "cuda" else backend, x, skip_ignored)
    if backend == "cuda" and (stats or skip == "device"):
        backend = "triton"
    return backend, skip


@no_autocast
def _lce_forward(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], class_weight: Optional[Tensor],
                 ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, chunk_size: int,
                 reduction: int, compute_grads: bool, acc_dtype: Optional[torch.dtype], skip_ignored: bool,
                 stats: bool):
    """(loss, dx, dweight, dbias, lse_rows, argmax_rows); the last two empty unless ``stats``."""
    fn = "linear_cross_entropy_with_stats" if stats else "linear_cross_entropy"
    check_targets_in_range(fn, target, weight.shape[0], ignore_index)
    backend, skip = _plan(fn, x, class_weight, stats, skip_ignored)
    n = x.shape[0]
    rdt = _row_dtype(x)
    rows = _Rows(skip, x, target, ignore_index)
    loss_rows = torch.empty(rows.n, dtype=rdt, device=x.device)
    lse_rows = torch.empty(rows.n if stats else 0, dtype=rdt, device=x.device)
    arg_rows = torch.empty(rows.n if stats else 0, dtype=torch.int32, device=x.device)
    empty = x.new_empty(0)
    dx, dweight, dbias = empty, empty.clone(), empty.clone()
    divisor = mean_divisor(target, class_weight, ignore_index, n) if reduction == 2 else None
    device_rows = rows.mode == "device"
    if device_rows:
        from fastlm.kernels import lce_matmul
    if compute_grads:
        dx = torch.empty((rows.n, x.shape[1]), dtype=x.dtype, device=x.device)
        dweight = torch.zeros(weight.shape, dtype=resolve_acc_dtype(weight.dtype, acc_dtype), device=x.device)
        dbias = torch.zeros(weight.shape[0], dtype=rdt, device=x.device) if bias is not None else empty
        # Upstream gradient of each row's loss for a loss gradient of 1: 1/divisor for "mean".
        scale = (1.0 / divisor.to(rdt)) if reduction == 2 else torch.ones((), dtype=rdt, device=x.device)
    for start, end in _chunks(rows.n, chunk_size):
        x_chunk, t_chunk = rows.x[start:end], rows.target[start:end]
        limit = rows.limit(start)
        logits = lce_matmul.logits_rows(x_chunk, weight, bias, *limit) if device_rows \
            else _logits(x_chunk, weight, bias)
        dl = scale.expand(end - start) if compute_grads else None
        loss, lse, d, arg = _chunk_loss(backend, dl, logits, t_chunk, class_weight, ignore_index, label_smoothing,
                                        z_loss, softcap, stats, limit)
        loss_rows[start:end] = loss
        if stats:
            lse_rows[start:end] = lse
            arg_rows[start:end] = arg
        if compute_grads:
            if device_rows:
                lce_matmul.dx_rows(d, weight, *limit, out=dx[start:end])
                lce_matmul.dweight_rows(d, x_chunk, *limit, dweight, dbias if bias is not None else None)
            else:
                _accumulate_grads(d, x_chunk, weight, dx[start:end], dweight, dbias if bias is not None else None)
        # Let this chunk's logits go before the next chunk's are formed (else two are held at once).
        logits = d = None
    loss_rows = rows.scatter(loss_rows, n)
    if reduction == 0:
        loss_out = loss_rows
    else:
        loss_out = loss_rows.sum()
        if reduction == 2:
            loss_out = loss_out / divisor
    if compute_grads:
        dx = rows.scatter(dx, n)
        dweight = dweight.to(weight.dtype)  # the one rounding of the sum
        if bias is not None:
            dbias = dbias.to(bias.dtype)
    if stats:
        lse_rows, arg_rows = rows.scatter(lse_rows, n), rows.scatter(arg_rows, n)
    return loss_out, dx, dweight, dbias, lse_rows, arg_rows


def _linear_cross_entropy_body(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                               class_weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
                               z_loss: float, softcap: float, chunk_size: int, reduction: int, compute_grads: bool,
                               acc_dtype: Optional[torch.dtype] = None,
                               skip_ignored: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _lce_forward(x, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                        chunk_size, reduction, compute_grads, acc_dtype, skip_ignored, False)[:4]


def _linear_cross_entropy_stats_body(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                                     class_weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
                                     z_loss: float, softcap: float, chunk_size: int, reduction: int,
                                     compute_grads: bool, acc_dtype: Optional[torch.dtype] = None,
                                     skip_ignored: bool = True
                                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _lce_forward(x, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                        chunk_size, reduction, compute_grads, acc_dtype, skip_ignored, True)


_linear_cross_entropy = torch.library.custom_op("fastlm::linear_cross_entropy",
                                                mutates_args=())(_linear_cross_entropy_body)
_linear_cross_entropy_stats = torch.library.custom_op("fastlm::linear_cross_entropy_with_stats",
                                                      mutates_args=())(_linear_cross_entropy_stats_body)


def _fake(x, weight, target, bias, compute_grads, reduction):
    loss = x.new_empty(x.shape[0] if reduction == 0 else (), dtype=_row_dtype(x))
    if not compute_grads:
        return loss, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return (loss, torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), dbias)


@_linear_cross_entropy.register_fake
def _(x, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap, chunk_size, reduction,
      compute_grads, acc_dtype=None, skip_ignored=True):
    return _fake(x, weight, target, bias, compute_grads, reduction)


@_linear_cross_entropy_stats.register_fake
def _(x, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap, chunk_size, reduction,
      compute_grads, acc_dtype=None, skip_ignored=True):
    n = x.shape[0]
    return _fake(x, weight, target, bias, compute_grads, reduction) + (
        x.new_empty(n, dtype=_row_dtype(x)), x.new_empty(n, dtype=torch.int32))


@no_autocast
def _linear_cross_entropy_bwd_body(dloss: Tensor, x: Tensor, weight: Tensor, target: Tensor,
                                   bias: Optional[Tensor], class_weight: Optional[Tensor], ignore_index: int,
                                   label_smoothing: float, z_loss: float, softcap: float, chunk_size: int,
                                   backend: str, acc_dtype: Optional[torch.dtype] = None,
                                   skip_ignored: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    fn = "linear_cross_entropy"
    chosen, skip = _plan(fn, x, class_weight, False, skip_ignored, backend)
    rows = _Rows(skip, x, target, ignore_index)
    device_rows = rows.mode == "device"
    if device_rows:
        from fastlm.kernels import lce_matmul
    dloss = rows.gather(dloss.expand(x.shape[0]))
    dx = torch.empty((rows.n, x.shape[1]), dtype=x.dtype, device=x.device)
    dweight = torch.zeros(weight.shape, dtype=resolve_acc_dtype(weight.dtype, acc_dtype), device=x.device)
    dbias = torch.zeros(weight.shape[0], dtype=_row_dtype(x), device=x.device) if bias is not None else None
    for start, end in _chunks(rows.n, chunk_size):
        x_chunk, t_chunk = rows.x[start:end], rows.target[start:end]
        limit = rows.limit(start)
        if device_rows:
            from fastlm.kernels import cross_entropy as kernels
            logits = lce_matmul.logits_rows(x_chunk, weight, bias, *limit)
            _, lse, coef = kernels.cross_entropy_fwd(logits, t_chunk, class_weight, ignore_index, label_smoothing,
                                                     z_loss, softcap, limit=limit)
            d = kernels.cross_entropy_bwd(dloss[start:end], logits, t_chunk, class_weight, lse, coef, ignore_index,
                                          label_smoothing, softcap, out=logits, limit=limit)
            lce_matmul.dx_rows(d, weight, *limit, out=dx[start:end])
            lce_matmul.dweight_rows(d, x_chunk, *limit, dweight, dbias)
        else:
            logits = _logits(x_chunk, weight, bias)
            if chosen == "torch":  # the CPU path: loss and gradient over the logits in place, one chunk held
                d = rows_fwd_bwd(chosen, dloss[start:end], logits, t_chunk, class_weight, ignore_index,
                                 label_smoothing, z_loss, softcap, out=logits)[3]
            else:
                _, lse, coef = rows_fwd(chosen, logits, t_chunk, class_weight, ignore_index, label_smoothing,
                                        z_loss, softcap)
                d = rows_bwd(chosen, dloss[start:end], logits, t_chunk, class_weight, lse, coef, ignore_index,
                             label_smoothing, softcap, out=logits)
            _accumulate_grads(d, x_chunk, weight, dx[start:end], dweight, dbias)
        logits = d = None  # (one chunk of logits held at a time, as in the forward)
    return rows.scatter(dx, x.shape[0]), dweight.to(weight.dtype), \
        (dbias.to(bias.dtype) if bias is not None else x.new_empty(0))


_linear_cross_entropy_bwd = torch.library.custom_op("fastlm::linear_cross_entropy_bwd",
                                                    mutates_args=())(_linear_cross_entropy_bwd_body)


@_linear_cross_entropy_bwd.register_fake
def _(dloss, x, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
      backend, acc_dtype=None, skip_ignored=True):
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), dbias)


_N_INPUTS = 14  # the forward ops' arguments (one None each in the backward)


def _setup_context(ctx, inputs, output):
    x, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap, chunk_size, reduction, \
        compute_grads, acc_dtype, skip_ignored = inputs
    dx, dweight, dbias = output[1:4]
    # The gradient outputs are internal (the public function returns the loss only), so
    # theirs never carry a gradient: left unmaterialised, autograd does not fill a (V, H) zeros
    # for dweight's (and an (N, H) one for dx's) before every backward.
    ctx.set_materialize_grads(False)
    ctx.precomputed = compute_grads
    ctx.has_bias = bias is not None
    if compute_grads:
        ctx.save_for_backward(dx, dweight, dbias)
    else:
        ctx.save_for_backward(x, weight, target, bias, class_weight)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_size)
        ctx.reduction = reduction
        ctx.backend = get_backend()
        ctx.acc_dtype = acc_dtype
        ctx.skip_ignored = skip_ignored


# Whether the running backward keeps its graph (retain_graph); torch builds without it always copy.
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _backward_with(linear_cross_entropy_bwd, eager: bool = False):
    """The autograd formula. ``eager`` (the EagerTwin's, never traced): on a CPU an upstream
    gradient of exactly 1 (a plain loss.backward(), read on the host for free) hands the
    precomputed gradients on as they are, without a scaled copy: a (V, H) dweight less at the
    backward's peak (autograd moves it into weight.grad). Only when the graph is not kept: with
    retain_graph the saved gradients would be weight.grad itself, and a grad zeroed in place
    would change what the next backward hands on. The with-stats op's extra outputs (lse,
    argmax) carry no gradient."""
    def backward(ctx, dloss, *_internal):
        if dloss is None:  # (only the internal outputs were used: nothing flows to the inputs)
            return (None,) * _N_INPUTS
        if ctx.precomputed:
            dx, dweight, dbias = ctx.saved_tensors
            if not (eager and dloss.device.type == "cpu" and _keep_graph is not None and not _keep_graph()
                    and dloss.item() == 1.0):
                dx, dweight = dx * dloss.to(dx.dtype), dweight * dloss.to(dweight.dtype)
                dbias = dbias * dloss.to(dbias.dtype)
            dbias = dbias if ctx.has_bias else None
        else:
            x, weight, target, bias, class_weight = ctx.saved_tensors
            if ctx.reduction != 0:  # a scalar loss whose gradients were not formed in the forward
                if ctx.reduction == 2:
                    dloss = dloss / mean_divisor(target, class_weight, ctx.options[0], x.shape[0])
                dloss = dloss.expand(x.shape[0])
            dx, dweight, dbias = linear_cross_entropy_bwd(dloss, x, weight, target, bias, class_weight, *ctx.options,
                                                          ctx.backend, ctx.acc_dtype, ctx.skip_ignored)
            dbias = dbias if ctx.has_bias else None
        # No gradient for the class weights: torch has none either (nll_loss's weight is not differentiable).
        return (dx, dweight, None, dbias) + (None,) * (_N_INPUTS - 4)
    return backward


_linear_cross_entropy.register_autograd(_backward_with(_linear_cross_entropy_bwd), setup_context=_setup_context)
_linear_cross_entropy_stats.register_autograd(_backward_with(_linear_cross_entropy_bwd),
                                              setup_context=_setup_context)
# Eager calls skip the custom-op dispatch (fastlm/ops/_eager.py); torch.compile sees the custom op.
_linear_cross_entropy_eager = EagerTwin(_linear_cross_entropy, _linear_cross_entropy_body, _setup_context,
                                        _backward_with(_linear_cross_entropy_bwd_body, eager=True),
                                        name="linear_cross_entropy")
_linear_cross_entropy_stats_eager = EagerTwin(_linear_cross_entropy_stats, _linear_cross_entropy_stats_body,
                                              _setup_context,
                                              _backward_with(_linear_cross_entropy_bwd_body, eager=True),
                                              name="linear_cross_entropy_with_stats")


# torch 2.13's options dataclass; older torch (the GPU machine's 2.11) has none, and then
# options must be None.
_Options = getattr(torch.nn, "LinearCrossEntropyOptions", None)


def _like_input(fn: str, name: str, t: Tensor, input: Tensor) -> None:
    """t has input's dtype and device (the matmul takes no mixed operands)."""
    if t.dtype != input.dtype:
        raise ArgumentTypeError(f"fastlm.{fn}: {name} has dtype {t.dtype} but input has {input.dtype}; "
                                f"they must match")
    if t.device != input.device:
        raise ArgumentError(f"fastlm.{fn}: {name} is on {t.device} but input is on {input.device}")


def _check_args(input, linear_weight, target, linear_bias, weight):
    """Shapes as torch 2.13's F.linear_cross_entropy takes them, with fastlm's one extension:
    input may have any number of batch dims (..., H), not only (H,) or (N, H). Returns
    (out_features, probabilities): the K trailing dims of a K-dimensional loss and whether
    the target holds class probabilities (a floating dtype) rather than indices."""
    fn = "linear_cross_entropy"
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"fastlm.{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if not input.is_floating_point():
        raise ArgumentTypeError(f"fastlm.{fn}: input must be floating point, got dtype {input.dtype}")
    if input.dim() < 1:
        raise ArgumentError(f"fastlm.{fn}: input must be (N, H) (or (..., H)), got a 0-d tensor")
    if linear_weight.dim() < 2 or linear_weight.shape[-1] != input.shape[-1]:
        raise ArgumentError(f"fastlm.{fn}: linear_weight must be (C, H) (or (C, d1, ..., dK, H)) with H = "
                            f"input.shape[-1] = {input.shape[-1]}, got shape {list(linear_weight.shape)}")
    _like_input(fn, "linear_weight", linear_weight, input)
    classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    batch = tuple(input.shape[:-1])
    if out_features and not batch:
        raise ArgumentError(f"fastlm.{fn}: a K-dimensional loss (linear_weight of shape {list(linear_weight.shape)}) "
                            f"needs batched input (N, {input.shape[-1]}), got shape {list(input.shape)}")
    probabilities = target.is_floating_point()
    if probabilities:
        expected = batch + (classes,) + out_features
        if target.shape != expected:
            raise ArgumentError(f"fastlm.{fn}: probability targets must have the logits' shape {list(expected)}, "
                                f"got {list(target.shape)}")
    elif target.dtype in (torch.int64, torch.int32):
        if target.shape != batch + out_features:
            raise ArgumentError(f"fastlm.{fn}: target must have shape {list(batch + out_features)} (input without "
                                f"its last dim, then linear_weight's dims between C and H), got {list(target.shape)}")
    else:
        raise ArgumentTypeError(f"fastlm.{fn}: target must hold class indices (int64 or int32) or class probabilities "
                                f"(floating point), got dtype {target.dtype}")
    if target.device != input.device:
        raise ArgumentError(f"fastlm.{fn}: target is on {target.device} but input is on {input.device}")
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor) or linear_bias.shape != linear_weight.shape[:-1]:
            got = list(linear_bias.shape) if isinstance(linear_bias, Tensor) else type(linear_bias).__name__
            raise ArgumentError(f"fastlm.{fn}: linear_bias must be a Tensor of shape {list(linear_weight.shape[:-1])} "
                                f"or None, got {got}")
        _like_input(fn, "linear_bias", linear_bias, input)
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise ArgumentTypeError(f"fastlm.{fn}: weight (the class weights) must be a floating-point Tensor or None")
        if weight.shape != (classes,):
            raise ArgumentError(f"fastlm.{fn}: weight (the class weights) must have shape [{classes}], one per class, "
                                f"got {list(weight.shape)}")
        if weight.device != input.device:
            raise ArgumentError(f"fastlm.{fn}: weight is on {weight.device} but input is on {input.device}")
    return out_features, probabilities


def _from_options(options, n: int, hidden: int, vocab: int, dtype: torch.dtype, chunk_size: Optional[int],
                  acc_dtype: Optional[torch.dtype]) -> tuple[Optional[int], Optional[torch.dtype]]:
    """torch 2.13's LinearCrossEntropyOptions on fastlm's knobs: (chunk_size, acc_dtype).

    - batch_chunk_size / chunking_method -> chunk_size. "aspect_ratio" is fastlm's own default
      rule (default_chunk_size: a logits chunk the size of the input), "aspect_ratio:N" that
      divided by N; "auto" leaves fastlm's default (the CPU floor included); None takes
      batch_chunk_size (None: one chunk). The two given and disagreeing is torch's ValueError.
    - acc_dtype -> acc_dtype, the dtype dweight is summed in across chunks: what torch's
      "balanced" policy keeps in acc_dtype (a (V, H) scratch). fastlm's kernels form the
      per-chunk softmax and its gradient in float32 whatever the policy. An explicit policy
      without acc_dtype resolves to the input's dtype, as in torch; "auto" to fastlm's default
      (float32 for 16-bit inputs, torch's "auto" pick too).
    - acc_policy "auto" and "balanced" are fastlm's scheme; "compact" (no scratch) sums dweight
      in the weight's dtype, per chunk; "accurate" (the logits and the input gradient in
      acc_dtype too) is not implemented where it differs, i.e. where acc_dtype is not the
      input's dtype: NotImplementedError.
    - allow_retain_graph: honoured always; fastlm's backward scales saved gradients without
      consuming them, so a second backward works whatever the flag.
    A chunk_size or acc_dtype given beside options must agree with them (ValueError)."""
    fn = "fastlm.linear_cross_entropy"
    if _Options is None or not isinstance(options, _Options):
        raise ArgumentTypeError(f"{fn}: options must be None or a torch.nn.LinearCrossEntropyOptions, got "
                                f"{type(options).__name__}")
    size, method = options.batch_chunk_size, options.chunking_method
    if method == "auto" and size is not None:  # torch's rule: an explicit size turns the heuristic off
        method = None
    if method == "auto":
        mapped_chunk = None
    elif method is None:
        mapped_chunk = max(1, min(size, n)) if size is not None else max(n, 1)
    else:
        factor = int(method.partition(":")[2] or 1)  # validated by the dataclass
        mapped_chunk = max(1, min(default_chunk_size(n, hidden, vocab) // factor, n))
        if size is not None and size != mapped_chunk:
            raise ArgumentError(f"{fn}: options.batch_chunk_size (={size}) and options.chunking_method ({method!r}) "
                                f"give different chunk sizes ({size} vs {mapped_chunk}); pass only one")
    if chunk_size is not None and mapped_chunk is not None and chunk_size != mapped_chunk:
        raise ArgumentError(f"{fn}: chunk_size={chunk_size} disagrees with options' chunking ({mapped_chunk} rows); "
                            f"pass one of them")
    policy = options.acc_policy
    acc = options.acc_dtype if options.acc_dtype is not None or policy == "auto" else dtype
    if policy == "accurate" and acc is not None and acc != dtype:
        raise NotImplementedError(f"{fn}: options.acc_policy='accurate' (the logits and input gradient kept in "
                                  f"acc_dtype={acc}) is not implemented; fastlm's scheme is 'balanced' (dweight "
                                  f"summed in acc_dtype, the softmax in float32)")
    if policy == "compact":
        acc = dtype  # no (V, H) scratch: each chunk's product is added into dweight in its own dtype
    if acc is not None and acc_dtype is not None and acc != acc_dtype:
        raise ArgumentError(f"{fn}: acc_dtype={acc_dtype} disagrees with options (acc_policy={policy!r}, "
                            f"acc_dtype={options.acc_dtype}: {acc}); pass one of them")
    if acc is not None and acc_dtype is None and acc == resolve_acc_dtype(dtype, None):
        acc = None  # fastlm's default: keeps the unfused small-logits path open
    return (chunk_size if mapped_chunk is None else mapped_chunk), (acc_dtype if acc is None else acc)


@no_autocast
def _native(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], class_weight: Optional[Tensor],
            ignore_index: int, reduction: str, label_smoothing: float) -> Optional[Tensor]:
    """The unfused path for logits that fit in one chunk: F.linear, then fastlm.cross_entropy's
    native path (torch's F.cross_entropy with fastlm's semantics), autocast off as in the op."""
    return _ce._native(F.linear(x, weight, bias), target, class_weight, ignore_index, reduction, label_smoothing,
                       weight.shape[0], x.device.type == "cpu", "linear_cross_entropy")


def _native_with_stats(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                       class_weight: Optional[Tensor], ignore_index: int, reduction: str, label_smoothing: float,
                       skip_ignored: bool, out_shape) -> Optional[tuple[Tensor, CrossEntropyStats]]:
    """_native and the statistics from its logits, which that path forms whole anyway (they
    are small): the loss and gradients are then exactly linear_cross_entropy's, where the
    chunked path's loss can differ from torch's in the last bit. No host sync beyond _native's."""
    logits = F.linear(x, weight, bias)
    loss = _ce._native(logits, target, class_weight, ignore_index, reduction, label_smoothing, weight.shape[0],
                       x.device.type == "cpu", "linear_cross_entropy_with_stats")
    if loss is None:
        return None
    with torch.no_grad():
        d = logits.detach()
        lse = torch.logsumexp(d.to(_row_dtype(x)), dim=-1)
        if skip_ignored:  # as the fused path: an ignored row's logits are skipped there, its lse 0
            lse = torch.where(target != ignore_index, lse, 0.0)
        correct = _argmax_rows(d, 0.0) == target
    if reduction == "none":
        loss = loss.reshape(out_shape)

    def divisor_fn():
        return mean_divisor(target, class_weight, ignore_index, x.shape[0])
    return loss, statistics(lse, correct, target, ignore_index, 0.0, reduction, divisor_fn, out_shape, x.dtype)


def _unfused(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
             weight: Optional[Tensor], reduction: str, ignore_index: int, label_smoothing: float, z_loss: float,
             softcap: Optional[float], probabilities: bool) -> Tensor:
    """A K-dimensional loss or probability targets: the logits whole, then fastlm.cross_entropy
    (as torch 2.13 does: its chunked path also forms these unfused). The logits are
    (N, C, d1, ..., dK), the class dim second, as cross_entropy takes them."""
    hidden, classes = input.shape[-1], linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    batch = input.shape[:-1]
    x = input.reshape(-1, hidden)
    n = x.shape[0]
    logits = F.linear(x, linear_weight.reshape(-1, hidden),
                      linear_bias.reshape(-1) if linear_bias is not None else None)
    logits = logits.reshape((n, classes) + out_features)
    tgt = target.reshape((n, classes) + out_features if probabilities else (n,) + out_features)
    loss = _ce.cross_entropy(logits, tgt, weight, ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    return loss.reshape(tuple(batch) + out_features) if reduction == "none" else loss


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         reduction: str = "mean", ignore_index: Optional[int] = None, label_smoothing: float = 0.0,
                         options=None, z_loss: float = 0.0, softcap: Optional[float] = None,
                         chunk_size: Optional[int] = None, acc_dtype: Optional[torch.dtype] = None,
                         out_dtype: Optional[torch.dtype] = None, skip_ignored: bool = True,
                         process_group=None) -> Tensor:
    """torch.nn.functional.linear_cross_entropy (torch 2.13: its arguments, names and defaults)
    without materialising the logits: cross_entropy(linear(input, linear_weight, linear_bias),
    target, weight, ...), plus fastlm's keyword-only z_loss, softcap, chunk_size, acc_dtype.

    input (N, H), (H,) or (..., H) (more batch dims than torch takes); linear_weight (C, H)
    as nn.Linear stores it, or (C, d1, ..., dK, H) for a K-dimensional loss; target class
    indices (int64/int32) of shape input.shape[:-1] (+ (d1, ..., dK)) or class probabilities
    of the logits' shape; linear_bias linear_weight.shape[:-1] or None; weight the class
    weights (C,) ("mean" divides by the summed weights of the counted targets, as torch).
    ignore_index None is torch's: -100 for class indices, and no ignoring allowed with
    probabilities. options (torch's LinearCrossEntropyOptions) maps onto chunk_size and
    acc_dtype (see _from_options); fastlm chunks whether or not it is given.

    Class indices with a (C, H) weight take the fused path: gradients flow to input,
    linear_weight and linear_bias, chunk by chunk (chunk_size tokens; default a chunk of
    logits about the size of the input). acc_dtype: the dtype dweight accumulates in across
    chunks (float16, bfloat16, float32 or float64), cast to the weight's dtype once at the
    end; default float32 for 16-bit weights, else the weight's dtype. (A float32 sum holds 4
    bytes per weight element while the op runs; acc_dtype=weight.dtype saves that and rounds
    the sum once per chunk.) out_dtype: the loss's dtype (default the input's, as torch;
    torch.float32 gives a 16-bit model its loss unrounded, as Hugging Face's loss is: the
    kernels compute it in float32 anyway). A K-dimensional loss or probability targets form the logits
    whole (torch's chunked path falls back there too). Differences from torch, as in
    fastlm.cross_entropy: "mean" over no counted target gives 0 (torch: NaN); a class index
    out of range raises fastlm.ArgumentIndexError (an IndexError) on CPU, NaN for that row on
    CUDA.

    skip_ignored (default True): rows whose target is ignore_index cost no lm-head matmul
    and no loss work. On a GPU (the Triton kernels) the counted rows are sorted to the front
    and counted on the device and every kernel stops at the count: no host sync, so a batch
    with 15% counted rows does about 15% of the work; the three matmuls are then fastlm's
    Triton ones (kernels/lce_matmul.py), not cuBLAS. False keeps cuBLAS and computes every
    row (for batches with few or no ignored targets). On a CPU the counted rows are gathered
    (the count is free there).

    process_group (a torch.distributed group): a vocabulary-parallel lm-head. linear_weight
    (and linear_bias, weight) are this rank's contiguous block of the classes, in rank order;
    input and target (global class ids) are the same on every rank. The loss, the same on
    every rank, is the single-process loss over the whole head; linear_weight's (and
    linear_bias') gradients are this rank's blocks, and input's gradient is the full one,
    already summed over the group (do not all-reduce it again). fastlm/ops/vocab_parallel.py.
    """
    return _linear_cross_entropy_call(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                      label_smoothing, options, z_loss, softcap, chunk_size, acc_dtype, out_dtype,
                                      skip_ignored, process_group, False)


def linear_cross_entropy_with_stats(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                                    linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                                    reduction: str = "mean", ignore_index: Optional[int] = None,
                                    label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                                    softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                                    acc_dtype: Optional[torch.dtype] = None, out_dtype: Optional[torch.dtype] = None,
                                    skip_ignored: bool = True, process_group=None
                                    ) -> tuple[Tensor, CrossEntropyStats]:
    """fastlm.linear_cross_entropy (every argument, the same loss and gradients) and its
    :class:`~fastlm.CrossEntropyStats` (lse, z-loss term, accuracy), as
    fastlm.cross_entropy_with_stats gives them, from the same pass over each chunk of logits
    (the loss kernel's STATS variant tracks each row's argmax) and with no host sync.

    Class-index targets only (ArgumentError for probabilities). An ignored row's lse is 0
    when its logits are skipped (skip_ignored, the default): they are never formed.
    """
    return _linear_cross_entropy_call(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                      label_smoothing, options, z_loss, softcap, chunk_size, acc_dtype, out_dtype,
                                      skip_ignored, process_group, True)


def _linear_cross_entropy_call(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                               label_smoothing, options, z_loss, softcap, chunk_size, acc_dtype, out_dtype,
                               skip_ignored, process_group, stats):
    fn = "linear_cross_entropy_with_stats" if stats else "linear_cross_entropy"
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        input, linear_weight, linear_bias = autocast_inputs(input, linear_weight, linear_bias)
    out_features, probabilities = _check_args(input, linear_weight, target, linear_bias, weight)
    if probabilities and stats:
        raise ArgumentError(f"fastlm.{fn}: target must hold class indices; probability targets have no accuracy "
                            f"(use fastlm.linear_cross_entropy)")
    if probabilities and ignore_index is not None:
        raise ArgumentError(f"fastlm.{fn}: ignore_index cannot be specified when target contains "
                            "probabilities (as in torch)")
    ignore_index = -100 if ignore_index is None else ignore_index
    label_smoothing, z_loss, softcap = check_loss_options(fn, ignore_index, reduction, label_smoothing, z_loss,
                                                          softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ArgumentError(f"fastlm.{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if acc_dtype is not None and acc_dtype not in _ACC_DTYPES:
        raise ArgumentTypeError(f"fastlm.{fn}: acc_dtype must be None or one of "
                                f"{[str(d) for d in _ACC_DTYPES]}, got {acc_dtype!r}")
    if not isinstance(skip_ignored, bool):
        raise ArgumentTypeError(f"fastlm.{fn}: skip_ignored must be a bool, got {skip_ignored!r}")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise ArgumentTypeError(f"fastlm.{fn}: out_dtype must be None or a floating dtype, got {out_dtype!r}")
    x = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
    n, vocab = x.shape[0], linear_weight.shape[0]
    if options is not None:
        chunk_size, acc_dtype = _from_options(options, n, x.shape[1], vocab, input.dtype, chunk_size, acc_dtype)
    if process_group is not None:
        if out_features or probabilities:
            raise ArgumentError(f"fastlm.{fn}: process_group takes a (C, H) linear_weight and class-index targets")
        from . import vocab_parallel
        t = target if target.dim() == 1 else target.reshape(-1)
        result = vocab_parallel.linear_cross_entropy(x, linear_weight, t, linear_bias, weight, ignore_index,
                                                     reduction, label_smoothing, z_loss, softcap or None,
                                                     chunk_size, process_group, stats=stats)
        loss, st = result if stats else (result, None)
        if reduction == "none":
            loss = loss.reshape(target.shape)
        loss = loss.to(out_dtype or input.dtype)
        if not stats:
            return loss
        return loss, st._replace(lse=st.lse.reshape(target.shape))
    if out_features:
        if stats:
            raise ArgumentError(f"fastlm.{fn}: a K-dimensional loss is not supported with statistics")
        loss = _unfused(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                        label_smoothing, z_loss, softcap or None, probabilities)
        return loss if out_dtype is None else loss.to(out_dtype)
    if probabilities:
        loss = _unfused(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                        label_smoothing, z_loss, softcap or None, probabilities)
        return loss if out_dtype is None else loss.to(out_dtype)
    t = target if target.dim() == 1 else target.reshape(-1)
    if z_loss == 0.0 and softcap == 0.0 and acc_dtype is None and not compiling() \
            and out_dtype in (None, input.dtype) and native_backend(input.device.type) \
            and (n <= chunk_size if chunk_size is not None else n * vocab <= _SMALL_LOGITS):
        if stats:  # the same path, so that the loss and gradients stay linear_cross_entropy's bit for bit
            result = _native_with_stats(x, linear_weight, t, linear_bias, weight, ignore_index, reduction,
                                        label_smoothing, skip_ignored, target.shape)
            if result is not None:
                return result
        else:
            loss = _native(x, linear_weight, t, linear_bias, weight, ignore_index, reduction, label_smoothing)
            if loss is not None:
                return loss.reshape(target.shape) if reduction == "none" else loss
    chunk = chunk_size or default_chunk_size(n, x.shape[1], vocab)
    if chunk_size is None and x.is_cpu and not compiling():
        # On a CPU every chunk re-reads and re-writes the whole (V, H) weight gradient: with a
        # small hidden size the default makes chunks of a few rows, and those passes, not the
        # matmuls, set the time (1.25x torch's unfused loss at 2048 x 256 -> 32000). A floor of
        # _CPU_MIN_CHUNK rows keeps the logits chunk well under torch's whole (N, V) logits.
        chunk = max(chunk, min(n, _CPU_MIN_CHUNK))
    code = _REDUCTION_CODES[reduction]
    wants_grad = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (input, linear_weight, linear_bias))
    op = _linear_cross_entropy_stats_eager if stats else _linear_cross_entropy_eager
    out = op(x, linear_weight, t, linear_bias, weight, ignore_index, label_smoothing, z_loss, softcap, chunk, code,
             wants_grad and code != 0, resolve_acc_dtype(linear_weight.dtype, acc_dtype), skip_ignored)
    loss = out[0]
    if code == 0:
        loss = loss.reshape(target.shape)
    loss = loss.to(out_dtype or input.dtype)
    if not stats:
        return loss

    def divisor_fn():  # (formed only for "mean")
        return mean_divisor(t, weight, ignore_index, n)
    return loss, statistics(out[4], out[5] == t, t, ignore_index, z_loss, reduction, divisor_fn, target.shape,
                            out_dtype or input.dtype)
