"""Layer norm and RMSNorm (with the fused residual add): checks, custom ops, autograd, dispatch.

The four public functions are one op family that differs by two flags (rms, residual),
so they share one pair of custom ops:

    fastlm::norm(x, residual?, weight?, bias?, normalized_ndim, eps, rms, keep_sum)
        -> (y, sum, mean, rstd)
    fastlm::norm_bwd(dy, dsum?, x, weight?, bias?, mean, rstd, normalized_ndim, eps, rms, backend)
        -> (dx, dweight, dbias)

``sum`` is x + residual (the pre-norm residual stream), written only when it is asked for
or needed by the backward; ``mean`` is empty for RMSNorm; absent outputs are empty tensors.
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
                weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> tuple[int, ...]:
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
        if residual.dtype != input.dtype:
            raise ArgumentTypeError(f"fastlm.{fn}: residual has dtype {residual.dtype} but input has {input.dtype}; "
                                    f"they must match")
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


def _triton_unsupported(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Optional[str]:
    for name, t in (("input", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            return f"{name} has dtype {t.dtype}; the kernel takes float32, float16 and bfloat16"
    return None


def _pick(fn: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], requested: Optional[str] = None) -> str:
    return resolve(fn, x.device.type, {
        "triton": _triton_unsupported(x, weight, bias),
        "cuda": _triton_unsupported(x, weight, bias),  # the same dtypes
    }, requested)


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
               normalized_ndim: int, eps: float, rms: bool, keep_sum: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fn = ("add_" if residual is not None else "") + ("rms_norm" if rms else "layer_norm")
    backend = _pick(fn, x, weight, bias)
    if _zero_width(x, normalized_ndim):
        backend = "torch"  # nothing to launch: the reference gives the empty result, as torch does
    if backend == "cuda":
        return _cuda_norm_fwd(x, residual, weight, bias, normalized_ndim, eps, rms, keep_sum)
    if backend == "triton":
        from fastlm.kernels import norm as kernels
        return kernels.norm_fwd(x, residual, weight, bias, normalized_ndim, eps, rms, keep_sum)
    s = x + residual if residual is not None else x
    y, mean, rstd = ref.norm(s, weight, bias, normalized_ndim, eps, rms)
    return y, (s if (residual is not None and keep_sum) else x.new_empty(0)), mean, rstd


_norm = torch.library.custom_op("fastlm::norm", mutates_args=())(_norm_body)


@_norm.register_fake
def _(x, residual, weight, bias, normalized_ndim, eps, rms, keep_sum):
    rows = math.prod(x.shape[: x.dim() - normalized_ndim])
    s = torch.empty_like(x) if (residual is not None and keep_sum) else x.new_empty(0)
    mean = x.new_empty(0 if rms else rows, dtype=torch.float32)
    return torch.empty_like(x), s, mean, x.new_empty(rows, dtype=torch.float32)


@no_autocast
def _norm_bwd_body(dy: Tensor, dsum: Optional[Tensor], x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, normalized_ndim: int, eps: float, rms: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    chosen = _pick("rms_norm" if rms else "layer_norm", x, weight, bias, backend)
    if _zero_width(x, normalized_ndim):
        chosen = "torch"
    if chosen == "cuda":
        dx, dw, db = _cuda_norm_bwd(dy, dsum, x, weight, bias, mean, rstd, normalized_ndim, rms)
    elif chosen == "triton":
        from fastlm.kernels import norm as kernels
        dx, dw, db = kernels.norm_bwd(dy, dsum, x, weight, bias, mean, rstd, normalized_ndim, rms)
    else:
        dx, dw, db = ref.norm_bwd(dy, x, weight, bias, normalized_ndim, eps, rms)
        if dsum is not None:
            dx = dx + dsum
    empty = x.new_empty(0)
    return dx, (dw if dw is not None else empty), (db if db is not None else empty.clone())


_norm_bwd = torch.library.custom_op("fastlm::norm_bwd", mutates_args=())(_norm_bwd_body)


@_norm_bwd.register_fake
def _(dy, dsum, x, weight, bias, mean, rstd, normalized_ndim, eps, rms, backend):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x), dw, db


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, normalized_ndim, eps, rms, keep_sum = inputs
    _, s, mean, rstd = output
    if residual is not None and s.numel() == 0 and x.numel() != 0:
        ctx.save_for_backward(x, residual, weight, bias, mean, rstd)
        ctx.recompute_sum = True
    else:
        ctx.save_for_backward(s if residual is not None else x, None, weight, bias, mean, rstd)
        ctx.recompute_sum = False
    ctx.has_residual = residual is not None
    ctx.normalized_ndim, ctx.eps, ctx.rms = normalized_ndim, eps, rms
    ctx.backend = get_backend()


def _backward_with(norm_bwd):
    def backward(ctx, dy, ds, dmean, drstd):
        x, residual, weight, bias, mean, rstd = ctx.saved_tensors
        if ctx.recompute_sum:  # the forward did not store x + residual: form it again
            x = x + residual
        dsum = ds if (ctx.has_residual and ds is not None and ds.numel() == x.numel()) else None
        dx, dw, db = norm_bwd(dy, dsum, x, weight, bias, mean, rstd, ctx.normalized_ndim, ctx.eps, ctx.rms,
                              ctx.backend)
        return (dx, dx if ctx.has_residual else None, dw if weight is not None else None,
                db if bias is not None else None, None, None, None, None)
    return backward


_norm.register_autograd(_backward_with(_norm_bwd), setup_context=_setup_context)
# Eager calls skip the custom-op dispatch (fastlm/ops/_eager.py); torch.compile sees _norm.
_norm_eager = EagerTwin(_norm, _norm_body, _setup_context, _backward_with(_norm_bwd_body), name="norm")


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


def _run(fn, input, residual, normalized_shape, weight, bias, eps, rms, return_residual):
    if residual is not None:
        input, residual = promote_residual(input, residual)
    shape = _check_args(fn, input, residual, normalized_shape, weight, bias, eps)
    eps = float(eps)
    if not compiling() and native_backend(input.device.type):
        out = _native(input, residual, shape, weight, bias, eps, rms, return_residual)
        if out is not None:
            return out
    keep_sum = residual is not None and (return_residual or _needs_grad(input, residual, weight, bias))
    y, s, _, _ = _norm_eager(input, residual, weight, bias, len(shape), eps, rms, keep_sum)
    if return_residual:
        return y, s
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


def add_layer_norm(input: Tensor, residual: Tensor, normalized_shape: _ShapeArg, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, return_residual: bool = False):
    """layer_norm(input + residual) in one kernel; with return_residual=True returns
    (normed, input + residual), the pre-norm residual stream."""
    if type(eps) is float and 0.0 <= eps < math.inf and not compiling() and not autocast_any() \
            and _native_residual(input, residual):
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
    return _run("add_layer_norm", input, residual, normalized_shape, weight, bias, eps, False, return_residual)


def add_rms_norm(input: Tensor, residual: Tensor, normalized_shape: _ShapeArg, weight: Optional[Tensor] = None,
                 eps: Optional[float] = None, return_residual: bool = False):
    """rms_norm(input + residual) in one kernel; with return_residual=True returns
    (normed, input + residual), the pre-norm residual stream."""
    if (eps is None or (type(eps) is float and 0.0 <= eps < math.inf)) and not compiling() and not autocast_any() \
            and _native_residual(input, residual) and (weight is None or weight.dtype == input.dtype):
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
    return _run("add_rms_norm", input, residual, normalized_shape, weight, None, eps, True, return_residual)
