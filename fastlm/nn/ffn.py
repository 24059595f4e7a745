"""Linear (a drop-in for torch.nn.Linear, with an optional fused activation) and FeedForward.

Linear subclasses torch.nn.Linear: constructor, parameters, initialisation, state_dict and
``isinstance`` are torch's; ``activation`` (keyword, default None) is applied in the matmul's
epilogue. FeedForward is the Transformer block act(x W_in^T + b_in) W_out^T + b_out on
fastlm.feed_forward, built of two Linear layers ``fc_in`` and ``fc_out`` (for the gated
activations fc_in has 2 * d_hidden outputs: the gate rows, then the up rows; or with
``gate_order="up_gate"`` the up (value) rows first, the layout of torch's F.glu and of
flash-attn's GatedMlp.fc1, so such a checkpoint loads as it is), with dropout on the block's
output (where GPT-2 and BERT put it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..ops import ffn as F


class Linear(torch.nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: Optional[str] = None,
                 device=None, dtype=None) -> None:
        if activation is not None and activation not in F.ACTIVATIONS:
            raise ArgumentError(f"Linear: activation must be None or one of {list(F.ACTIVATIONS)}, got {activation!r}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


class FeedForward(torch.nn.Module):
    def __init__(self, d_model: int, d_hidden: int, activation: str = "gelu", bias: bool = True, dropout: float = 0.0,
                 recompute: bool = False, device=None, dtype=None, *, gate_order: str = "gate_up") -> None:
        super().__init__()
        if activation not in F.ACTIVATIONS and activation not in F.GATED:
            raise ArgumentError(f"FeedForward: activation must be one of {list(F.ACTIVATIONS) + list(F.GATED)}, got "
                                f"{activation!r}")
        if not isinstance(gate_order, str) or gate_order not in F.GATE_ORDERS:
            raise ArgumentError(f"FeedForward: gate_order must be one of {list(F.GATE_ORDERS)} (which half of fc_in's "
                                f"rows is the gate), got {gate_order!r}")
        if not 0.0 <= dropout < 1.0:
            raise ArgumentError(f"FeedForward: dropout must be in [0, 1), got {dropout!r}")
        self.d_model, self.d_hidden = d_model, d_hidden
        self.activation, self.dropout, self.recompute = activation, dropout, recompute
        self.gate_order = gate_order
        rows = 2 * d_hidden if activation in F.GATED else d_hidden
        self.fc_in = Linear(d_model, rows, bias, device=device, dtype=dtype)
        self.fc_out = Linear(d_hidden, d_model, bias, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        y = F.feed_forward(input, self.fc_in.weight, self.fc_in.bias, self.fc_out.weight, self.fc_out.bias,
                           self.activation, self.recompute, gate_order=self.gate_order)
        return torch.nn.functional.dropout(y, self.dropout, self.training) if self.dropout > 0 else y

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation!r}, "
                f"dropout={self.dropout}, recompute={self.recompute}"
                + (f", gate_order={self.gate_order!r}" if self.gate_order != "gate_up" else ""))
