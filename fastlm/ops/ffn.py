"""The feed-forward block: linear with fused bias and activation, the gated variants, backward.

Two custom-op pairs:

    fastlm::linear(x, w, b?, activation, save) -> (y, saved)
    fastlm::linear_bwd(dy, x, w, saved, activation, has_bias, backend) -> (dx, dw, db)
    fastlm::feed_forward(x, w_in, b_in?, w_out, b_out?, activation, save, gate_order="gate_up",
                         w_up?=None, b_up?=None) -> (y, h, pre)
    fastlm::feed_forward_bwd(dy, x, w_in, b_in?, w_out, h, pre, activation, has_b_out, backend,
                             gate_order="gate_up", w_up?=None, b_up?=None)
                             -> (dx, dw_in, db_in, dw_out, db_out, dw_up, db_up)

w_up: a gated block's up projection as a tensor of its own (Hugging Face checkpoints keep
gate_proj and up_proj apart); w_in is then the gate alone. The kernels read both where they
are (a second weight pointer; dx's matmul runs over both as one K loop), so no per-step
torch.cat of the two weights is made.

x is 2-D (tokens, features): the public functions flatten leading dims. Saved activations:
``linear`` keeps the pre-activation z for gelu/gelu_tanh/silu (their derivative needs it)
and nothing else (relu's derivative is read off the output). ``feed_forward`` keeps the
hidden h = act(z) (the second matmul's input, needed for dW_out) and the pre-activation
(z, or for the gated activations gu, both halves in w_in's row order), unless ``save`` is False
(``recompute=True``): then the backward computes them again from x.

Kernels (backend "triton"): the first matmul's epilogue adds the bias and applies the
activation (for the gated ones it accumulates the gate and up tiles side by side and stores
only act(gate) * up, so the (tokens, 2 * hidden) product is never formed in a separate
pass); the backward's dh = dy @ W_out has the activation's derivative and the bias gradient
in its epilogue. The remaining matmuls (dx, dW) are plain.

Dispatch (issue 17): torch.compile and opcheck see the custom ops; eager calls go through
their EagerTwins (fastlm/ops/_eager.py: the same bodies without the custom-op dispatch). On
the "torch" backend (the CPU path) the public functions call torch's own F.linear and
activations instead, with torch's autograd (recompute=True with a gradient needed excepted:
the reference op then keeps its no-hidden-activation promise).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from ..backend import get_backend, native_backend, native_backend_of, resolve
from ..errors import ArgumentError, ArgumentTypeError
from ._autocast import autocast_inputs, no_autocast
from ._eager import EagerTwin, compiling
from ..reference import ffn as ref

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ref.ACTIVATIONS  # relu, gelu (erf), gelu_tanh, silu
GATED = ref.GATED  # swiglu, geglu (erf), geglu_tanh, reglu -> the activation of the gate
GATE_ORDERS = ref.GATE_ORDERS  # "gate_up" (the gate rows of w_in first), "up_gate" (F.glu's value first)


def _triton_unsupported(*tensors: Optional[Tensor]) -> Optional[str]:
    for t in tensors:
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            return f"dtype {t.dtype}; the kernels take float32, float16 and bfloat16"
    return None


def _pick(fn: str, x: Tensor, requested: Optional[str] = None) -> str:
    return resolve(fn, x.device.type, {
        "triton": _triton_unsupported(x),
        "cuda": "the CUDA C++ feed-forward kernels are not written (fastlm's CUDA C++ covers norms, loss, "
                "attention)",
    }, requested)


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _act_name(activation: str) -> Optional[str]:
    return None if activation == "none" else activation


def _saves_preact(activation: str) -> bool:
    """Whether the derivative needs the pre-activation (relu's is read off its output)."""
    return activation in ("gelu", "gelu_tanh", "silu")


# ----------------------------------------------------------------------------- reference path

def _up(t: Tensor) -> Tensor:
    """The compute type of the reference: float32 for 16-bit tensors, float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def _ref_linear_bwd(dy, x, w, saved, activation, has_bias):
    dz = dy if activation == "none" else (_up(dy) * ref.act_grad(_up(saved), activation)).to(dy.dtype)
    db = dz.sum(0) if has_bias else None
    return dz @ w, dz.t() @ x, db


def _ref_ffn_fwd(x, w_in, b_in, w_out, b_out, activation, gate_order="gate_up", w_up=None, b_up=None):
    """(y, h, pre) in plain torch, rounding where the kernels round: pre and h in x's dtype.
    With w_up, pre is [x w_in^T + b_in, x w_up^T + b_up] (gate, up)."""
    pre = torch.nn.functional.linear(x, w_in, b_in)
    if w_up is not None:
        pre = torch.cat([pre, torch.nn.functional.linear(x, w_up, b_up)], dim=-1)
    if activation in GATED:
        g, u = ref.split_gated(pre, gate_order)
        h = (ref.act(_up(g), GATED[activation]) * _up(u)).to(x.dtype)
    else:
        h = ref.act(_up(pre), activation).to(x.dtype)
    return torch.nn.functional.linear(h, w_out, b_out), h, pre


def _ref_dpre(dh, pre, activation, gate_order="gate_up"):
    if activation in GATED:
        g, u = ref.split_gated(_up(pre), gate_order)
        a = GATED[activation]
        dhf = _up(dh)
        dg, du = dhf * u * ref.act_grad(g, a), dhf * ref.act(g, a)
        return torch.cat([dg, du] if gate_order == "gate_up" else [du, dg], dim=-1).to(dh.dtype)
    return (_up(dh) * ref.act_grad(_up(pre), activation)).to(dh.dtype)


# ----------------------------------------------------------------------------- custom ops: linear

@no_autocast
def _linear_body(x: Tensor, w: Tensor, b: Optional[Tensor], activation: str, save: bool) -> tuple[Tensor, Tensor]:
    if _pick("linear", x) == "triton":
        from fastlm.kernels import matmul as kernels
        y, z = kernels.linear_fwd(x, w, b, _act_name(activation), save_preact=save and _saves_preact(activation))
        return y, (z if z is not None else _empty(x))
    z = torch.nn.functional.linear(x, w, b)
    y = z if activation == "none" else ref.act(_up(z), activation).to(x.dtype)
    return y, (z if save and _saves_preact(activation) else _empty(x))


_linear = torch.library.custom_op("fastlm::linear", mutates_args=())(_linear_body)


@_linear.register_fake
def _(x, w, b, activation, save):
    y = x.new_empty(x.shape[0], w.shape[0])
    return y, (torch.empty_like(y) if save and _saves_preact(activation) else _empty(x))


@no_autocast
def _linear_bwd_body(dy: Tensor, x: Tensor, w: Tensor, saved: Tensor, activation: str, has_bias: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if _pick("linear", x, backend) == "triton":
        from fastlm.kernels import matmul as kernels
        if activation == "none":
            dz, db = dy, (dy.float().sum(0) if has_bias else None)
        else:
            dz, db = kernels.dact(dy, saved, activation)  # relu: saved is the output, 1[y > 0] = 1[z > 0]
        dx = kernels.matmul(dz, w.t())
        dw = kernels.matmul(dz.t(), x.t())
    else:
        dx, dw, db = _ref_linear_bwd(dy, x, w, saved, activation, has_bias)
    db = db.to(w.dtype) if has_bias else _empty(x)
    return dx, dw, db


_linear_bwd = torch.library.custom_op("fastlm::linear_bwd", mutates_args=())(_linear_bwd_body)


@_linear_bwd.register_fake
def _(dy, x, w, saved, activation, has_bias, backend):
    return torch.empty_like(x), torch.empty_like(w), (w.new_empty(w.shape[0]) if has_bias else _empty(x))


def _linear_setup(ctx, inputs, output):
    x, w, b, activation, save = inputs
    y, z = output
    saved = z if _saves_preact(activation) else (y if activation == "relu" else None)
    ctx.save_for_backward(x, w, saved)
    ctx.activation, ctx.has_bias, ctx.backend = activation, b is not None, get_backend()


def _linear_backward_with(linear_bwd):
    def backward(ctx, dy, _dz):
        x, w, saved = ctx.saved_tensors
        dx, dw, db = linear_bwd(dy, x, w, saved if saved is not None else _empty(x), ctx.activation, ctx.has_bias,
                                ctx.backend)
        return dx, dw, (db if ctx.has_bias else None), None, None
    return backward


_linear.register_autograd(_linear_backward_with(_linear_bwd), setup_context=_linear_setup)
# Eager calls skip the custom-op dispatch (fastlm/ops/_eager.py); torch.compile sees _linear.
_linear_eager = EagerTwin(_linear, _linear_body, _linear_setup, _linear_backward_with(_linear_bwd_body),
                          name="linear")


# ----------------------------------------------------------------------------- custom ops: feed_forward

@no_autocast
def _feed_forward_body(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, b_out: Optional[Tensor],
                       activation: str, save: bool, gate_order: str = "gate_up", w_up: Optional[Tensor] = None,
                       b_up: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    if _pick("feed_forward", x) == "triton":
        from fastlm.kernels import matmul as kernels
        if activation in GATED:
            h, pre = kernels.gated_fwd(x, w_in, b_in, activation, save_gu=save, gate_order=gate_order, w_up=w_up,
                                       bias_up=b_up)
        else:
            h, pre = kernels.linear_fwd(x, w_in, b_in, activation, save_preact=save and _saves_preact(activation))
        y, _ = kernels.linear_fwd(h, w_out, b_out, None)
    else:
        y, h, pre = _ref_ffn_fwd(x, w_in, b_in, w_out, b_out, activation, gate_order, w_up, b_up)
        if not (activation in GATED or _saves_preact(activation)):
            pre = None
    if not save:
        return y, _empty(x), _empty(x)
    return y, h, (pre if pre is not None else _empty(x))


_feed_forward = torch.library.custom_op("fastlm::feed_forward", mutates_args=())(_feed_forward_body)


@_feed_forward.register_fake
def _(x, w_in, b_in, w_out, b_out, activation, save, gate_order="gate_up", w_up=None, b_up=None):
    y = x.new_empty(x.shape[0], w_out.shape[0])
    if not save:
        return y, _empty(x), _empty(x)
    h = x.new_empty(x.shape[0], w_out.shape[1])
    width = 2 * w_out.shape[1] if activation in GATED else w_in.shape[0]
    pre = x.new_empty(x.shape[0], width) if (activation in GATED or _saves_preact(activation)) else _empty(x)
    return y, h, pre


@no_autocast
def _feed_forward_bwd_body(dy: Tensor, x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, h: Tensor,
                           pre: Tensor, activation: str, has_b_out: bool, backend: str,
                           gate_order: str = "gate_up", w_up: Optional[Tensor] = None, b_up: Optional[Tensor] = None,
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    gated = activation in GATED
    recompute = h.dim() == 1  # the 1-D placeholder (_empty): h was not saved; a saved h is 2-D, even with 0 rows
    F = w_in.shape[0]  # with w_up: the hidden width, where dpre's up half starts
    dw_up = db_up = None
    if _pick("feed_forward", x, backend) == "triton":
        from fastlm.kernels import matmul as kernels
        if recompute:
            if gated:
                h, pre = kernels.gated_fwd(x, w_in, b_in, activation, save_gu=True, gate_order=gate_order,
                                           w_up=w_up, bias_up=b_up)
            else:
                h, pre = kernels.linear_fwd(x, w_in, b_in, activation, save_preact=_saves_preact(activation))
        # dh = dy @ W_out, times the activation's derivative, in the matmul's epilogue.
        if gated:
            dpre, db_in = kernels.matmul_dgated(dy, w_out.t(), pre, activation, gate_order)
        else:
            dpre, db_in = kernels.matmul_dact(dy, w_out.t(), pre if _saves_preact(activation) else h, activation)
        dw_out = kernels.matmul(dy.t(), h.t())
        if w_up is None:
            dx = kernels.matmul(dpre, w_in.t())
            dw_in = kernels.matmul(dpre.t(), x.t())
        else:  # dx = dg @ Wg + du @ Wu, one accumulator over both; each weight's gradient its own
            dg, du = dpre[:, :F], dpre[:, F:]
            dx = kernels.matmul(dg, w_in.t(), du, w_up.t())
            dw_in, dw_up = kernels.matmul(dg.t(), x.t()), kernels.matmul(du.t(), x.t())
        db_out = dy.float().sum(0) if has_b_out else None
    else:
        if recompute:
            _, h, pre = _ref_ffn_fwd(x, w_in, b_in, w_out, None, activation, gate_order, w_up, b_up)
        elif not (gated or _saves_preact(activation)):
            pre = h  # relu: the derivative is read off the output
        dpre = _ref_dpre(dy @ w_out, pre, activation, gate_order)
        dw_out = dy.t() @ h
        if w_up is None:
            dx, dw_in = dpre @ w_in, dpre.t() @ x
        else:
            dg, du = dpre[:, :F], dpre[:, F:]
            dx, dw_in, dw_up = dg @ w_in + du @ w_up, dg.t() @ x, du.t() @ x
        db_in = _up(dpre).sum(0)
        db_out = _up(dy).sum(0) if has_b_out else None
    if b_up is not None:  # copies of the halves: a custom op's outputs may not alias one another
            db_up = db_in[F:].to(b_up.dtype, copy=True)
            db_in = db_in[:F].to(w_in.dtype, copy=True)
    db_in = db_in.to(w_in.dtype) if b_in is not None else _empty(x)
    db_out = db_out.to(w_out.dtype) if has_b_out else _empty(x)
    return (dx, dw_in, db_in, dw_out, db_out, dw_up if dw_up is not None else _empty(x),
            db_up if db_up is not None else _empty(x))


_feed_forward_bwd = torch.library.custom_op("fastlm::feed_forward_bwd", mutates_args=())(_feed_forward_bwd_body)


@_feed_forward_bwd.register_fake
def _(dy, x, w_in, b_in, w_out, h, pre, activation, has_b_out, backend, gate_order="gate_up", w_up=None,
      b_up=None):
    db_in = w_in.new_empty(w_in.shape[0]) if b_in is not None else _empty(x)
    db_out = w_out.new_empty(w_out.shape[0]) if has_b_out else _empty(x)
    dw_up = torch.empty_like(w_up) if w_up is not None else _empty(x)
    db_up = b_up.new_empty(b_up.shape[0]) if b_up is not None else _empty(x)
    return torch.empty_like(x), torch.empty_like(w_in), db_in, torch.empty_like(w_out), db_out, dw_up, db_up


def _ffn_setup(ctx, inputs, output):
    x, w_in, b_in, w_out, b_out, activation, save = inputs[:7]
    # a call may leave gate_order, w_up and b_up out (their defaults); the backward returns one
    # gradient per input
    gate_order, w_up, b_up = (tuple(inputs[7:10]) + ("gate_up", None, None)[len(inputs[7:10]):])
    _, h, pre = output
    ctx.save_for_backward(x, w_in, b_in, w_out, h, pre, w_up, b_up)
    ctx.activation, ctx.has_b_out, ctx.backend = activation, b_out is not None, get_backend()
    ctx.gate_order, ctx.n_inputs = gate_order, len(inputs)


def _ffn_backward_with(feed_forward_bwd):
    def backward(ctx, dy, _dh, _dpre):
        x, w_in, b_in, w_out, h, pre, w_up, b_up = ctx.saved_tensors
        extra = () if w_up is None else (w_up, b_up)
        dx, dw_in, db_in, dw_out, db_out, dw_up, db_up = feed_forward_bwd(
            dy, x, w_in, b_in, w_out, h, pre, ctx.activation, ctx.has_b_out, ctx.backend, ctx.gate_order, *extra)
        grads = (dx, dw_in, db_in if b_in is not None else None, dw_out, db_out if ctx.has_b_out else None, None,
                 None, None, dw_up if w_up is not None else None, db_up if b_up is not None else None)
        return grads[:ctx.n_inputs]
    return backward


_feed_forward.register_autograd(_ffn_backward_with(_feed_forward_bwd), setup_context=_ffn_setup)
_feed_forward_eager = EagerTwin(_feed_forward, _feed_forward_body, _ffn_setup,
                                _ffn_backward_with(_feed_forward_bwd_body), name="feed_forward")


# ----------------------------------------------------------------------------- argument checks

# Every public call runs these checks, so they are written to cost little (issue 17): input's
# dtype and device are read once and compared, a parameter's shape is compared as a torch.Size.

def _check_tensor(fn: str, name: str, t, dtype: Optional[torch.dtype] = None, device=None,
                  optional: bool = False):
    """t is a floating-point Tensor (or None when optional) of input's ``dtype`` and ``device``
    (when given)."""
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(f"fastlm.{fn}: {name} must be a Tensor{' or None' if optional else ''}, got "
                                f"{type(t).__name__}")
    if not t.is_floating_point():
        raise ArgumentTypeError(f"fastlm.{fn}: {name} must be floating point, got dtype {t.dtype}")
    if dtype is not None:
        if t.dtype != dtype:
            raise ArgumentTypeError(f"fastlm.{fn}: {name} has dtype {t.dtype} but input has {dtype}; they must match")
        if t.device != device:
            raise ArgumentError(f"fastlm.{fn}: {name} is on {t.device} but input is on {device}")


def _check_shape(fn: str, name: str, t: Optional[Tensor], shape: tuple, what: str):
    if t is not None and t.shape != shape:
        raise ArgumentError(f"fastlm.{fn}: {name} must be {what} = {list(shape)}, got {list(t.shape)}")


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def _autocast_may_apply() -> bool:
    """Whether autocast_inputs could cast anything: a cheap test for the usual call (no autocast
    region); while compiling always True (dynamo traces torch.is_autocast_enabled, not this)."""
    return _any_autocast is None or compiling() or _any_autocast()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _flatten(input: Tensor) -> Tensor:
    # (tokens, features), a view when the leading dims allow it; the token count is spelled
    # out, since -1 is ambiguous for zero features (nn.Linear(0, n) is legal: bias-only output)
    return input.reshape(math.prod(input.shape[:-1]), input.shape[-1])


# ----------------------------------------------------------------------------- the native path

_gelu_tanh = functools.partial(torch.nn.functional.gelu, approximate="tanh")  # a C call, no Python frame


# fastlm's activation names -> torch's own functions, each the formula of ref.act (checked in
# tests/test_eager_ffn.py): relu max(z, 0); gelu z Phi(z); gelu_tanh the tanh form; silu z sigmoid(z).
_TORCH_ACT = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "gelu_tanh": _gelu_tanh,
              "silu": torch.nn.functional.silu}
_TORCH_GATE = {name: _TORCH_ACT[a] for name, a in GATED.items()}  # the activation of the gate half


def _native_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> Tensor:
    """The "torch" backend (the CPU path): F.linear then torch's own activation, with torch's
    autograd; any leading dims, as F.linear takes them."""
    z = torch.nn.functional.linear(input, weight, bias)
    return z if activation is None else _TORCH_ACT[activation](z)


def _native_feed_forward(input: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor,
                         b_out: Optional[Tensor], activation: str, gate_order: str = "gate_up",
                         w_up: Optional[Tensor] = None, b_up: Optional[Tensor] = None) -> Tensor:
    """The "torch" backend: F.linear, the activation (gated: act(gate half) * up half, the gate
    rows first, or second for gate_order "up_gate"; with w_up, act(x w_in^T) * (x w_up^T), as
    a Hugging Face MLP writes it), F.linear, with torch's autograd."""
    z = torch.nn.functional.linear(input, w_in, b_in)
    gate = _TORCH_GATE.get(activation)
    if w_up is not None:
        h = gate(z) * torch.nn.functional.linear(input, w_up, b_up)
    elif gate is not None:
        first, second = z.chunk(2, dim=-1)
        g, u = (first, second) if gate_order == "gate_up" else (second, first)
        h = gate(g) * u
    else:
        h = _TORCH_ACT[activation](z)
    return torch.nn.functional.linear(h, w_out, b_out)


# ----------------------------------------------------------------------------- public functions

def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    """act(input @ weight.T + bias) in one kernel: input (..., K), weight (N, K) as nn.Linear
    stores it, bias (N,); activation None, "relu", "gelu" (erf), "gelu_tanh" or "silu".
    With activation None this is torch.nn.functional.linear.

    On the "torch" backend (the CPU path) this is F.linear then torch's own activation
    (F.gelu, approximate "none" or "tanh"; torch.relu; F.silu), with torch's autograd, which
    saves what the kernel path saves: input and weight, plus the pre-activation for gelu,
    gelu_tanh and silu (relu: its output)."""
    fn = "linear"
    # The CPU path first: one torch call, fastlm's checks only when torch refuses the call (to
    # name the argument). Before it, what torch accepts and fastlm refuses: integer tensors
    # (torch multiplies them), a weight that is not 2-D (torch takes a vector) and a bias that
    # is not (out_features,) (torch broadcasts it).
    if not _autocast_may_apply() and native_backend_of(input) and input.is_floating_point() \
            and isinstance(weight, Tensor) and weight.dim() == 2 \
            and (bias is None or (isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == weight.shape[0])) \
            and (activation is None or activation in _TORCH_ACT):
        try:
            z = _F_linear(input, weight, bias)
        except Exception:
            _check_linear(fn, input, weight, bias, activation)
            raise
        return z if activation is None else _TORCH_ACT[activation](z)
    if _autocast_may_apply():
        input, weight, bias = autocast_inputs(input, weight, bias)
    _check_linear(fn, input, weight, bias, activation)
    device = input.device
    if not compiling() and native_backend(device.type):
        return _native_linear(input, weight, bias, activation)
    name = activation or "none"
    save = _needs_grad(input, weight, bias)
    y, _ = _linear_eager(_flatten(input), weight, bias, name, save)
    return y.reshape(input.shape[:-1] + (weight.shape[0],))


_F_linear = torch.nn.functional.linear


def _check_linear(fn: str, input, weight, bias, activation) -> None:
    _check_tensor(fn, "input", input)
    dtype, device = input.dtype, input.device
    _check_tensor(fn, "weight", weight, dtype, device)
    _check_tensor(fn, "bias", bias, dtype, device, optional=True)
    if activation is not None and activation not in ACTIVATIONS:
        raise ArgumentError(f"fastlm.{fn}: activation must be None or one of {list(ACTIVATIONS)}, got {activation!r}"
                            + (" (the gated ones are feed_forward's)" if activation in GATED else ""))
    if input.dim() < 1 or weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        if input.dim() < 1:
            raise ArgumentError(f"fastlm.{fn}: input must be (..., in_features), at least 1-D, got a 0-d tensor")
        raise ArgumentError(f"fastlm.{fn}: weight must be (out_features, in_features) = (N, {input.shape[-1]}) for "
                            f"input of shape {list(input.shape)}, got {list(weight.shape)}")
    _check_shape(fn, "bias", bias, (weight.shape[0],), "(out_features,)")


def feed_forward(input: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, b_out: Optional[Tensor],
                 activation: str = "gelu", recompute: bool = False, *, gate_order: str = "gate_up",
                 w_up: Optional[Tensor] = None, b_up: Optional[Tensor] = None) -> Tensor:
    """The Transformer's feed-forward block, act(input @ w_in.T + b_in) @ w_out.T + b_out.

    input (..., d_model); w_in (hidden, d_model), or for the gated activations "swiglu"
    (silu), "geglu" (gelu, erf form), "geglu_tanh" (gelu's tanh approximation: Gemma's
    gelu_pytorch_tanh, Liger's geglu), "reglu" (relu) (2 * hidden, d_model) holding the
    gate rows and the up rows, so the block is (act(x Wg + bg) * (x Wu + bu)) W_out + b_out;
    w_out (d_model, hidden). Which half of w_in's rows (and b_in) is the gate is
    ``gate_order`` (keyword-only): "gate_up" (the default) the first half, as fastlm's
    FeedForward and a Llama checkpoint's torch.cat([gate_proj, up_proj]) stack them;
    "up_gate" the second half, the value-first order of torch's F.glu (a * sigmoid(b) for
    a, b = x.chunk(2, -1)) and flash-attn's GatedMlp (``y, gate = y.chunk(2, dim=-1)``).
    The kernels swap which half they call the gate; no weight is copied. It has no effect
    for the plain activations (its value is checked all the same).
    w_up, b_up (keyword-only, gated activations only): the up projection (hidden, d_model)
    and its bias (hidden,) as tensors of their own, as Hugging Face's gate_proj / up_proj
    keep them; w_in and b_in are then the gate's (hidden, d_model) and (hidden,), b_in and
    b_up both given or both None, gate_order "gate_up". The kernels read the two weights
    where they lie (a second pointer), so no (2 * hidden, d_model) copy is made per call,
    and each gets its own gradient.
    recompute=True saves no hidden activation for the backward and recomputes it from input.

    On the "torch" backend (the CPU path) the block is torch's own F.linear, activation
    (gated: act(gate) * up), F.linear, with torch's autograd, which saves for the backward
    what torch saves for that composition: the pre-activation and h (hidden-width tensors:
    2 for the plain activations, 1 for relu; for the gated ones the (tokens, 2 * hidden)
    pre-activation, act(gate) and h, one (tokens, hidden) tensor more than the kernel path,
    which keeps only the pre-activation and h). In 16-bit dtypes torch's composition rounds
    act(gate) to the input's dtype before the product (the kernels and the reference round h
    once). With recompute=True and a gradient needed it runs fastlm's reference op instead,
    which saves only the inputs.
    """
    fn = "feed_forward"
    if _autocast_may_apply():
        input, w_in, b_in, w_out, b_out, w_up, b_up = autocast_inputs(input, w_in, b_in, w_out, b_out, w_up, b_up)
    _check_tensor(fn, "input", input)
    dtype, device = input.dtype, input.device
    _check_tensor(fn, "w_in", w_in, dtype, device)
    _check_tensor(fn, "b_in", b_in, dtype, device, optional=True)
    _check_tensor(fn, "w_out", w_out, dtype, device)
    _check_tensor(fn, "b_out", b_out, dtype, device, optional=True)
    _check_tensor(fn, "w_up", w_up, dtype, device, optional=True)
    _check_tensor(fn, "b_up", b_up, dtype, device, optional=True)
    if not isinstance(activation, str) or (activation not in ACTIVATIONS and activation not in GATED):
        raise ArgumentError(f"fastlm.{fn}: activation must be one of {list(ACTIVATIONS) + list(GATED)}, got "
                            f"{activation!r}")
    if not isinstance(recompute, bool):
        raise ArgumentTypeError(f"fastlm.{fn}: recompute must be a bool, got {recompute!r}")
    if not isinstance(gate_order, str) or gate_order not in GATE_ORDERS:
        raise ArgumentError(f"fastlm.{fn}: gate_order must be one of {list(GATE_ORDERS)} (which half of a gated "
                            f"w_in's rows is the gate), got {gate_order!r}")
    d_model = input.shape[-1] if input.dim() >= 1 else None
    if w_in.dim() != 2 or w_in.shape[1] != d_model:
        raise ArgumentError(f"fastlm.{fn}: w_in must be (hidden, d_model) with d_model = {d_model} (input's last dim), "
                            f"got {list(w_in.shape)}")
    gated = activation in GATED
    if w_up is not None or b_up is not None:
        if w_up is None:
            raise ArgumentError(f"fastlm.{fn}: b_up goes with w_up (the separate up projection), got b_up alone")
        if not gated:
            raise ArgumentError(f"fastlm.{fn}: w_up is the up projection of a gated activation "
                                f"({list(GATED)}), got activation {activation!r}")
        if gate_order != "gate_up":
            raise ArgumentError(f"fastlm.{fn}: with w_up, w_in is the gate: gate_order must be 'gate_up', got "
                                f"{gate_order!r}")
        if w_up.shape != w_in.shape:
            raise ArgumentError(f"fastlm.{fn}: w_up must have w_in's (the gate's) shape {list(w_in.shape)}, got "
                                f"{list(w_up.shape)}")
        if (b_in is None) != (b_up is None):
            raise ArgumentError(f"fastlm.{fn}: with w_up, give the gate's b_in and the up's b_up both or neither")
        _check_shape(fn, "b_up", b_up, (w_in.shape[0],), "(hidden,)")
        hidden = w_in.shape[0]
    elif gated and w_in.shape[0] % 2:
        raise ArgumentError(f"fastlm.{fn}: for {activation!r} w_in stacks the gate and up projections, (2 * hidden, "
                            f"d_model): its {w_in.shape[0]} rows are odd")
    else:
        hidden = w_in.shape[0] // 2 if gated else w_in.shape[0]
    if w_out.dim() != 2 or w_out.shape[1] != hidden or w_out.shape[0] != d_model:
        raise ArgumentError(f"fastlm.{fn}: w_out must be (d_model, hidden) = {[d_model, hidden]}, got "
                            f"{list(w_out.shape)}")
    _check_shape(fn, "b_in", b_in, (w_in.shape[0],), "(w_in's rows,)")
    _check_shape(fn, "b_out", b_out, (d_model,), "(d_model,)")
    if not compiling() and native_backend(device.type):
        if not recompute or not _needs_grad(input, w_in, b_in, w_out, b_out, w_up, b_up):
            return _native_feed_forward(input, w_in, b_in, w_out, b_out, activation, gate_order, w_up, b_up)
        save = False
    else:
        save = not recompute and _needs_grad(input, w_in, b_in, w_out, b_out, w_up, b_up)
    up = () if w_up is None else (w_up, b_up)
    y, _, _ = _feed_forward_eager(_flatten(input), w_in, b_in, w_out, b_out, activation, save, gate_order, *up)
    return y.reshape(input.shape)
