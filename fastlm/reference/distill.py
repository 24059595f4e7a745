"""Distillation losses in plain PyTorch: the oracle and the CPU path of fastlm/ops/distill.py.

KL divergence, exactly torch.kl_div's pointwise formula (input x log-probabilities, target t):

    log_target=False:  xlogy(t, t) - t * x       (0 where t == 0 unless x is -inf: 0 * -inf is NaN, as torch)
    log_target=True:   exp(t) * (t - x)          (exp(-inf) * (-inf - x) is NaN, as torch)

and its gradients as torch's autograd forms them from those ops:

    d/dx = -t                    or  -exp(t)
    d/dt = xlogy(t != 0, t) + t / t - x   or  exp(t) * (t - x) + exp(t)

(t / t is NaN at t == 0: so is torch's gradient of the target there.)

Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024; Liger-Kernel's LigerJSD), per
row, with s the student's and t the teacher's log-probabilities, Q = exp(s), P = exp(t):

    M = beta * P + (1 - beta) * Q                 (beta weights the teacher)
    JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M)

For 0 < beta < 1 the gradient with respect to s (elementwise: s is taken as the free variable,
as F.kl_div takes its input) is (1 - beta) * Q * (s - log M). At the two ends JSD_beta tends to
0; what GKD and Liger use there are the normalised limits (JSD_beta / beta as beta -> 0 and
JSD_beta / (1 - beta) as beta -> 1), the two KL directions:

    beta = 0:  KL(P || Q) = sum P * (t - s)        the forward KL, KL(teacher || student); grad -P
    beta = 1:  KL(Q || P) = sum Q * (s - t)        the reverse KL, KL(student || teacher); grad Q * (s - t + 1)

A class of zero probability adds nothing to a sum weighted by that probability (the limit
p log p -> 0), so a vocabulary masked with -inf in both models is finite; a NaN stays NaN.
log M is formed as logaddexp(t + log beta, s + log(1 - beta)), exact where P and Q are tiny.

Everything is computed in float32 (float64 for float64 inputs: the oracle's precision).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------- KL divergence

def kl_div_pointwise(input: Tensor, target: Tensor, log_target: bool) -> Tensor:
    """torch.kl_div's elementwise loss, in the compute dtype (float32, or float64)."""
    dtype = compute_dtype(input, target)
    x, t = input.to(dtype), target.to(dtype)
    if log_target:
        return torch.exp(t) * (t - x)
    return torch.xlogy(t, t) - t * x


def kl_div_pointwise_bwd(grad: Tensor, input: Tensor, target: Tensor, log_target: bool,
                         need_target: bool) -> tuple[Tensor, Tensor | None]:
    """(dinput, dtarget or None) for an upstream ``grad`` broadcastable to the inputs."""
    dtype = compute_dtype(input, target)
    x, t, g = input.to(dtype), target.to(dtype), grad.to(dtype)
    if log_target:
        p = torch.exp(t)
        dx = -(g * p)
        dt = g * (p * (t - x) + p) if need_target else None
    else:
        dx = -(g * t)
        dt = g * (torch.xlogy((t != 0).to(dtype), t) + t / t - x) if need_target else None
    return dx, dt


# ----------------------------------------------------------------------------- JSD

def _weighted(prob: Tensor, value: Tensor) -> Tensor:
    """prob * value, 0 where prob is 0 (a class nobody puts mass on costs nothing)."""
    return torch.where(prob == 0, torch.zeros((), dtype=prob.dtype), prob * value)


def jsd_pointwise(s: Tensor, t: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(terms, grad): the per-class terms of JSD_beta (their row sum is the row's loss) and
    d loss / d s, for student and teacher log-probabilities s, t of one dtype."""
    q, p = torch.exp(s), torch.exp(t)
    if beta == 0.0:
        return _weighted(p, t - s), -p
    if beta == 1.0:
        return _weighted(q, s - t), _weighted(q, s - t + 1)
    log_m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
    student = _weighted(q, s - log_m)
    return beta * _weighted(p, t - log_m) + (1 - beta) * student, (1 - beta) * student


def _counted(label: Tensor | None, ignore_index: int, rows: int, device) -> Tensor:
    if label is None:
        return torch.ones(rows, dtype=torch.bool, device=device)
    return label != ignore_index


def jsd_rows(student: Tensor, teacher: Tensor, label: Tensor | None, beta: float, ignore_index: int,
             want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Per-row JSD_beta of log-probabilities (R, V) (0 on ignored rows) and, when asked,
    d loss_row / d student (R, V) (0 on ignored rows), both in the compute dtype."""
    dtype = compute_dtype(student, teacher)
    terms, grad = jsd_pointwise(student.to(dtype), teacher.to(dtype), beta)
    counted = _counted(label, ignore_index, student.shape[0], student.device)[:, None]
    loss = torch.where(counted, terms, 0.0).sum(-1)
    return loss, (torch.where(counted, grad, 0.0) if want_grad else None)


def jsd_logits_rows(student_logits: Tensor, teacher_logits: Tensor, label: Tensor | None, beta: float,
                    ignore_index: int, temperature: float,
                    want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """jsd_rows of log_softmax(logits / temperature) for both models, and the gradient with
    respect to the student's logits: (1 / T) * (g - softmax * sum(g)), g the log-prob gradient."""
    dtype = compute_dtype(student_logits, teacher_logits)
    s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    loss, g = jsd_rows(s, t, label, beta, ignore_index, want_grad)
    if not want_grad:
        return loss, None
    counted = _counted(label, ignore_index, s.shape[0], s.device)[:, None]
    d = (g - torch.exp(s) * g.sum(-1, keepdim=True)) / temperature
    return loss, torch.where(counted, d, 0.0)  # (an ignored row of NaN logits: 0, not NaN * 0)
