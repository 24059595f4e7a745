"""Softmax cross-entropy in plain PyTorch, row by row: the oracle and the CPU path.

Logits arrive as rows (R, C) (the op layer moves the class dim last). With x the logits
(soft-capped first when asked: x <- softcap * tanh(x / softcap)), lse = logsumexp(x) and
logp = x - lse, each counted row's loss is, as torch.nn.functional.cross_entropy defines it:

    class index y:    (1 - eps) * w[y] * (lse - x[y]) + (eps / C) * sum_c w[c] * (lse - x[c])
    probabilities t:  -sum_c w[c] * t'[c] * logp[c],  t' = (1 - eps) * t + eps / C

plus z_loss * lse^2 (PaLM's auxiliary loss). Rows whose target is ignore_index count for
nothing; a target outside [0, C) gives NaN. w is 1 without class weights.

Infinite and NaN logits (a vocabulary masked with -inf is ordinary use) give what torch gives,
because the loss is formed as torch forms it: from log_softmax(x), with the smoothing sum
only when label_smoothing > 0 and the target term gathered (never a zero mass times an
infinite log-probability of another class). So a -inf logit costs nothing unless it is the
target (loss inf), or label smoothing or probability targets spread mass over it (inf; NaN
where that mass is 0 through a zero class weight or a zero target probability, 0 * -inf,
exactly as in torch). A counted row holding +inf or NaN, or only -inf, has a NaN loss; an
ignored row has loss 0 whatever its logits. The gradient, p * coef - q with p = 0 at -inf,
is finite wherever torch's is. The two extras, defined so:
- softcap caps every logit, infinite ones included: +-inf become +-softcap (tanh's limits),
  so a class masked with -inf before the cap gets a finite share again (mask after the cap
  to keep it masked); the cap's derivative there is 0, so its gradient is 0. NaN stays NaN.
- z_loss adds z_loss * lse^2 with lse the logsumexp over the finite logits (-inf ones add
  nothing); its gradient 2 * z_loss * lse * p is 0 at -inf.

The gradient of a row's loss with respect to its (soft-capped) logits is p * coef - q, with
p = softmax(x), coef = sum_c q[c] + 2 * z_loss * lse and q the "target mass":
q = (1 - eps) * w[y] * onehot(y) + (eps / C) * w, or q = w * t'. The forward returns coef
per row so the backward reads nothing but the logits (and soft targets).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _softcap(x: Tensor, softcap: float) -> Tensor:
    return softcap * torch.tanh(x / softcap) if softcap > 0 else x


def _target_mass(x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                 label_smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    """(q, counted, invalid): the target mass q per class, and per row whether it counts and
    whether its class index is out of range."""
    rows, classes = x.shape
    w = weight.to(x.dtype) if weight is not None else torch.ones(classes, dtype=x.dtype, device=x.device)
    if target.is_floating_point():
        q = w * (target.to(x.dtype) * (1 - label_smoothing) + label_smoothing / classes)
        ones = torch.ones(rows, dtype=torch.bool, device=x.device)
        return q, ones, ~ones
    target = target.long()
    counted = target != ignore_index
    invalid = counted & ((target < 0) | (target >= classes))
    safe = torch.where(counted & ~invalid, target, 0)
    onehot = torch.nn.functional.one_hot(safe, classes).to(x.dtype)
    q = (1 - label_smoothing) * w[safe, None] * onehot + (label_smoothing / classes) * w
    q = q * (counted & ~invalid)[:, None]
    return q, counted, invalid


def cross_entropy_rows(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                       label_smoothing: float, z_loss: float, softcap: float,
                       upcast: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, coef), all float32 (float64 for float64 logits)."""
    dtype = torch.float64 if logits.dtype == torch.float64 or not upcast else torch.float32
    x = _softcap(logits.to(dtype), softcap)
    lse = torch.logsumexp(x, dim=-1)
    logp = torch.log_softmax(x, dim=-1)  # as torch: NaN across a row with +inf or NaN, or only -inf
    q, counted, invalid = _target_mass(x, target, weight, ignore_index, label_smoothing)
    if target.is_floating_point():
        loss = -(q * logp).sum(-1)
    else:
        # The target's term alone, gathered: the other classes' zero mass never meets their
        # log-probability (-inf for a -inf logit), as in torch's nll_loss.
        safe = torch.where(counted & ~invalid, target.long(), 0)
        w_t = weight.to(dtype)[safe] if weight is not None else 1.0
        loss = -(1 - label_smoothing) * w_t * logp.gather(-1, safe[:, None])[:, 0]
        if label_smoothing > 0:
            w = weight.to(dtype) if weight is not None else 1.0
            loss = loss - (label_smoothing / x.shape[-1]) * (w * logp).sum(-1)
    if z_loss > 0:
        loss = loss + z_loss * lse.square()
    loss = torch.where(counted, loss, 0.0)
    loss = torch.where(invalid, float("nan"), loss)
    coef = q.sum(-1) + (2 * z_loss * lse if z_loss > 0 else 0.0)
    coef = torch.where(counted, coef, 0.0)
    return loss, lse, coef


def cross_entropy_rows_bwd(dloss: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None,
                           lse: Tensor, coef: Tensor, ignore_index: int, label_smoothing: float,
                           softcap: float) -> Tensor:
    """Gradient of the per-row losses with respect to the logits, given their gradient."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = _softcap(logits.to(dtype), softcap)
    q, counted, invalid = _target_mass(x, target, weight, ignore_index, label_smoothing)
    p = torch.exp(x - lse[:, None].to(dtype))
    g = torch.where(invalid, float("nan"), dloss.to(dtype))
    grad = (p * coef[:, None].to(dtype) - q) * g[:, None]
    if softcap > 0:
        grad = grad * (1 - (x / softcap).square())
    return grad.to(logits.dtype)
