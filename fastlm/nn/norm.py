"""LayerNorm and RMSNorm modules: drop-ins for torch.nn.LayerNorm and torch.nn.RMSNorm.

They subclass their torch twins, so constructor arguments, defaults, parameter names,
initialisation, state_dict and ``isinstance`` checks are torch's own; only ``forward``
runs on fastlm's op. ``forward`` also takes an optional ``residual``: ``norm(x, residual)``
computes norm(x + residual) in one kernel, and with ``return_residual=True`` returns
(normed, x + residual) for pre-norm residual streams. ``dropout_p`` (keyword, with a residual)
drops x first, norm(dropout(x) + residual), in the same kernel, in training mode only
(``self.training``, as torch.nn.Dropout), so a model's sublayer dropout, residual add and next
norm are one call.

DropoutAddLayerNorm and DropoutAddRMSNorm are flash-attn's modules of those names (its
constructor: hidden size, prenorm, p, eps, residual_in_fp32): ``forward(x, residual=None)``
returns norm(dropout(x) + residual), and with prenorm=True also that residual stream (float32
with residual_in_fp32 when no float32 residual is given). Their parameters are torch's
LayerNorm / RMSNorm's, so state_dicts load from either.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..ops import norm as F


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input: Tensor, residual: Optional[Tensor] = None, return_residual: bool = False, *,
                dropout_p: float = 0.0):
        if residual is None:
            if return_residual:
                raise ArgumentError("LayerNorm: return_residual=True needs a residual")
            if dropout_p:
                raise ArgumentError("LayerNorm: dropout_p needs a residual (use DropoutAddLayerNorm)")
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                                return_residual=return_residual, dropout_p=dropout_p if self.training else 0.0)


class RMSNorm(torch.nn.RMSNorm):
    def forward(self, input: Tensor, residual: Optional[Tensor] = None, return_residual: bool = False, *,
                dropout_p: float = 0.0):
        if residual is None:
            if return_residual:
                raise ArgumentError("RMSNorm: return_residual=True needs a residual")
            if dropout_p:
                raise ArgumentError("RMSNorm: dropout_p needs a residual (use DropoutAddRMSNorm)")
            return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return F.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps,
                              return_residual=return_residual, dropout_p=dropout_p if self.training else 0.0)


def _check_p(name: str, p) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ArgumentError(f"{name}: p must be a number in [0, 1), got {p!r}")
    return float(p)


class DropoutAddLayerNorm(torch.nn.LayerNorm):
    """flash-attn's DropoutAddLayerNorm: layer_norm(dropout(x) + residual) over the last dim."""

    def __init__(self, hidden_size: int, prenorm: bool = False, p: float = 0.0, eps: float = 1e-5,
                 residual_in_fp32: bool = False, device=None, dtype=None, *, elementwise_affine: bool = True,
                 bias: bool = True):
        super().__init__(hidden_size, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        self.prenorm, self.p, self.residual_in_fp32 = prenorm, _check_p("DropoutAddLayerNorm", p), residual_in_fp32

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        return F.layer_norm_fn(x, self.weight, self.bias, residual, eps=self.eps,
                               dropout_p=self.p if self.training else 0.0, prenorm=self.prenorm,
                               residual_in_fp32=self.residual_in_fp32)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prenorm={self.prenorm}, p={self.p}, residual_in_fp32={self.residual_in_fp32}"


class DropoutAddRMSNorm(torch.nn.RMSNorm):
    """flash-attn's DropoutAddRMSNorm: rms_norm(dropout(x) + residual) over the last dim."""

    def __init__(self, hidden_size: int, prenorm: bool = False, p: float = 0.0, eps: float = 1e-5,
                 residual_in_fp32: bool = False, device=None, dtype=None, *, elementwise_affine: bool = True):
        super().__init__(hidden_size, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self.prenorm, self.p, self.residual_in_fp32 = prenorm, _check_p("DropoutAddRMSNorm", p), residual_in_fp32

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        return F.layer_norm_fn(x, self.weight, None, residual, eps=self.eps,
                               dropout_p=self.p if self.training else 0.0, prenorm=self.prenorm,
                               residual_in_fp32=self.residual_in_fp32, is_rms_norm=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prenorm={self.prenorm}, p={self.p}, residual_in_fp32={self.residual_in_fp32}"
