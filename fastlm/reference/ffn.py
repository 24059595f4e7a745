"""The feed-forward block in plain PyTorch, as the formula reads: the oracle and the CPU path.

    plain:  y = act(x w_in^T + b_in) w_out^T + b_out
    gated:  gu = x w_in^T + b_in, w_in (2H, K) with the gate rows first, then the up rows;
            g, u = gu[..., :H], gu[..., H:];  h = act(g) * u;  y = h w_out^T + b_out
            gate_order="up_gate" takes the halves the other way round, u, g = ..., the
            order of torch's F.glu (a * sigmoid(b): the first half is the value) and of
            flash-attn's GatedMlp (``y, gate = y.chunk(2, dim=-1)``)

The activations (``ACTIVATIONS``) and their derivatives are written out explicitly, so the
backward kernels' epilogues have a formula to be checked against:

    relu       max(z, 0)                             1[z > 0]
    gelu       z Phi(z)  (erf form)                  Phi(z) + z phi(z)
    gelu_tanh  z (1 + tanh(c (z + 0.044715 z^3))) / 2,  c = sqrt(2 / pi)
               derivative (1 + t) / 2 + z (1 - t^2) c (1 + 3 * 0.044715 z^2) / 2
    silu       z sigmoid(z)                          s (1 + z (1 - s)),  s = sigmoid(z)

Phi and phi are the standard normal CDF and density. The gated variants (``GATED``) name
the activation applied to the gate: SwiGLU (silu), GeGLU (gelu, erf form), GeGLU with
the tanh approximation ``geglu_tanh`` (gelu_tanh: Gemma's gelu_pytorch_tanh, Liger's geglu),
ReGLU (relu).

Each function computes in float32 (float64 stays float64) and returns its input's dtype;
``feed_forward`` rounds h to that dtype between the two matmuls, as the kernels store it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}
GATE_ORDERS = ("gate_up", "up_gate")  # which half of a gated w_in's rows comes first

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


def _check_activation(name: Optional[str]) -> None:
    if name is not None and name not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {name!r}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def act(z: Tensor, name: Optional[str]) -> Tensor:
    """The activation ``name`` (None: identity), in z's dtype."""
    _check_activation(name)
    if name is None:
        return z
    if name == "relu":
        return torch.relu(z)
    if name == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)))
    return z * torch.sigmoid(z)  # silu


def act_grad(z: Tensor, name: Optional[str]) -> Tensor:
    """d act(z) / dz by its explicit formula (None: ones), in z's dtype. relu' is 0 at 0."""
    _check_activation(name)
    if name is None:
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + z * pdf
    if name == "gelu_tanh":
        # z^2 capped at the dtype's largest finite value: where the cap bites, 1 - t^2 is
        # exactly 0, and 0 * inf would be NaN (float32 past |z| = 1.8e19) where the
        # derivative is 1 or 0.
        t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z))
        z2 = (z * z).clamp(max=torch.finfo(z.dtype).max)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z2)
    s = torch.sigmoid(z)  # silu
    return s * (1.0 + z * (1.0 - s))


def linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    """act(x w^T + b) for x (..., K), w (N, K), b (N,) or None; in x's dtype."""
    dt = _compute_dtype(x)
    z = x.to(dt) @ w.to(dt).t()
    if b is not None:
        z = z + b.to(dt)
    return act(z, activation).to(x.dtype)


def split_gated(gu: Tensor, gate_order: str = "gate_up") -> tuple[Tensor, Tensor]:
    """(g, u): the gate and up halves of gu's last dim, in gate_order ("gate_up": the gate
    first; "up_gate": the up (value) half first, as F.glu splits)."""
    check_gate_order(gate_order)
    first, second = gu.chunk(2, dim=-1)
    return (first, second) if gate_order == "gate_up" else (second, first)


def check_gate_order(gate_order) -> None:
    if gate_order not in GATE_ORDERS:
        raise ValueError(f"gate_order must be one of {GATE_ORDERS}, got {gate_order!r}")


def gated(x: Tensor, w: Tensor, b: Optional[Tensor], gated_name: str, gate_order: str = "gate_up") -> Tensor:
    """act(g) * u with g, u the two halves of x w^T + b: w (2H, K), b (2H,), gate rows first
    (gate_order "gate_up") or up rows first ("up_gate")."""
    if gated_name not in GATED:
        raise ValueError(f"gated must be one of {tuple(GATED)}, got {gated_name!r}")
    check_gate_order(gate_order)
    if w.shape[0] % 2:
        raise ValueError(f"gated: w must have an even number of rows (gate, then up), got {w.shape[0]}")
    dt = _compute_dtype(x)
    gu = x.to(dt) @ w.to(dt).t()
    if b is not None:
        gu = gu + b.to(dt)
    g, u = split_gated(gu, gate_order)
    return (act(g, GATED[gated_name]) * u).to(x.dtype)


def feed_forward(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, b_out: Optional[Tensor],
                 activation: Optional[str], gate_order: str = "gate_up") -> Tensor:
    """The whole block: activation one of ACTIVATIONS (w_in (H, D)), a key of GATED
    (w_in (2H, D), gate rows first, or up rows first with gate_order "up_gate") or None;
    w_out (D_out, H)."""
    if activation in GATED:
        h = gated(x, w_in, b_in, activation, gate_order)
    else:
        h = linear(x, w_in, b_in, activation)
    return linear(h, w_out, b_out, None)
