"""Distillation losses: KL divergence, the generalised JSD and its fused lm-head form.

    fastlm::kl_div(input (R, C), target (R, C), log_target, elementwise) -> loss (R, C) or row sums (R,)
    fastlm::kl_div_bwd(grad (R, C), input, target, log_target, need_target, backend) -> (dinput, dtarget)
    fastlm::jsd(student (R, V), teacher (R, V), label?, beta, ignore_index) -> per-row loss (R,)
    fastlm::jsd_bwd(dloss (R,), student, teacher, label?, beta, ignore_index, backend) -> dstudent
    fastlm::linear_jsd(x, weight, teacher_x, teacher_weight, label?, beta, ignore_index, temperature,
                       chunk_size, compute_grads) -> (loss, dx, dweight)

Formulas and conventions (which side beta weights, the two KL ends, masked classes):
fastlm/reference/distill.py. The public functions move the class dim last as rows, and reduce
the per-row results with plain torch ops (seen through by autograd and torch.compile).

kl_div on the "torch" backend (the CPU path) is torch.kl_div itself; the ops serve the Triton
backend and torch.compile. jsd and linear_jsd have no torch twin: their "torch" backend is the
reference. In eager mode the ops' bodies run through an EagerTwin (fastlm/ops/_eager.py).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..backend import get_backend, native_backend, resolve
from ..errors import ArgumentError, ArgumentTypeError
from ..reference import distill as ref
from ._autocast import autocast_inputs, no_autocast
from ._eager import EagerTwin, compiling
from .linear_cross_entropy import default_chunk_size

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KL_REDUCTIONS = ("none", "batchmean", "sum", "mean")
_NO_CUDA = "fastlm has no CUDA C++ kernel for the distillation losses (use the triton backend)"


# ----------------------------------------------------------------------------- backend choice

def _pick_backend(fn: str, tensors, requested: Optional[str] = None) -> str:
    device_type = tensors[0].device.type
    if requested is None:
        if native_backend(device_type):
            return "torch"
    elif requested == "torch" or (requested == "auto" and device_type != "cuda"):
        return "torch"
    bad = next((f"an input has dtype {t.dtype}; the kernels take float32, float16 and bfloat16"
                for t in tensors if t.dtype not in _KERNEL_DTYPES), None)
    return resolve(fn, device_type, {"triton": bad, "cuda": _NO_CUDA}, requested)


def _kernels():
    from fastlm.kernels import distill
    return distill


def _row_dtype(*tensors: Tensor) -> torch.dtype:
    return ref.compute_dtype(*tensors)


# ----------------------------------------------------------------------------- argument checks

def _check_tensor(fn: str, name: str, value, floating: bool = True) -> None:
    if not isinstance(value, Tensor):
        raise ArgumentTypeError(f"fastlm.{fn}: {name} must be a Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise ArgumentTypeError(f"fastlm.{fn}: {name} must be a floating-point tensor, got dtype {value.dtype}")


def _check_same_device(fn: str, first: tuple[str, Tensor], *others: tuple[str, Optional[Tensor]]) -> None:
    for name, t in others:
        if t is not None and t.device != first[1].device:
            raise ArgumentError(f"fastlm.{fn}: {name} is on {t.device} but {first[0]} is on {first[1].device}")


def _check_beta(fn: str, beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) \
            or not 0.0 <= beta <= 1.0:
        raise ArgumentError(f"fastlm.{fn}: beta must be a finite number in [0, 1], got {beta!r}")
    return float(beta)


def _check_ignore_index(fn: str, ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ArgumentTypeError(f"fastlm.{fn}: ignore_index must be an int, got {ignore_index!r}")
    return ignore_index


def _check_target(fn: str, target, rows_shape, device) -> Optional[Tensor]:
    """The per-row labels (only compared with ignore_index): None, or integers of rows_shape."""
    if target is None:
        return None
    _check_tensor(fn, "target", target, floating=False)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ArgumentTypeError(f"fastlm.{fn}: target must hold integer labels (int64 or int32), "
                                f"got dtype {target.dtype}")
    if tuple(target.shape) != tuple(rows_shape):
        raise ArgumentError(f"fastlm.{fn}: target must have shape {list(rows_shape)} (one label per row), "
                            f"got {list(target.shape)}")
    if target.device != device:
        raise ArgumentError(f"fastlm.{fn}: target is on {target.device} but the inputs are on {device}")
    return target.reshape(-1)


def _counted_rows(label: Optional[Tensor], ignore_index: int, rows: int, device) -> Tensor:
    """The mean's divisor as a tensor (no host sync): the counted rows, 1 where there are none
    (every row ignored gives a loss of 0 with zero gradients, as fastlm.cross_entropy)."""
    if label is None:
        return torch.full((), float(max(rows, 1)), device=device)
    return (label != ignore_index).sum(dtype=torch.float32).clamp_min_(1.0)


# ----------------------------------------------------------------------------- kl_div ops

@no_autocast
def _kl_div_body(input: Tensor, target: Tensor, log_target: bool, elementwise: bool) -> Tensor:
    backend = _pick_backend("kl_div", (input, target))
    if backend == "triton":
        return _kernels().kl_div_fwd(input, target, log_target, elementwise,
                                     torch.promote_types(input.dtype, target.dtype))
    loss = ref.kl_div_pointwise(input, target, log_target)
    return loss.to(torch.promote_types(input.dtype, target.dtype)) if elementwise else loss.sum(-1)


_kl_div = torch.library.custom_op("fastlm::kl_div", mutates_args=())(_kl_div_body)


@_kl_div.register_fake
def _(input, target, log_target, elementwise):
    if elementwise:
        return input.new_empty(input.shape, dtype=torch.promote_types(input.dtype, target.dtype))
    return input.new_empty(input.shape[0], dtype=_row_dtype(input, target))


@no_autocast
def _kl_div_bwd_body(grad: Tensor, input: Tensor, target: Tensor, log_target: bool, need_target: bool,
                     backend: str) -> tuple[Tensor, Tensor]:
    chosen = _pick_backend("kl_div", (input, target), backend)
    if chosen == "triton":
        dx, dt = _kernels().kl_div_bwd(grad, input, target, log_target, need_target, input.dtype, target.dtype)
    else:
        dx, dt = ref.kl_div_pointwise_bwd(grad, input, target, log_target, need_target)
        dx, dt = dx.to(input.dtype), (dt.to(target.dtype) if dt is not None else None)
    return dx, (dt if dt is not None else input.new_empty(0))


_kl_div_bwd = torch.library.custom_op("fastlm::kl_div_bwd", mutates_args=())(_kl_div_bwd_body)


@_kl_div_bwd.register_fake
def _(grad, input, target, log_target, need_target, backend):
    dt = torch.empty_like(target, memory_format=torch.contiguous_format) if need_target else input.new_empty(0)
    return torch.empty_like(input, memory_format=torch.contiguous_format), dt


def _kl_setup_context(ctx, inputs, output):
    input, target, log_target, elementwise = inputs
    ctx.save_for_backward(input, target)
    ctx.options = (log_target, elementwise)
    ctx.backend = get_backend()


def _kl_backward_with(kl_div_bwd):
    def backward(ctx, dloss):
        input, target = ctx.saved_tensors
        log_target, elementwise = ctx.options
        need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = dloss if elementwise else dloss[:, None].expand(input.shape)
        dx, dt = kl_div_bwd(grad, input, target, log_target, need_target, ctx.backend)
        return (dx if need_input else None), (dt if need_target else None), None, None
    return backward


_kl_div.register_autograd(_kl_backward_with(_kl_div_bwd), setup_context=_kl_setup_context)
_kl_div_eager = EagerTwin(_kl_div, _kl_div_body, _kl_setup_context, _kl_backward_with(_kl_div_bwd_body),
                          name="kl_div")


def kl_div(input: Tensor, target: Tensor, size_average: Optional[bool] = None, reduce: Optional[bool] = None,
           reduction: str = "mean", log_target: bool = False) -> Tensor:
    """torch.nn.functional.kl_div on fastlm's kernels: torch 2.13's arguments in its order (the
    deprecated size_average and reduce included: given, they set the reduction by torch's
    legacy rule, with torch's warning), and its results.

    input: log-probabilities, any shape; target: probabilities (log-probabilities with
    log_target=True), broadcastable with input as torch allows. Pointwise loss
    target * (log target - input) (torch.kl_div's formula exactly: 0 where target is 0,
    NaN for 0 * -inf; fastlm/reference/distill.py); reduction "mean" divides the sum by the
    number of elements (torch's warning included), "batchmean" by input.size(0), "sum",
    "none". Gradients flow to input and, when it requires grad, to target. The kernels compute
    in float32 for every dtype; on the "torch" backend (the CPU path) this is torch.kl_div.
    """
    legacy = size_average is not None or reduce is not None
    if legacy:
        applied = torch.nn._reduction.legacy_get_string(size_average, reduce)
    else:
        if reduction not in _KL_REDUCTIONS:
            raise ArgumentError(f"fastlm.kl_div: reduction must be one of {_KL_REDUCTIONS}, got {reduction!r}")
        if reduction == "mean":
            warnings.warn(
                "reduction: 'mean' divides the total loss by both the batch size and the support size."
                "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
                "'mean' will be changed to behave the same as 'batchmean' in the next major release.",
                stacklevel=2)
        applied = "sum" if reduction == "batchmean" else reduction
    _check_tensor("kl_div", "input", input)
    _check_tensor("kl_div", "target", target)
    if isinstance(log_target, bool) or log_target in (0, 1):
        log_target = bool(log_target)
    else:
        raise ArgumentTypeError(f"fastlm.kl_div: log_target must be a bool, got {log_target!r}")
    _check_same_device("kl_div", ("input", input), ("target", target))
    try:
        shape = torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        raise ArgumentError(f"fastlm.kl_div: target of shape {list(target.shape)} does not broadcast with input "
                            f"of shape {list(input.shape)}") from None
    if not compiling() and native_backend(input.device.type):
        out = _native_kl_div(input, target, torch.nn._reduction.get_enum(applied), log_target)
    else:
        out = _kl_div_rows(input, target, shape, applied, log_target)
    if reduction == "batchmean" and input.dim() != 0:
        out = out / input.size()[0]
    return out


@no_autocast
def _native_kl_div(input: Tensor, target: Tensor, reduction: int, log_target: bool) -> Tensor:
    """torch's own kl_div, autocast off as in the ops' bodies: the loss keeps the inputs' dtype
    on every backend (fastlm/ops/_autocast.py: losses are not cast)."""
    return torch.kl_div(input, target, reduction, log_target=log_target)


def _result_dtype(input: Tensor, target: Tensor) -> torch.dtype:
    """torch.result_type for two floating tensors (which torch.compile cannot trace): a 0-d
    tensor beside a dimensioned one does not decide the dtype."""
    if (input.dim() == 0) != (target.dim() == 0):
        return target.dtype if input.dim() == 0 else input.dtype
    return torch.promote_types(input.dtype, target.dtype)


def _kl_div_rows(input: Tensor, target: Tensor, shape, reduction: str, log_target: bool) -> Tensor:
    classes = shape[-1] if len(shape) else 1
    rows = math.prod(shape[:-1]) if len(shape) else 1
    # Broadcast operands stay views (stride 0) wherever the row merge allows it.
    x = input.expand(shape).reshape(rows, classes)
    t = target.expand(shape).reshape(rows, classes)
    dtype = _result_dtype(input, target)
    out = _kl_div_eager(x, t, log_target, reduction == "none")
    if reduction == "none":
        return out.reshape(shape).to(dtype)
    total = out.sum()
    if reduction == "mean":
        total = total / math.prod(shape)  # 0 elements: 0 / 0 = NaN, as torch
    return total.to(dtype)


# ----------------------------------------------------------------------------- jsd ops

@no_autocast
def _jsd_body(student: Tensor, teacher: Tensor, label: Optional[Tensor], beta: float,
              ignore_index: int) -> Tensor:
    backend = _pick_backend("jsd", (student, teacher))
    if backend == "triton":
        return _kernels().jsd(student, teacher, label, beta, ignore_index, 1.0, False)[0]
    return ref.jsd_rows(student, teacher, label, beta, ignore_index, False)[0]


_jsd = torch.library.custom_op("fastlm::jsd", mutates_args=())(_jsd_body)


@_jsd.register_fake
def _(student, teacher, label, beta, ignore_index):
    return student.new_empty(student.shape[0], dtype=_row_dtype(student, teacher))


@no_autocast
def _jsd_bwd_body(dloss: Tensor, student: Tensor, teacher: Tensor, label: Optional[Tensor], beta: float,
                  ignore_index: int, backend: str) -> Tensor:
    chosen = _pick_backend("jsd", (student, teacher), backend)
    if chosen == "triton":
        return _kernels().jsd(student, teacher, label, beta, ignore_index, 1.0, False, dloss=dloss.float())[1]
    _, grad = ref.jsd_rows(student, teacher, label, beta, ignore_index, True)
    return (grad * dloss.to(grad.dtype)[:, None]).to(student.dtype)


_jsd_bwd = torch.library.custom_op("fastlm::jsd_bwd", mutates_args=())(_jsd_bwd_body)


@_jsd_bwd.register_fake
def _(dloss, student, teacher, label, beta, ignore_index, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _jsd_setup_context(ctx, inputs, output):
    student, teacher, label, beta, ignore_index = inputs
    ctx.save_for_backward(student, teacher, label)
    ctx.options = (beta, ignore_index)
    ctx.backend = get_backend()


def _jsd_backward_with(jsd_bwd):
    def backward(ctx, dloss):
        student, teacher, label = ctx.saved_tensors
        beta, ignore_index = ctx.options
        # The teacher is a constant of the loss: no gradient flows to it (GKD, Liger).
        return jsd_bwd(dloss, student, teacher, label, beta, ignore_index, ctx.backend), None, None, None, None
    return backward


_jsd.register_autograd(_jsd_backward_with(_jsd_bwd), setup_context=_jsd_setup_context)
_jsd_eager = EagerTwin(_jsd, _jsd_body, _jsd_setup_context, _jsd_backward_with(_jsd_bwd_body), name="jsd")


def jsd(student_logprobs: Tensor, teacher_logprobs: Tensor, target: Optional[Tensor] = None, beta: float = 0.5,
        ignore_index: int = -100) -> Tensor:
    """The generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024), as Liger-Kernel's
    LigerJSD defines it, between log-probabilities of shape (..., V):

        M = beta * P_teacher + (1 - beta) * P_student        (beta weights the teacher)
        JSD_beta = beta * KL(P_teacher || M) + (1 - beta) * KL(P_student || M)

    beta = 0 is the forward KL, KL(teacher || student); beta = 1 the reverse KL,
    KL(student || teacher) (the limits of JSD_beta / beta and JSD_beta / (1 - beta); JSD_beta
    itself tends to 0 there). Rows whose target (labels of shape (...), optional) equals
    ignore_index count for nothing; the loss is the mean over the counted rows (0, with zero
    gradients, when none is counted). The gradient flows to student_logprobs only, elementwise
    (the log-probabilities are the variable, as in F.kl_div); the teacher is a constant.
    A class with zero probability in a model adds nothing to that model's sum, so a vocabulary
    masked with -inf in both is finite. Returns a scalar in the student's dtype.
    """
    fn = "jsd"
    _check_tensor(fn, "student_logprobs", student_logprobs)
    _check_tensor(fn, "teacher_logprobs", teacher_logprobs)
    if student_logprobs.dim() == 0:
        raise ArgumentError(f"fastlm.{fn}: student_logprobs must have a class dimension (..., V), got a 0-d tensor")
    if teacher_logprobs.shape != student_logprobs.shape:
        raise ArgumentError(f"fastlm.{fn}: teacher_logprobs must have the student's shape "
                            f"{list(student_logprobs.shape)}, got {list(teacher_logprobs.shape)}")
    _check_same_device(fn, ("student_logprobs", student_logprobs), ("teacher_logprobs", teacher_logprobs))
    beta = _check_beta(fn, beta)
    ignore_index = _check_ignore_index(fn, ignore_index)
    vocab = student_logprobs.shape[-1]
    label = _check_target(fn, target, student_logprobs.shape[:-1], student_logprobs.device)
    rows = math.prod(student_logprobs.shape[:-1])
    s = student_logprobs.reshape(rows, vocab)
    t = teacher_logprobs.reshape(rows, vocab)
    loss_rows = _jsd_eager(s, t, label, beta, ignore_index)
    loss = loss_rows.sum() / _counted_rows(label, ignore_index, rows, s.device)
    return loss.to(student_logprobs.dtype)


# ----------------------------------------------------------------------------- linear_jsd ops

def _acc_dtype(weight: Tensor) -> torch.dtype:
    """dweight's running sum across chunks: float32 for 16-bit weights (one rounding at the end)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


@no_autocast
def _linear_jsd_body(x: Tensor, weight: Tensor, teacher_x: Tensor, teacher_weight: Tensor, label: Optional[Tensor],
                     beta: float, ignore_index: int, temperature: float, chunk_size: int,
                     compute_grads: bool) -> tuple[Tensor, Tensor, Tensor]:
    backend = _pick_backend("linear_jsd", (x, weight, teacher_x, teacher_weight))
    n = x.shape[0]
    divisor = _counted_rows(label, ignore_index, n, x.device)
    total = torch.zeros((), dtype=_row_dtype(x, teacher_x), device=x.device)
    dx, dweight = x.new_empty(0), x.new_empty(0)
    if compute_grads:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dweight = torch.zeros(weight.shape, dtype=_acc_dtype(weight), device=x.device)
        scale = (1.0 / divisor).to(torch.float32)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        x_chunk = x[start:end]
        logits = x_chunk @ weight.t()
        teacher_logits = teacher_x[start:end] @ teacher_weight.t()
        lab = label[start:end] if label is not None else None
        if backend == "triton":
            loss, d = _kernels().jsd(logits, teacher_logits, lab, beta, ignore_index, temperature, True,
                                     dloss=scale.expand(end - start) if compute_grads else None,
                                     out=logits if compute_grads else None)
        else:
            loss, d = ref.jsd_logits_rows(logits, teacher_logits, lab, beta, ignore_index, temperature,
                                          compute_grads)
            if d is not None:
                d = (d * scale.to(d.dtype)).to(logits.dtype)
        total = total + loss.sum()
        if compute_grads:
            torch.mm(d, weight, out=dx[start:end])
            if dweight.dtype == d.dtype:
                dweight.addmm_(d.t(), x_chunk)
            else:  # a chunk-sized up-cast, never a (V, H) one
                dweight.addmm_(d.t().to(dweight.dtype), x_chunk.to(dweight.dtype))
    if compute_grads:
        dweight = dweight.to(weight.dtype)
    return total / divisor, dx, dweight


_linear_jsd = torch.library.custom_op("fastlm::linear_jsd", mutates_args=())(_linear_jsd_body)


@_linear_jsd.register_fake
def _(x, weight, teacher_x, teacher_weight, label, beta, ignore_index, temperature, chunk_size, compute_grads):
    loss = x.new_empty((), dtype=_row_dtype(x, teacher_x))
    if not compute_grads:
        return loss, x.new_empty(0), x.new_empty(0)
    return (loss, torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _ljsd_setup_context(ctx, inputs, output):
    _, dx, dweight = output
    ctx.precomputed = inputs[-1]
    ctx.save_for_backward(dx, dweight)


def _ljsd_backward(ctx, dloss, _ddx, _ddweight):
    if not ctx.precomputed:  # nothing required a gradient at the forward
        return (None,) * 10
    dx, dweight = ctx.saved_tensors
    # Gradients flow to the student only: the teacher's input and weight are constants.
    return (dx * dloss.to(dx.dtype), dweight * dloss.to(dweight.dtype)) + (None,) * 8


_linear_jsd.register_autograd(_ljsd_backward, setup_context=_ljsd_setup_context)
_linear_jsd_eager = EagerTwin(_linear_jsd, _linear_jsd_body, _ljsd_setup_context, _ljsd_backward,
                              name="linear_jsd")


def linear_jsd(student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
               target: Optional[Tensor] = None, beta: float = 0.5, ignore_index: int = -100,
               temperature: float = 1.0, *, chunk_size: Optional[int] = None) -> Tensor:
    """fastlm.jsd(log_softmax(student_input @ student_weight.T / temperature),
    log_softmax(teacher_input @ teacher_weight.T / temperature), target, beta, ignore_index)
    without materialising either model's (N, V) logits (Liger-Kernel's LigerFusedLinearJSD).

    student_input (..., H), student_weight (V, H) as nn.Linear stores it; teacher_input
    (..., H_t) with the student's leading dims, teacher_weight (V, H_t); target labels of
    shape (...) or None. The rows go in chunks (chunk_size rows, default a chunk of logits
    about the size of the input): per chunk both logits by matmul, the loss and the gradient
    with respect to the student's logits by one kernel (over those logits, in place), folded
    at once into the input's and weight's gradients. Since the loss is a mean, its gradients
    are formed in the forward for an upstream gradient of 1, and the backward only scales
    them. Gradients flow to student_input and student_weight only. dweight is summed across
    chunks in float32 for 16-bit weights. The loss comes back in student_input's dtype.
    """
    fn = "linear_jsd"
    names = ("student_input", "student_weight", "teacher_input", "teacher_weight")
    tensors = (student_input, student_weight, teacher_input, teacher_weight)
    for name, t in zip(names, tensors):
        _check_tensor(fn, name, t)
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        student_input, student_weight, teacher_input, teacher_weight = autocast_inputs(*tensors)
    if student_input.dim() < 1 or student_weight.dim() != 2 or teacher_weight.dim() != 2:
        raise ArgumentError(f"fastlm.{fn}: expected student_input (..., H), student_weight (V, H) and "
                            f"teacher_weight (V, H_t), got {list(student_input.shape)}, "
                            f"{list(student_weight.shape)}, {list(teacher_weight.shape)}")
    hidden, vocab = student_input.shape[-1], student_weight.shape[0]
    if student_weight.shape[1] != hidden:
        raise ArgumentError(f"fastlm.{fn}: student_weight must be (V, {hidden}) for student_input of shape "
                            f"{list(student_input.shape)}, got {list(student_weight.shape)}")
    if teacher_input.shape[:-1] != student_input.shape[:-1] or teacher_input.dim() != student_input.dim():
        raise ArgumentError(f"fastlm.{fn}: teacher_input must have the student_input's leading dims "
                            f"{list(student_input.shape[:-1])}, got shape {list(teacher_input.shape)}")
    if teacher_weight.shape != (vocab, teacher_input.shape[-1]):
        raise ArgumentError(f"fastlm.{fn}: teacher_weight must be ({vocab}, {teacher_input.shape[-1]}) (the "
                            f"student's vocabulary, the teacher's hidden size), got {list(teacher_weight.shape)}")
    for (iname, i), (wname, w) in (((names[0], student_input), (names[1], student_weight)),
                                   ((names[2], teacher_input), (names[3], teacher_weight))):
        if i.dtype != w.dtype:
            raise ArgumentTypeError(f"fastlm.{fn}: {wname} has dtype {w.dtype} but {iname} has {i.dtype} "
                                    f"(as F.linear, they must agree)")
    _check_same_device(fn, ("student_input", student_input), ("student_weight", student_weight),
                       ("teacher_input", teacher_input), ("teacher_weight", teacher_weight))
    beta = _check_beta(fn, beta)
    ignore_index = _check_ignore_index(fn, ignore_index)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ArgumentError(f"fastlm.{fn}: temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ArgumentError(f"fastlm.{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    label = _check_target(fn, target, student_input.shape[:-1], student_input.device)
    x = student_input.reshape(-1, hidden)
    xt = teacher_input.reshape(-1, teacher_input.shape[-1])
    n = x.shape[0]
    chunk = chunk_size or default_chunk_size(n, hidden, vocab)
    wants_grad = torch.is_grad_enabled() and (student_input.requires_grad or student_weight.requires_grad)
    loss, _, _ = _linear_jsd_eager(x, student_weight, xt, teacher_weight, label, beta, ignore_index,
                                   float(temperature), chunk, wants_grad)
    return loss.to(student_input.dtype)
