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

Memory: no (R, C) one-hot or target-mass tensor is formed. The forward gathers the target's
term and sums the smoothing term per row, with the products formed in place in its own
log_softmax; the backward forms p * coef * dloss in one (R, C) tensor and takes q * dloss off
where it lives: at the target (a scatter) and, for label smoothing, as a broadcast (C,) row.
So a call holds the logits plus about one (R, C) tensor in the compute dtype (two with
softcap), against torch's own cross_entropy's three (its log-probabilities, their gradient,
the logits' gradient); probability targets in another dtype, or with label smoothing, add
slices of a few MiB. The fused linear cross-entropy's chunks on CPU go further:
cross_entropy_rows_fwd_bwd forms the loss and the gradient over the chunk's logits in place,
so each chunk holds its logits and nothing else of that size.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _capped(logits: Tensor, dtype: torch.dtype, softcap: float) -> Tensor:
    """The logits in ``dtype``, soft-capped when asked: a fresh tensor when capped, else a
    view of the logits where their dtype is already ``dtype`` (so never written to)."""
    if softcap > 0:
        return logits.to(dtype, copy=True).div_(softcap).tanh_().mul_(softcap)
    return logits.to(dtype)


def _class_weight(weight: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return weight.to(dtype) if weight is not None else None


# Rows per slice where a (rows, C) temporary cannot be avoided (probability targets in
# another dtype, or label smoothing over them): about 2^21 elements, so the temporaries stay
# small next to the (R, C) tensors.
_SLICE_ELEMENTS = 1 << 21


def _row_slices(rows: int, classes: int):
    step = max(1, _SLICE_ELEMENTS // max(classes, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _soft_mass(target: Tensor, rows: slice, dtype: torch.dtype, label_smoothing: float, classes: int) -> Tensor:
    """t' = (1 - eps) * t + eps / C for a slice of rows, in ``dtype`` (a fresh tensor)."""
    t = target[rows].to(dtype, copy=True)
    if label_smoothing > 0:
        t.mul_(1 - label_smoothing).add_(label_smoothing / classes)
    return t


def _index_rows(target: Tensor, ignore_index: int, classes: int):
    """(counted, invalid, valid, safe) for class-index targets: safe is an index always in
    range (the target where it is valid, 0 where ignored, clamped where out of range; the
    rows not valid never use what it points at). Five small ops: this runs on every call."""
    target = target.long()
    counted = target != ignore_index
    safe = torch.where(counted, target, 0)
    clamped = safe.clamp(0, max(classes - 1, 0))
    invalid = clamped != safe  # (an ignored row's 0 is in range)
    return counted, invalid, counted ^ invalid, clamped


def cross_entropy_rows(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                       label_smoothing: float, z_loss: float, softcap: float,
                       upcast: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, coef), all float32 (float64 for float64 logits)."""
    dtype = torch.float64 if logits.dtype == torch.float64 or not upcast else torch.float32
    rows, classes = logits.shape
    x = _capped(logits, dtype, softcap)
    w = _class_weight(weight, dtype)
    lse = torch.logsumexp(x, dim=-1)
    # As torch: NaN across a row with +inf or NaN, or only -inf. logp is this function's own
    # (R, C) tensor, so the products below are formed in it, in place.
    logp = torch.log_softmax(x, dim=-1)
    del x
    eps = label_smoothing
    if target.is_floating_point():
        # -sum_c w[c] t'[c] logp[c], each product formed as torch forms it (0 * -inf: NaN).
        if w is not None:
            logp.mul_(w)
        for r in _row_slices(rows, classes):
            logp[r].mul_(_soft_mass(target, r, dtype, eps, classes) if target.dtype != dtype or eps > 0
                         else target[r])
        loss = logp.sum(-1).neg_()
        del logp
        # coef = sum_c w[c] t'[c] = (1 - eps) * (t . w) + (eps / C) * sum(w)
        if w is None:
            mass = target.sum(-1, dtype=dtype)
            coef = mass * (1 - eps) + eps
        else:
            mass = torch.cat([target[r].to(dtype) @ w for r in _row_slices(rows, classes)]) if rows \
                else lse.new_zeros(0)
            coef = mass * (1 - eps) + (eps / classes) * w.sum()
        counted = invalid = None
    else:
        counted, invalid, valid, safe = _index_rows(target, ignore_index, classes)
        # The target's term alone, gathered: the other classes' zero mass never meets their
        # log-probability (-inf for a -inf logit), as in torch's nll_loss.
        w_t = w[safe] if w is not None else None
        picked = logp.gather(-1, safe[:, None])[:, 0]
        loss = picked.mul_(-(1 - eps))
        if w_t is not None:
            loss.mul_(w_t)
        if eps > 0:
            if w is not None:
                logp.mul_(w)
            loss.sub_(logp.sum(-1).mul_(eps / classes))
        del logp
        coef = _index_coef(w, w_t, valid, eps, classes, dtype)
    loss, coef = _finish_rows(loss, coef, lse, z_loss, counted, invalid)
    return loss, lse, coef


def _index_coef(w, w_t, valid, eps: float, classes: int, dtype) -> Tensor:
    """coef = sum_c q[c] = (1 - eps) * w[y] + (eps / C) * sum(w) for class-index rows, 0 off
    the valid ones."""
    if w is None:
        return valid.to(dtype)
    return (w_t * (1 - eps) + (eps / classes) * w.sum()) * valid


def _finish_rows(loss: Tensor, coef: Tensor, lse: Tensor, z_loss: float, counted, invalid):
    """The z-loss term on loss and coef, then class-index rows' masking (``counted`` None for
    probability targets): an ignored row's loss and coef 0, an out-of-range index's loss NaN."""
    if z_loss > 0:
        loss = loss + z_loss * lse.square()
        coef = torch.add(coef, lse, alpha=2 * z_loss)
        if counted is not None:
            coef = torch.where(counted, coef, 0.0)
    if counted is not None:  # (without z_loss coef is 0 off the valid rows already)
        loss = torch.where(counted, loss, 0.0).masked_fill_(invalid, float("nan"))
    return loss, coef


def cross_entropy_rows_bwd(dloss: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None,
                           lse: Tensor, coef: Tensor, ignore_index: int, label_smoothing: float,
                           softcap: float, out: Tensor | None = None) -> Tensor:
    """Gradient of the per-row losses with respect to the logits, given their gradient:
    (p * coef - q) * dloss, formed in one (R, C) tensor: p * (coef * dloss), then q * dloss
    taken off where it lives (the target's class; the smoothing share as a broadcast row).
    ``out`` (the logits themselves, say): form it there when it has the compute dtype."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows, classes = logits.shape
    eps = label_smoothing
    w = _class_weight(weight, dtype)
    g = dloss.to(dtype)
    if target.is_floating_point():
        invalid = None
    else:
        _, invalid, valid, safe = _index_rows(target, ignore_index, classes)
        g = g.masked_fill(invalid, float("nan"))
    if out is not None and (out.dtype != dtype or out.shape != logits.shape):
        out = None
    if softcap > 0:
        th = logits.to(dtype, copy=True).div_(softcap).tanh_()
        grad = torch.mul(th, softcap, out=out) if out is not None else torch.mul(th, softcap)
    else:
        th = None
        if out is None:
            grad = logits.to(dtype, copy=True)
        else:
            grad = out if out is logits else out.copy_(logits)
    grad.sub_(lse.to(dtype)[:, None]).exp_()            # p
    grad.mul_((coef.to(dtype) * g)[:, None])            # p * coef * dloss
    if target.is_floating_point():
        for r in _row_slices(rows, classes):            # - w t' dloss
            q = _soft_mass(target, r, dtype, eps, classes)
            if w is not None:
                q.mul_(w)
            grad[r].sub_(q.mul_(g[r, None]))
            del q  # one slice at a time
    else:
        _take_index_mass(grad, g, w, valid, safe, eps)
    if th is not None:                                  # the cap's derivative 1 - tanh^2
        grad.mul_(th.square_().neg_().add_(1))
    return grad.to(logits.dtype)


def _take_index_mass(grad: Tensor, g: Tensor, w: Tensor | None, valid: Tensor, safe: Tensor, eps: float) -> None:
    """grad (holding p * coef * dloss) -= q * dloss for class-index targets, where q lives:
    the smoothing share (eps / C) w on every class as a broadcast row, (1 - eps) w[y] at the
    target by a scatter. No (R, C) temporary."""
    classes = grad.shape[1]
    gv = torch.where(valid, g, 0.0)  # (an invalid row is NaN already, through p * coef * g)
    if eps > 0:                                         # - (eps / C) w dloss on every class
        if w is not None:
            grad.addr_(gv, w, alpha=-eps / classes)
        else:
            grad.sub_(gv.mul(eps / classes)[:, None])
    at_target = gv * -(1 - eps)                         # - (1 - eps) w[y] dloss at the target
    if w is not None:
        at_target.mul_(w[safe])
    grad.scatter_add_(1, safe[:, None], at_target[:, None])


def fwd_bwd_in_place(logits: Tensor, target: Tensor, softcap: float) -> bool:
    """Whether cross_entropy_rows_fwd_bwd can run over these logits: float32/float64 (their
    own compute dtype), rows of unit stride, class-index targets, no softcap, not empty."""
    return (logits.dtype in (torch.float32, torch.float64) and not target.is_floating_point() and softcap == 0
            and logits.dim() == 2 and logits.shape[0] > 0 and logits.shape[1] > 0 and logits.is_contiguous())


def cross_entropy_rows_fwd_bwd(dloss: Tensor | None, logits: Tensor, target: Tensor, weight: Tensor | None,
                               ignore_index: int, label_smoothing: float,
                               z_loss: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, coef, grad) of class-index rows whose upstream gradient ``dloss`` is known at
    the forward (the fused linear cross-entropy's chunks), formed in the logits' own memory:
    they become their log-probabilities (an in-place log_softmax), the loss is read off those,
    then they become the gradient (p = exp(logp), then as cross_entropy_rows_bwd). So the call
    holds one (R, C) tensor, the logits, where rows_fwd then rows_bwd hold two. The logits are
    overwritten: only for logits the caller drops (see fwd_bwd_in_place for what it takes).
    ``dloss`` None: the loss alone (grad None), the logits left as log-probabilities.

    The same numbers as cross_entropy_rows then cross_entropy_rows_bwd, to rounding: lse is read
    at each row's largest logit (its log-probability there is -log(sum exp(x - max)), so
    max - logp[argmax] is logsumexp's own max + log(sum)), +-inf where logsumexp gives +-inf
    (a row with +inf, or only -inf: its loss and gradient are NaN either way)."""
    dtype = logits.dtype
    rows, classes = logits.shape
    eps = label_smoothing
    w = _class_weight(weight, dtype)
    counted, invalid, valid, safe = _index_rows(target, ignore_index, classes)
    top = logits.argmax(-1, keepdim=True)                   # (a NaN row: its NaN)
    top_logit = logits.gather(-1, top)[:, 0]
    logp = torch.log_softmax(logits, -1, out=logits)        # in place: NaN across a row as torch
    lse = top_logit - logp.gather(-1, top)[:, 0]
    lse = torch.where(torch.isinf(top_logit), top_logit, lse)
    # The loss as cross_entropy_rows forms it: the target's term gathered, the smoothing sum
    # per row (by row slices where the class weights multiply in, logp being kept).
    w_t = w[safe] if w is not None else None
    loss = logp.gather(-1, safe[:, None])[:, 0].mul_(-(1 - eps))
    if w_t is not None:
        loss.mul_(w_t)
    if eps > 0:
        if w is None:
            smooth = logp.sum(-1)
        else:
            smooth = torch.cat([(logp[r] * w).sum(-1) for r in _row_slices(rows, classes)])
        loss.sub_(smooth.mul_(eps / classes))
    loss, coef = _finish_rows(loss, _index_coef(w, w_t, valid, eps, classes, dtype), lse, z_loss, counted, invalid)
    if dloss is None:  # the loss alone (the logits are left holding their log-probabilities)
        return loss, lse, coef, None
    # The gradient, in the same memory: p * coef * dloss - q * dloss.
    g = dloss.to(dtype).masked_fill(invalid, float("nan"))
    grad = logp.exp_()                                      # p
    grad.mul_((coef * g)[:, None])                          # p * coef * dloss
    _take_index_mass(grad, g, w, valid, safe, eps)
    return loss, lse, coef, grad
