"""LayerNorm and RMSNorm modules: drop-ins for torch.nn.LayerNorm and torch.nn.RMSNorm.

They subclass their torch twins, so constructor arguments, defaults, parameter names,
initialisation, state_dict and ``isinstance`` checks are torch's own; only ``forward``
runs on fastlm's op. ``forward`` also takes an optional ``residual``: ``norm(x, residual)``
computes norm(x + residual) in one kernel, and with ``return_residual=True`` returns
(normed, x + residual) for pre-norm residual streams.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..ops import norm as F


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input: Tensor, residual: Optional[Tensor] = None, return_residual: bool = False):
        if residual is None:
            if return_residual:
                raise ArgumentError("LayerNorm: return_residual=True needs a residual")
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                                return_residual=return_residual)


class RMSNorm(torch.nn.RMSNorm):
    def forward(self, input: Tensor, residual: Optional[Tensor] = None, return_residual: bool = False):
        if residual is None:
            if return_residual:
                raise ArgumentError("RMSNorm: return_residual=True needs a residual")
            return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return F.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps,
                              return_residual=return_residual)
