"""The one tolerance rule for every kernel test and for ``fastlm check``.

A kernel's output is compared with a float64 reference computed from the same inputs.
It passes when its worst error is at most ``mult`` times the worst error of PyTorch's own
eager path in the same dtype, plus a floor: twice the rounding of the reference to that
dtype (the rule FlashAttention's tests use). NaN or inf never passes where the reference
is finite. A result that is zero in exact arithmetic (terms that cancel) is judged by its
terms instead (``cancellation_floor``): no multiple of a lucky eager error bounds it. A
failure says where: the index of the worst element, both values, and whether a NaN
appeared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Comparison:
    ok: bool
    max_err: float
    eager_err: float
    tol: float
    message: str


def rounding_floor(ref64: Tensor, dtype: torch.dtype) -> float:
    """Twice the worst rounding of the reference to ``dtype``: one unit in the last place
    at the reference's largest magnitude (never below 0.3). FlashAttention's tests measure
    the same bound as 2 * (ref + 0.3 - 0.3 - ref).abs().max(); the closed form does not
    depend on how lucky the rounding of a small tensor happens to be."""
    if ref64.numel() == 0 or not dtype.is_floating_point:
        return 0.0
    finite = ref64[torch.isfinite(ref64)]
    peak = finite.abs().max().item() if finite.numel() else 0.0
    return torch.finfo(dtype).eps * max(peak, 0.3)


def summation_floor(ref64: Tensor, dtype: torch.dtype, terms: int) -> float:
    """Rounding that a sum of ``terms`` values may gather when it is added up in another
    order than torch's (a matmul split into chunks, a reduction over a vocabulary in
    blocks): eps * sqrt(terms) * the reference's largest magnitude, the usual statistical
    bound of a float sum. Added to the floor for such results, and only for them."""
    if ref64.numel() == 0 or not dtype.is_floating_point:
        return 0.0
    finite = ref64[torch.isfinite(ref64)]
    peak = finite.abs().max().item() if finite.numel() else 0.0
    return torch.finfo(dtype).eps * math.sqrt(max(terms, 1)) * peak


def cancellation_floor(terms64: Tensor, eager_terms: Tensor | None, dtype: torch.dtype, dim=0,
                       mult: float = 2.0) -> float:
    """Floor for a result that is a sum whose terms cancel: zero (or far below its terms) in
    exact arithmetic. The gradient of attention's key bias is one (softmax ignores a constant
    added to a query's scores, so the per-token terms of the bias gradient add up to 0); so is
    a softmax gradient summed along its row. Such a result's own magnitude, and the eager
    path's error on it (a sum of errors of random sign, small by luck as often as not), say
    nothing about what its error may be: the errors of the terms, which do not cancel. The
    floor applies the rule to the terms (reduced over ``dim``): ``mult`` times the eager
    path's summed errors on them, plus the rounding of the sum itself, eps * sum |terms|;
    the worst element of the result. ``terms64``: the terms in float64; ``eager_terms``:
    the same terms as torch's eager path in the tested dtype computed them (or None)."""
    if terms64.numel() == 0 or not dtype.is_floating_point:
        return 0.0
    t = terms64.detach().double()
    floor = torch.finfo(dtype).eps * t.abs().sum(dim)
    if eager_terms is not None:
        floor = floor + mult * (eager_terms.detach().double() - t).abs().sum(dim)
    floor = floor[torch.isfinite(floor)]
    return floor.max().item() if floor.numel() else 0.0


def compare(out: Tensor, ref64: Tensor, eager: Tensor | None, name: str = "output",
            mult: float = 2.0, atol: float = 0.0) -> Comparison:
    """Judge ``out`` against ``ref64`` (float64) with ``eager`` (torch's own result in
    out's dtype) as the yardstick."""
    if out.shape != ref64.shape:
        return Comparison(False, float("inf"), 0.0, 0.0,
                          f"{name}: shape {list(out.shape)} != reference {list(ref64.shape)}")
    if out.numel() == 0:
        return Comparison(True, 0.0, 0.0, 0.0, f"{name}: empty")
    o = out.detach().double().cpu()
    r = ref64.detach().double().cpu()
    diff = (o - r).abs()
    bad = ~torch.isfinite(o) & torch.isfinite(r)
    eager_err = 0.0
    if eager is not None:
        # Where torch's own path overflows (float16 sums, say) it is no yardstick: use the
        # elements it got finite, and the floor alone if none.
        e = eager.detach().double().cpu()
        usable = torch.isfinite(e) & torch.isfinite(r)
        eager_err = (e - r).abs()[usable].max().item() if usable.any() else 0.0
    tol = mult * eager_err + rounding_floor(r, out.dtype) + atol
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        return Comparison(False, float("nan"), eager_err, tol,
                          f"{name}: non-finite value {o[idx].item()} at index {idx} where the reference is "
                          f"{r[idx].item()} ({int(bad.sum())} such elements)")
    diff = torch.where(torch.isfinite(r), diff, torch.zeros_like(diff))
    flat = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), o.shape))
    max_err = diff.reshape(-1)[flat].item()
    ok = max_err <= tol
    msg = (f"{name}: max error {max_err:.3e} at index {idx} (got {o[idx].item():.6g}, reference "
           f"{r[idx].item():.6g}); tolerance {tol:.3e} = {mult} x eager error {eager_err:.3e} + floor")
    return Comparison(ok, max_err, eager_err, tol, msg)


def assert_close(out: Tensor, ref64: Tensor, eager: Tensor | None, name: str = "output",
                 mult: float = 2.0, atol: float = 0.0) -> Comparison:
    c = compare(out, ref64, eager, name, mult, atol)
    assert c.ok, c.message
    return c
