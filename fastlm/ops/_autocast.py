"""torch.autocast for fastlm's ops: what autocast does for torch's own matmuls.

Under ``torch.autocast(device_type, dtype)`` torch runs matmul-like ops (linear, matmul,
scaled_dot_product_attention) in the autocast dtype, casting their floating inputs on entry,
and the casts are differentiable (float32 master weights get float32 gradients). A custom op
gets no such treatment: without this, fastlm.linear under bf16 autocast would run in float32
(or refuse a bf16 activation beside a float32 weight). So the public functions of the
matmul-like ops (linear, feed_forward, the attention functions, linear_cross_entropy) call
``autocast_inputs`` first, before their argument checks.

The norms and cross_entropy are not cast: they return the input's dtype (torch's autocast
runs layer_norm and cross_entropy in float32 and returns float32; fastlm keeps the input's
dtype, which is what a mixed-precision model wants between its matmuls). The kernels compute
in float32 inside; on the "torch" backend (the CPU path) the norms are torch's own kernels,
which also compute in float32, while the loss is torch's cross_entropy, which for a 16-bit
input computes log_softmax in that dtype, as torch eager does (issue 17). The one exception is the fused residual add, where a
bfloat16 sublayer output meets a float32 residual stream: both go to the wider dtype
(``promote_residual``), as ``x + residual`` would in eager torch.

Inside every custom op autocast is off (``no_autocast``), so a reference path's float32
arithmetic is not quietly turned back into bfloat16 by the region around it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # float64 is left alone, as autocast does


def autocast_inputs(*args: Any) -> tuple:
    """``args`` unchanged, except that when autocast is enabled for the device of the first
    tensor among them, every float32/float16/bfloat16 tensor is cast to the autocast dtype.
    Non-tensors (None, numbers) pass through."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None:
        return args
    device_type = first.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return args
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.dtype in _CASTABLE and a.dtype != dtype else a
                 for a in args)


def autocast_to(like: Any, *args: Any) -> tuple:
    """For ops that write into tensors the caller owns (the KV cache): under autocast, cast
    the floating inputs to ``like``'s dtype instead of the autocast dtype."""
    if not isinstance(like, torch.Tensor) or like.device.type not in ("cuda", "cpu") \
            or not torch.is_autocast_enabled(like.device.type) or like.dtype not in _CASTABLE:
        return args
    return tuple(a.to(like.dtype) if isinstance(a, torch.Tensor) and a.dtype in _CASTABLE else a for a in args)


def promote_residual(input: Any, residual: Any) -> tuple:
    """The fused residual add under autocast: a low-precision sublayer output added to a
    float32 residual stream is computed in float32 (what ``input + residual`` gives in eager
    torch), so the stream keeps its precision. Outside autocast mismatched dtypes stay an
    error (the op's argument check names them)."""
    if not (isinstance(input, torch.Tensor) and isinstance(residual, torch.Tensor)) or input.dtype == residual.dtype:
        return input, residual
    device_type = input.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return input, residual
    if input.dtype not in _CASTABLE or residual.dtype not in _CASTABLE:
        return input, residual
    wide = torch.promote_types(input.dtype, residual.dtype)
    return input.to(wide), residual.to(wide)


def no_autocast(fn):
    """For the bodies of fastlm's custom ops: they run with autocast off, so the float32
    arithmetic of a reference path (or a torch matmul inside an op) stays float32 under an
    autocast region. Put it under ``@torch.library.custom_op``; the schema is read through
    signature, with its annotations evaluated in ``fn``'s module, from ``__signature__``."""
    @functools.wraps(fn)
    def body(*args, **kwargs):
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return fn(*args, **kwargs)  # the usual case, without the cost of two context managers
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    body.__signature__ = inspect.signature(fn, eval_str=True)
    return body
