"""Loss modules: CrossEntropyLoss and LinearCrossEntropyLoss (the fused lm-head + loss), drop-ins
for their torch.nn twins; KLDivLoss (torch's twin), JSDLoss and LinearJSDLoss (distillation)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..ops.cross_entropy import cross_entropy
from ..ops.distill import jsd, kl_div, linear_jsd
from ..ops.linear_cross_entropy import linear_cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss on fastlm's kernels (same arguments, buffers and state_dict),
    plus the keyword-only extensions z_loss, softcap and process_group of fastlm.cross_entropy
    (process_group: vocabulary-parallel, the input and ``weight`` this rank's block of classes)."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, process_group=None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.process_group = process_group

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        # Positional arguments: keyword binding costs a call (issue 17); the order is cross_entropy's.
        return cross_entropy(input, target, self.weight, None, self.ignore_index, None, self.reduction,
                             self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             process_group=self.process_group)

    def extra_repr(self) -> str:
        extras = [f"z_loss={self.z_loss}"] if self.z_loss else []
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        if self.process_group is not None:
            extras.append("vocab_parallel=True")
        return ", ".join(extras)


# torch 2.13's module; an older torch (the GPU machine's 2.11) has none, and then fastlm's
# stands on _WeightedLoss with the same state (its __init__ below never calls torch's).
_TorchLinearCrossEntropyLoss = getattr(torch.nn, "LinearCrossEntropyLoss", None)


class LinearCrossEntropyLoss(_TorchLinearCrossEntropyLoss or torch.nn.modules.loss._WeightedLoss):
    """torch.nn.LinearCrossEntropyLoss (torch 2.13) on fastlm.linear_cross_entropy: the same
    arguments, the same state (the class-weight buffer ``weight`` and the projection
    ``linear``, a torch.nn.Linear(in_features, num_classes * prod(out_features)) stored flat
    as torch stores it), initialisation and repr, so state_dicts load both ways; forward
    (input, target) equals torch's without holding the logits. Plus fastlm's keyword-only
    extras z_loss, softcap, chunk_size and acc_dtype, off by default (fastlm.patch sets them
    so on a swapped torch module)."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: Optional[Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                 z_loss: float = 0.0, softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 acc_dtype: Optional[torch.dtype] = None) -> None:
        # torch's checks and torch's order of construction (the same random draws for the
        # Linear's initialisation), written out so it also runs where torch lacks the class.
        if weight is not None and weight.shape != (num_classes,):
            raise ArgumentError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise ArgumentError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        torch.nn.modules.loss._WeightedLoss.__init__(self, weight=weight, size_average=None, reduce=None,
                                                     reduction=reduction)
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = torch.nn.Linear(in_features, math.prod(out_features, start=num_classes), bias=bias,
                                      device=device, dtype=dtype)
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.acc_dtype = acc_dtype  # the weight gradient's accumulator (None: float32 for 16-bit weights)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        linear = self.linear
        linear_weight = linear.weight.reshape((self.num_classes, *self.out_features, linear.in_features))
        linear_bias = linear.bias.reshape((self.num_classes, *self.out_features)) if linear.bias is not None else None
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, options=self.options, z_loss=self.z_loss,
                                    softcap=self.softcap, chunk_size=self.chunk_size, acc_dtype=self.acc_dtype)

    def extra_repr(self) -> str:
        text = (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}")
        extras = [f"{name}={getattr(self, name)}" for name, off in _LCE_EXTRAS.items() if getattr(self, name) != off]
        return ", ".join([text] + extras)


# fastlm's extras and their "off" values: what fastlm.patch sets on a swapped torch module,
# and what the repr leaves out (so an unconfigured module prints as torch's does).
_LCE_EXTRAS = {"z_loss": 0.0, "softcap": None, "chunk_size": None, "acc_dtype": None}


# ----------------------------------------------------------------------------- distillation (issue 22)

class KLDivLoss(torch.nn.KLDivLoss):
    """torch.nn.KLDivLoss on fastlm.kl_div (same arguments, legacy size_average and reduce
    included, same state and repr)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return kl_div(input, target, None, None, self.reduction, self.log_target)


class JSDLoss(torch.nn.Module):
    """fastlm.jsd as a module (Liger-Kernel's LigerJSD): the generalised Jensen-Shannon
    divergence of GKD between student and teacher log-probabilities, beta weighting the
    teacher (beta = 0: KL(teacher || student), beta = 1: KL(student || teacher)), the mean over
    rows whose target is not ignore_index. Holds no parameters."""

    def __init__(self, beta: float = 0.5, ignore_index: int = -100) -> None:
        super().__init__()
        self.beta = beta
        self.ignore_index = ignore_index

    def forward(self, student_logprobs: Tensor, teacher_logprobs: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return jsd(student_logprobs, teacher_logprobs, target, self.beta, self.ignore_index)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, ignore_index={self.ignore_index}"


class LinearJSDLoss(torch.nn.Module):
    """fastlm.linear_jsd as a module (Liger-Kernel's LigerFusedLinearJSD): the JSD of the two
    models' lm-heads (logits / temperature) without materialising either's logits; the
    weights are passed to forward, as the models own them. Holds no parameters."""

    def __init__(self, beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0, *,
                 chunk_size: Optional[int] = None) -> None:
        super().__init__()
        self.beta = beta
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.chunk_size = chunk_size

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                target: Optional[Tensor] = None) -> Tensor:
        return linear_jsd(student_input, student_weight, teacher_input, teacher_weight, target, self.beta,
                          self.ignore_index, self.temperature, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        text = f"beta={self.beta}, ignore_index={self.ignore_index}, temperature={self.temperature}"
        return text + (f", chunk_size={self.chunk_size}" if self.chunk_size is not None else "")
