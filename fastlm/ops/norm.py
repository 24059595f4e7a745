"""Layer norm and RMSNorm (with the fused residual add): checks, custom ops, autograd, dispatch.

The four public functions are one op family that differs by two flags (rms, residual),
so they share one pair of custom ops:

    fastlm::norm(x, residual?, weight?, bias?, normalized_ndim, eps, rms, keep_sum)
        -> (y, sum, mean, rstd)
    fastlm::norm_bwd(dy, dsum?, x, weight?, bias?, mean, rstd, normalized_ndim, eps, rms, backend)
        -> (dx, dweight, dbias)

``sum`` is x + residual (the pre-norm residual stream), written only when it is asked for
or needed by the backward; ``mean`` is empty for RMSNorm; absent outputs are empty tensors.

Dropout + residual + norm (issue 23): both ops take ``seed?, dropout_p, sum_fp32`` last:
    y = norm(dropout(x) + residual),   sum = dropout(x) + residual,
one kernel forward and one backward, the mask never stored: each call draws one int64 seed
on the input's device (ops/attention.py's draw_dropout_seed, the same scheme as attention's
dropout: torch.manual_seed reproduces it, no host sync), the kernel draws the mask from it
with tl.rand, the backward draws it again; the reference seeds a torch.Generator with it
(``dropout_mask`` gives either backend's mask, for tests). ``sum_fp32`` keeps the stream in
float32 for 16-bit inputs (flash-attn's residual_in_fp32); the residual may then be float32
or the input's dtype. The backward op then also returns the residual's gradient apart from
the input's (dropped and scaled, or of another dtype).
The backend is resolved when the op runs, not when it is traced; the backward resolves the
backend that was requested at the forward (autograd may run it on another thread, where
``use_backend`` would not be seen).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..backend import get_backend, native_backend, native_backend_of, resolve
from ..errors import ArgumentError, ArgumentTypeError
from ..reference import norm as ref
from ._autocast import no_autocast, promote_residual
from ._eager import EagerTwin, autocast_any, compiling
from .attention import _check_seed as _check_attention_seed
from .attention import draw_dropout_seed

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ShapeArg = Union[int, Sequence[int], torch.Size]


# ----------------------------------------------------------------------------- argument checks

def _check_normalized_shape(input: Tensor, normalized_shape: _ShapeArg, fn: str) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        shape = (normalized_shape,)
    elif isinstance(normalized_shape, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in normalized_shape):
        shape = tuple(normalized_shape)
    else:
        raise ArgumentTypeError(f"fastlm.{fn}: normalized_shape must be an int or a sequence of ints, "
                                f"got {normalized_shape!r}")
    if len(shape) == 0:
        raise ArgumentError(f"fastlm.{fn}: normalized_shape must not be empty")
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ArgumentError(f"fastlm.{fn}: normalized_shape {list(shape)} does not match the trailing dims "
                            f"of input, whose shape is {list(input.shape)}")
    return shape


def _check_args(fn: str, input: Tensor, residual: Optional[Tensor], normalized_shape: _ShapeArg,
                weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                residual_in_fp32: bool = False) -> tuple[int, ...]:
    if not isinstance(input, Tensor):
        raise ArgumentTypeError(f"fastlm.{fn}: input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise ArgumentTypeError(f"fastlm.{fn}: input must be a floating-point tensor, got dtype {input.dtype}")
    shape = _check_normalized_shape(input, normalized_shape, fn)
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise ArgumentTypeError(f"fastlm.{fn}: residual must be a Tensor, got {type(residual).__name__}")
        if residual.device != input.device:
            raise ArgumentError(f"fastlm.{fn}: residual is on {residual.device} but input is on {input.device}")
        if residual_in_fp32:
            if residual.dtype not in (input.dtype, torch.float32):
                raise ArgumentTypeError(f"fastlm.{fn}: residual has dtype {residual.dtype}; with input of dtype "
                                        f"{input.dtype} and residual_in_fp32=True it must be {input.dtype} "
                                        f"or torch.float32")
        elif residual.dtype != input.dtype:
            raise ArgumentTypeError(f"fastlm.{fn}: residual has dtype {residual.dtype} but input has {input.dtype}; "
                                    f"they must match (or pass residual_in_fp32=True for a float32 residual)")
        if residual.shape != input.shape:
            raise ArgumentError(f"fastlm.{fn}: residual has shape {list(residual.shape)} but input has "
                                f"{list(input.shape)}; they must match")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"fastlm.{fn}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.device != input.device:
            raise ArgumentError(f"fastlm.{fn}: {name} is on {t.device} but input is on {input.device}")
        if t.dtype not in (input.dtype, torch.float32):
            raise ArgumentTypeError(f"fastlm.{fn}: {name} has dtype {t.dtype}; with input of dtype {input.dtype} "
                                    f"it must be {input.dtype} or torch.float32")
        if tuple(t.shape) != shape:
            raise ArgumentError(f"fastlm.{fn}: {name} has shape {list(t.shape)} but normalized_shape is {list(shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ArgumentError(f"fastlm.{fn}: eps must be a finite number >= 0, got {eps!r}")
    return shape


def _check_dropout(fn: str, dropout_p, residual_in_fp32) -> float:
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ArgumentError(f"fastlm.{fn}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if not isinstance(residual_in_fp32, bool):
        raise ArgumentTypeError(f"fastlm.{fn}: residual_in_fp32 must be a bool, got {residual_in_fp32!r}")
    return float(dropout_p)


def _triton_unsupported(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        residual: Optional[Tensor] = None) -> Optional[str]:
    for name, t in (("input", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            return f"{name} has dtype {t.dtype}; the kernel takes float32, float16 and bfloat16"
    return None


def _cuda_unsupported(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                      dropout_p: float, sum_fp32: bool) -> Optional[str]:
    if dropout_p > 0.0 or sum_fp32 or (residual is not None and residual.dtype != x.dtype):
        return "the CUDA C++ norm has no dropout and no float32 residual stream (residual_in_fp32)"
    return _triton_unsupported(x, weight, bias)  # the same dtypes


def _pick(fn: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], requested: Optional[str] = None,
          residual: Optional[Tensor] = None, dropout_p: float = 0.0, sum_fp32: bool = False) -> str:
    return resolve(fn, x.device.type, {
        "triton": _triton_unsupported(x, weight, bias, residual),
        "cuda": _cuda_unsupported(x, weight, bias, residual, dropout_p, sum_fp32),
    }, requested)


def _stream_dtype(x: Tensor, sum_fp32: bool) -> torch.dtype:
    """The residual stream's dtype: float32 for 16-bit inputs with sum_fp32, else the input's."""
    return torch.float32 if sum_fp32 and x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _transformed(residual: Optional[Tensor], dropout_p: float, sum_fp32: bool) -> bool:
    """Whether the normalised tensor is a stream formed from x (and so has a ``sum`` output)."""
    return residual is not None or dropout_p > 0.0 or sum_fp32


def _reference_keep(seed: Tensor, shape, dropout_p: float, device) -> Tensor:
    return ref.dropout_keep(int(seed.item()), shape, dropout_p, device)


def dropout_mask(seed: Tensor, shape, dropout_p: float, backend: str, device=None) -> Tensor:
    """The boolean mask of kept elements that ``backend`` ("torch" or "triton") draws for
    ``seed`` over a tensor of ``shape`` in add_layer_norm / add_rms_norm with dropout (the
    seed a call draws is draw_dropout_seed(input.device) after the same torch.manual_seed).
    A debugging and testing aid: the ops never store it."""
    device = torch.device(device) if device is not None else seed.device
    if backend == "triton":
        from fastlm.kernels import norm as kernels
        return kernels.dropout_mask(seed.to(device), tuple(shape), dropout_p, device)
    if backend != "torch":
        raise ArgumentError(f"fastlm.dropout_mask: backend must be 'torch' or 'triton', got {backend!r}")
    return _reference_keep(seed, shape, dropout_p, device)


# ----------------------------------------------------------------------------- the CUDA C++ backend

def _cuda_rows(t: Tensor, n: int) -> Tensor:
    """(rows, n) with unit column stride (the CUDA kernels' contract): a view where possible."""
    t2 = t.reshape(-1, n)
    return t2 if (t2.stride(1) == 1 or t2.shape[1] <= 1) else t2.contiguous()


def _cuda_norm_fwd(x, residual, weight, bias, normalized_ndim, eps, rms, keep_sum):
    from fastlm.kernels.launch import empty

    from . import _cuda
    n = math.prod(x.shape[x.dim() - normalized_ndim:])
    x2 = _cuda_rows(x, n)
    r2 = _cuda_rows(residual, n) if residual is not None else None
    m = x2.shape[0]
    store_sum = residual is not None and keep_sum
    y = empty(x.shape, x.dtype, x.device)
    s = empty(x.shape, x.dtype, x.device) if store_sum else x.new_empty(0)
    mean = empty((m,), torch.float32, x.device) if not rms else x.new_empty(0, dtype=torch.float32)
    rstd = empty((m,), torch.float32, x.device)
    w = weight.reshape(-1).float().contiguous() if weight is not None else None
    b = bias.reshape(-1).float().contiguous() if bias is not None else None
    with _cuda.device_of(x2):  # launch on the tensor's device, not the current one
        _cuda.load().norm_fwd(_cuda.dtype_code(x.dtype), _cuda.addr(x2), _cuda.addr(r2), _cuda.addr(s if store_sum else None),
                              _cuda.addr(y), _cuda.addr(w), _cuda.addr(b), _cuda.addr(mean if not rms else None),
                              _cuda.addr(rstd), m, n, x2.stride(0), r2.stride(0) if r2 is not None else 0, float(eps),
                              rms, _cuda.stream(x))
    return y, s, mean, rstd


def _cuda_norm_bwd(dy, dsum, x, weight, bias, mean, rstd, normalized_ndim, rms):
    from fastlm.kernels.launch import empty, persistent_programs

    from . import _cuda
    n = math.prod(x.shape[x.dim() - normalized_ndim:])
    x2, dy2 = _cuda_rows(x, n), _cuda_rows(dy, n)
    ds2 = _cuda_rows(dsum, n) if dsum is not None else None
    m = x2.shape[0]
    programs = persistent_programs(x.device, m)
    dx = empty(x.shape, x.dtype, x.device)
    dw_part = empty((programs, n), torch.float32, x.device) if weight is not None else None
    db_part = empty((programs, n), torch.float32, x.device) if bias is not None else None
    w = weight.reshape(-1).float().contiguous() if weight is not None else None
    with _cuda.device_of(x2):  # launch on the tensor's device, not the current one
        _cuda.load().norm_bwd(_cuda.dtype_code(x.dtype), _cuda.addr(x2), _cuda.addr(w),
                              _cuda.addr(mean if not rms else None), _cuda.addr(rstd), _cuda.addr(dy2), _cuda.addr(ds2),
                              _cuda.addr(dx), _cuda.addr(dw_part), _cuda.addr(db_part), m, n, x2.stride(0), dy2.stride(0),
                              ds2.stride(0) if ds2 is not None else 0, rms, programs, _cuda.stream(x))
    dw = dw_part.sum(0).reshape(weight.shape).to(weight.dtype) if weight is not None else None
    db = db_part.sum(0).reshape(bias.shape).to(bias.dtype) if bias is not None else None
    return dx, dw, db


def _zero_width(x: Tensor, normalized_ndim: int) -> bool:
    """Rows of no elements (a 0 in normalized_shape): legal in torch (LayerNorm(0) gives an
    empty output), and the kernels' (rows, n) view of them is ambiguous, so the reference
    runs them on every backend."""
    return math.prod(x.shape[x.dim() - normalized_ndim:]) == 0


# ----------------------------------------------------------------------------- custom ops

@no_autocast
def _norm_body(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
               normalized_ndim: int, eps: float, rms: bool, keep_sum: bool, seed: Optional[Tensor] = None,
               dropout_p: float = 0.0, sum_fp32: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fn = ("add_" if residual is not None else "") + ("rms_norm" if rms else "layer_norm")
    _check_attention_seed(f"fastlm.{fn}", seed, dropout_p, x, "input")
    backend = _pick(fn, x, weight, bias, None, residual, dropout_p, sum_fp32)
    if _zero_width(x, normalized_ndim):
        backend = "torch"  # nothing to launch: the reference gives the empty result, as torch does
    if backend == "cuda":
        return _cuda_norm_fwd(x, residual, weight, bias, normalized_ndim, eps, rms, keep_sum)
    if backend == "triton":
        from fastlm.kernels import norm as kernels
        return kernels.norm_fwd(x, residual, weight, bias, normalized_ndim, eps, rms, keep_sum,
                                seed=seed, dropout_p=dropout_p, sum_fp32=sum_fp32)
    if dropout_p > 0.0 or sum_fp32 or (residual is not None and residual.dtype != x.dtype):
        keep = _reference_keep(seed, x.shape, dropout_p, x.device) if dropout_p > 0.0 else None
        s = ref.dropout_add(x, residual, keep, dropout_p, _stream_dtype(x, sum_fp32))
    else:
        s = x + residual if residual is not None else x
    y, mean, rstd = ref.norm(s, weight, bias, normalized_ndim, eps, rms)
    return (y.to(x.dtype), (s if (_transformed(residual, dropout_p, sum_fp32) and keep_sum) else x.new_empty(0)),
            mean, rstd)


_norm = torch.library.custom_op("fastlm::norm", mutates_args=())(_norm_body)


@_norm.register_fake
def _(x, residual, weight, bias, normalized_ndim, eps, rms, keep_sum, seed=None, dropout_p=0.0, sum_fp32=False):
    rows = math.prod(x.shape[: x.dim() - normalized_ndim])
    s = (torch.empty_like(x, dtype=_stream_dtype(x, sum_fp32)) if (_transformed(residual, dropout_p, sum_fp32)
                                                                  and keep_sum) else x.new_empty(0))
    mean = x.new_empty(0 if rms else rows, dtype=torch.float32)
    return torch.empty_like(x), s, mean, x.new_empty(rows, dtype=torch.float32)


@no_autocast
def _norm_bwd_body(dy: Tensor, dsum: Optional[Tensor], x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, normalized_ndim: int, eps: float, rms: bool,
                   backend: str, seed: Optional[Tensor] = None, dropout_p: float = 0.0,
                   dx_dtype: Optional[torch.dtype] = None,
                   dres_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x`` is the normalised stream. dx is the gradient of the op's input (x's dtype, or
    ``dx_dtype``; dropped and scaled with dropout); with ``dres_dtype`` the fourth output is
    the stream's gradient (the residual's) in that dtype, else it is empty."""
    fn = "rms_norm" if rms else "layer_norm"
    _check_attention_seed(f"fastlm.{fn}", seed, dropout_p, x, "input")
    extras = dropout_p > 0.0 or dres_dtype is not None or (dx_dtype is not None and dx_dtype != x.dtype)
    chosen = _pick(fn, x, weight, bias, backend, None, dropout_p, extras)
    if _zero_width(x, normalized_ndim):
        chosen = "torch"
    dres = None
    if chosen == "cuda":
        dx, dw, db = _cuda_norm_bwd(dy, dsum, x, weight, bias, mean, rstd, normalized_ndim, rms)
    elif chosen == "triton":
        from fastlm.kernels import norm as kernels
        if extras:
            dx, dw, db, *rest = kernels.norm_bwd(dy, dsum, x, weight, bias, mean, rstd, normalized_ndim, rms,
                                                 seed=seed, dropout_p=dropout_p, dx_dtype=dx_dtype,
                                                 dres_dtype=dres_dtype)
            dres = rest[0] if rest else None
        else:
            dx, dw, db = kernels.norm_bwd(dy, dsum, x, weight, bias, mean, rstd, normalized_ndim, rms)
    else:
        dx, dw, db = ref.norm_bwd(dy, x, weight, bias, normalized_ndim, eps, rms)
        if dsum is not None:
            dx = dx + dsum
        if extras:  # dx is the stream's gradient so far
            if dres_dtype is not None:
                dres = dx.to(dres_dtype)
            if dropout_p > 0.0:
                keep = _reference_keep(seed, x.shape, dropout_p, x.device)
                dx = torch.where(keep, dx * (1.0 / (1.0 - dropout_p)), 0.0)
            dx = dx.to(dx_dtype or x.dtype)
    empty = x.new_empty(0)
    return (dx, (dw if dw is not None else empty), (db if db is not None else empty.clone()),
            dres if dres is not None else empty.clone())


_norm_bwd = torch.library.custom_op("fastlm::norm_bwd", mutates_args=())(_norm_bwd_body)


@_norm_bwd.register_fake
def _(dy, dsum, x, weight, bias, mean, rstd, normalized_ndim, eps, rms, backend, seed=None, dropout_p=0.0,
      dx_dtype=None, dres_dtype=None):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    dres = torch.empty_like(x, dtype=dres_dtype) if dres_dtype is not None else x.new_empty(0)
    return torch.empty_like(x, dtype=dx_dtype or x.dtype), dw, db, dres


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, normalized_ndim, eps, rms, keep_sum, *extra = inputs
    seed, dropout_p, sum_fp32 = extra if extra else (None, 0.0, False)
    _, s, mean, rstd = output
    transformed = _transformed(residual, dropout_p, sum_fp32)
    if transformed and s.numel() == 0 and x.numel() != 0:
        ctx.save_for_backward(x, residual, weight, bias, mean, rstd, seed)
        ctx.recompute_sum = True
    else:
        ctx.save_for_backward(s if transformed else x, None, weight, bias, mean, rstd, seed)
        ctx.recompute_sum = False
    ctx.has_residual = residual is not None
    ctx.transformed = transformed
    ctx.normalized_ndim, ctx.eps, ctx.rms = normalized_ndim, eps, rms
    ctx.dropout_p, ctx.sum_fp32 = dropout_p, sum_fp32
    ctx.x_dtype = x.dtype
    # The residual's gradient is the stream's; it comes apart from the input's with dropout or
    # another dtype.
    ctx.dres_dtype = residual.dtype if residual is not None and (dropout_p > 0.0 or residual.dtype != x.dtype) \
        else None
    ctx.backend = get_backend()


def _backward_with(norm_bwd, norm_fwd):
    def backward(ctx, dy, ds, dmean, drstd):
        x, residual, weight, bias, mean, rstd, seed = ctx.saved_tensors
        if ctx.recompute_sum:  # the forward did not store the stream: form it again (the same mask)
            if ctx.dropout_p > 0.0 or ctx.sum_fp32 or (residual is not None and residual.dtype != x.dtype):
                x = norm_fwd(x, residual, None, None, ctx.normalized_ndim, ctx.eps, ctx.rms, True, seed,
                             ctx.dropout_p, ctx.sum_fp32)[1]
            else:
                x = x + residual
        dsum = ds if (ctx.transformed and ds is not None and ds.numel() == x.numel()) else None
        if ctx.dropout_p > 0.0 or ctx.dres_dtype is not None or x.dtype != ctx.x_dtype:
            dx, dw, db, dres = norm_bwd(dy, dsum, x, weight, bias, mean, rstd, ctx.normalized_ndim, ctx.eps,
                                        ctx.rms, ctx.backend, seed, ctx.dropout_p, ctx.x_dtype, ctx.dres_dtype)
        else:
            dx, dw, db, dres = norm_bwd(dy, dsum, x, weight, bias, mean, rstd, ctx.normalized_ndim, ctx.eps,
                                        ctx.rms, ctx.backend)
        dr = (dres if ctx.dres_dtype is not None else dx) if ctx.has_residual else None
        return (dx, dr, dw if weight is not None else None, db if bias is not None else None,
                None, None, None, None, None, None, None)
    return backward


_norm.register_autograd(_backward_with(_norm_bwd, _norm), setup_context=_setup_context)
# Eager calls skip the custom-op dispatch (fastlm/ops/_eager.py); torch.compile sees _norm.
_norm_eager = EagerTwin(_norm, _norm_body, _setup_context, _backward_with(_norm_bwd_body, _norm_body), name="norm")


# ----------------------------------------------------------------------------- public functions

def default_rms_eps(dtype: torch.dtype) -> float:
    """The eps torch's rms_norm uses when given None: the machine epsilon of the type it
    computes in, so float32's for float16 and bfloat16 inputs (torch's docs say
    finfo(input.dtype).eps, but its kernels use the compute type's (tests check it on CPU and CUDA); a
    drop-in must give the same numbers, so fastlm follows the kernels)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@no_autocast  # on CUDA, autocast would run torch's layer_norm in float32 and return float32
def _native(input: Tensor, residual: Optional[Tensor], shape: tuple[int, ...], weight: Optional[Tensor],
            bias: Optional[Tensor], eps: float, rms: bool, return_residual: bool):
    """The "torch" backend (the CPU path): torch's own layer_norm / rms_norm, which compute
    what the reference computes (float32 math for 16-bit inputs, the output in the input's
    dtype) in one native kernel, with torch's autograd. None where torch has no native
    kernel for the call (RMSNorm with a float32 weight over a 16-bit input, or weight and
    bias of different dtypes): the reference serves those."""
    s = input + residual if residual is not None else input
    dtype = s.dtype
    if (weight is not None and weight.dtype != dtype) or (bias is not None and bias.dtype != dtype):
        if dtype == torch.float64:  # float32 parameters widen exactly
            weight = weight.to(dtype) if weight is not None else None
            bias = bias.to(dtype) if bias is not None else None
        elif rms or not s.is_cpu or (weight is not None and weight.dtype != torch.float32) \
                or (bias is not None and bias.dtype != torch.float32):
            # torch's mixed-dtype layer_norm (float32 parameters over a 16-bit input) is a CPU
            # kernel; its CUDA kernel reads the parameters in the input's dtype and refuses
            return None
    if rms:
        y = torch.rms_norm(s, shape, weight, eps)
    else:
        y = torch.layer_norm(s, shape, weight, bias, eps)
    return (y, s) if return_residual else y


def _run(fn, input, residual, normalized_shape, weight, bias, eps, rms, return_residual,
         dropout_p=0.0, residual_in_fp32=False, seed=None):
    plain = dropout_p == 0.0 and residual_in_fp32 is False
    if not plain:
        dropout_p = _check_dropout(fn, dropout_p, residual_in_fp32)
    if residual is not None and not residual_in_fp32:  # with it, a float32 residual is the stream's own
        input, residual = promote_residual(input, residual)
    shape = _check_args(fn, input, residual, normalized_shape, weight, bias, eps, residual_in_fp32)
    eps = float(eps)
    if plain and not compiling() and native_backend(input.device.type) and not (rms and bias is not None):
        out = _native(input, residual, shape, weight, bias, eps, rms, return_residual)
        if out is not None:
            return out
    if dropout_p > 0.0 and seed is None:
        seed = draw_dropout_seed(input.device)
    transformed = _transformed(residual, dropout_p, residual_in_fp32)
    keep_sum = transformed and (return_residual or _needs_grad(input, residual, weight, bias))
    y, s, _, _ = _norm_eager(input, residual, weight, bias, len(shape), eps, rms, keep_sum,
                             seed if dropout_p > 0.0 else None, dropout_p, residual_in_fp32)
    if return_residual:
        return y, (s if transformed else input)
    return y


# The CPU path of the two plain norms costs one torch call and a few attribute reads: torch's
# function runs first and fastlm's argument checks run only if it raises, to replace its error
# with fastlm's (which names the argument) when fastlm's rules are what was broken. Only what
# torch would accept but fastlm refuses (a negative or NaN eps) is checked before. Calls that
# torch's function does not serve as fastlm means them (another backend, compiling, a dtype mix)
# take _run, which checks first.

def layer_norm(input: Tensor, normalized_shape: _ShapeArg, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """torch.nn.functional.layer_norm, on fastlm's kernels."""
    if type(eps) is float and 0.0 <= eps < math.inf and not compiling() and not autocast_any() \
            and native_backend_of(input):
        try:
            if type(normalized_shape) is int:
                normalized_shape = (normalized_shape,)
            return torch.layer_norm(input, normalized_shape, weight, bias, eps)
        except Exception:
            _check_args("layer_norm", input, None, normalized_shape, weight, bias, eps)
            if not _mixed(input, weight, bias):
                raise
    return _run("layer_norm", input, None, normalized_shape, weight, bias, eps, False, False)


def _native_residual(input, residual) -> bool:
    """The fused-residual variants' fast CPU path: torch's ``input + residual`` would broadcast or
    promote where fastlm refuses, so equal dtypes and shapes are checked before it runs."""
    return (native_backend_of(input) and isinstance(residual, Tensor) and residual.dtype == input.dtype
            and residual.shape == input.shape)


def _mixed(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    return (weight is not None and weight.dtype != input.dtype) or (bias is not None and bias.dtype != input.dtype)


def rms_norm(input: Tensor, normalized_shape: _ShapeArg, weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """torch.nn.functional.rms_norm, on fastlm's kernels (eps None: as torch, see default_rms_eps)."""
    if (eps is None or (type(eps) is float and 0.0 <= eps < math.inf)) and not compiling() and not autocast_any() \
            and native_backend_of(input) and (weight is None or weight.dtype == input.dtype):
        try:
            if type(normalized_shape) is int:
                normalized_shape = (normalized_shape,)
            return torch.rms_norm(input, normalized_shape, weight, eps)
        except Exception:
            _check_args("rms_norm", input, None, normalized_shape, weight, None,
                        default_rms_eps(input.dtype) if eps is None else eps)
            raise
    if eps is None and isinstance(input, Tensor) and input.is_floating_point():
        eps = default_rms_eps(input.dtype)
    return _run("rms_norm", input, None, normalized_shape, weight, None, eps, True, False)


_DROPOUT_DOC = """
    With ``dropout_p`` > 0 the input is dropped first, ``dropout(input) + residual`` (zeroed with
    probability dropout_p, the rest scaled by 1 / (1 - dropout_p)), in the same one kernel forward
    and one backward: the mask comes from a seed drawn on the input's device (torch.manual_seed
    reproduces it) and is drawn again in the backward, never stored. As in torch.nn.functional.dropout
    with its default training=True and in flash-attn's layer_norm_fn, dropout_p > 0 always drops:
    there is no training flag; modules pass dropout_p=0.0 in eval mode.
    ``residual_in_fp32=True`` keeps the residual stream in float32 while input is 16-bit (the sum is
    then not rounded to the input's dtype, and the one returned with return_residual is float32);
    residual may then be float32 or the input's dtype. The output is in the input's dtype."""


def add_layer_norm(input: Tensor, residual: Tensor, normalized_shape: _ShapeArg, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, return_residual: bool = False, *,
                   dropout_p: float = 0.0, residual_in_fp32: bool = False):
    """layer_norm(input + residual) in one kernel; with return_residual=True returns
    (normed, input + residual), the pre-norm residual stream."""
    if dropout_p == 0.0 and residual_in_fp32 is False and type(eps) is float and 0.0 <= eps < math.inf \
            and not compiling() and not autocast_any() and _native_residual(input, residual):
        try:
            if type(normalized_shape) is int:
                normalized_shape = (normalized_shape,)
            s = input + residual
            y = torch.layer_norm(s, normalized_shape, weight, bias, eps)
            return (y, s) if return_residual else y
        except Exception:
            _check_args("add_layer_norm", input, residual, normalized_shape, weight, bias, eps)
            if not _mixed(input, weight, bias):
                raise
    if residual is None:
        raise ArgumentTypeError("fastlm.add_layer_norm: residual must be a Tensor, got None")
    return _run("add_layer_norm", input, residual, normalized_shape, weight, bias, eps, False, return_residual,
                dropout_p, residual_in_fp32)


def add_rms_norm(input: Tensor, residual: Tensor, normalized_shape: _ShapeArg, weight: Optional[Tensor] = None,
                 eps: Optional[float] = None, return_residual: bool = False, *,
                 dropout_p: float = 0.0, residual_in_fp32: bool = False):
    """rms_norm(input + residual) in one kernel; with return_residual=True returns
    (normed, input + residual), the pre-norm residual stream."""
    if dropout_p == 0.0 and residual_in_fp32 is False \
            and (eps is None or (type(eps) is float and 0.0 <= eps < math.inf)) and not compiling() \
            and not autocast_any() and _native_residual(input, residual) \
            and (weight is None or weight.dtype == input.dtype):
        try:
            if type(normalized_shape) is int:
                normalized_shape = (normalized_shape,)
            s = input + residual
            y = torch.rms_norm(s, normalized_shape, weight, eps)
            return (y, s) if return_residual else y
        except Exception:
            _check_args("add_rms_norm", input, residual, normalized_shape, weight, None,
                        default_rms_eps(input.dtype) if eps is None else eps)
            raise
    if residual is None:
        raise ArgumentTypeError("fastlm.add_rms_norm: residual must be a Tensor, got None")
    if eps is None and isinstance(input, Tensor) and input.is_floating_point():
        eps = default_rms_eps(input.dtype)
    return _run("add_rms_norm", input, residual, normalized_shape, weight, None, eps, True, return_residual,
                dropout_p, residual_in_fp32)


add_layer_norm.__doc__ += _DROPOUT_DOC
add_rms_norm.__doc__ += _DROPOUT_DOC


# ----------------------------------------------------------------------------- flash-attn's layer_norm_fn

def layer_norm_fn(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor] = None,
                  x1=None, weight1=None, bias1=None, eps: float = 1e-6, dropout_p: float = 0.0, rowscale=None,
                  prenorm: bool = False, residual_in_fp32: bool = False, zero_centered_weight: bool = False,
                  is_rms_norm: bool = False, return_dropout_mask: bool = False, out_dtype=None, out=None,
                  residual_out=None):
    """flash_attn.ops.triton.layer_norm.layer_norm_fn (flash-attn 2.8's arguments, order and
    defaults), on fastlm's dropout + residual + norm: norm over the last dim of
    dropout(x) + residual; with prenorm=True also returns that residual stream, with
    return_dropout_mask=True also the mask (True = kept; None without dropout) and None for x1's.

    The residual stream takes residual's dtype when a residual is given (a float32 residual with a
    16-bit x keeps the stream in float32; residual_in_fp32 then changes nothing), else float32 with
    residual_in_fp32=True, else x's dtype (then, without dropout, the stream returned is x itself),
    as in flash-attn. The options for the parallel norm (x1, weight1, bias1), rowscale,
    zero_centered_weight, out_dtype, out and residual_out are accepted by position and name but not
    implemented: anything but their defaults raises NotImplementedError naming them."""
    unsupported = [name for name, v in (("x1", x1), ("weight1", weight1), ("bias1", bias1), ("rowscale", rowscale),
                                        ("out", out), ("residual_out", residual_out)) if v is not None]
    if zero_centered_weight:
        unsupported.append("zero_centered_weight")
    if out_dtype is not None and not (isinstance(x, Tensor) and out_dtype == x.dtype):
        unsupported.append("out_dtype")
    if unsupported:
        raise NotImplementedError(f"fastlm.layer_norm_fn: {', '.join(unsupported)} not supported (flash-attn's "
                                  f"parallel norm, rowscale, zero-centred weight and output buffers); pass the "
                                  f"defaults")
    fn = "layer_norm_fn"
    if not isinstance(x, Tensor):
        raise ArgumentTypeError(f"fastlm.{fn}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ArgumentError(f"fastlm.{fn}: x must have at least one dim, got a scalar")
    dropout_p = _check_dropout(fn, dropout_p, residual_in_fp32)
    if residual is not None and isinstance(residual, Tensor):
        # flash-attn: a given residual sets the stream's dtype; residual_in_fp32 acts only without one
        residual_in_fp32 = residual.dtype == torch.float32 and x.dtype != torch.float32
    rms = bool(is_rms_norm)
    seed = draw_dropout_seed(x.device) if dropout_p > 0.0 else None
    result = _run(fn, x, residual, x.shape[-1], weight, bias, eps, rms, bool(prenorm), dropout_p, residual_in_fp32,
                  seed)
    result = result if prenorm else (result,)
    if return_dropout_mask:
        mask = None
        if dropout_p > 0.0:
            backend = _pick(fn, x, weight, bias, None, residual, dropout_p, residual_in_fp32)
            backend = "torch" if _zero_width(x, 1) else backend
            mask = dropout_mask(seed, x.shape, dropout_p, backend, x.device)
        result = result + (mask, None)
    return result[0] if len(result) == 1 else result
