"""Loss modules: CrossEntropyLoss (a drop-in for torch.nn.CrossEntropyLoss) and
LinearCrossEntropyLoss (the fused lm-head + loss)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.cross_entropy import cross_entropy
from ..ops.linear_cross_entropy import linear_cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss on fastlm's kernels (same arguments, buffers and state_dict),
    plus the keyword-only extensions z_loss and softcap of fastlm.cross_entropy."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        # Positional arguments: keyword binding costs a call (issue 17); the order is cross_entropy's.
        return cross_entropy(input, target, self.weight, None, self.ignore_index, None, self.reduction,
                             self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap)

    def extra_repr(self) -> str:
        extras = [f"z_loss={self.z_loss}"] if self.z_loss else []
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        return ", ".join(extras)


class LinearCrossEntropyLoss(torch.nn.Module):
    """The loss of an lm-head without its logits: forward(input, weight, target, bias=None)
    equals CrossEntropyLoss()(input @ weight.T + bias, target) (see fastlm.linear_cross_entropy)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 acc_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.acc_dtype = acc_dtype  # the weight gradient's accumulator (None: float32 for 16-bit weights)

    def forward(self, input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(input, weight, target, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size,
                                    acc_dtype=self.acc_dtype)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"chunk_size={self.chunk_size}, acc_dtype={self.acc_dtype}")
