"""fastlm.cross_entropy against torch.nn.functional.cross_entropy in float64.

The oracle is torch's own function (float64), with fastlm's two extensions added on top:
softcap applied to the logits first, z_loss * logsumexp^2 added for each counted row (and
divided by torch's "mean" divisor). The yardstick for the tolerance rule is the same
oracle in the input's dtype (fastlm/testing.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.kernels import cross_entropy as ce_kernels
from fastlm.ops import cross_entropy as ce_ops
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE, ON_GPU

BACKENDS = ["torch", "triton"]


def oracle(x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
           softcap=None):
    """torch's cross-entropy in x's dtype, plus the z_loss and softcap extensions."""
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    w = weight.to(x.dtype) if weight is not None else None
    soft = t.is_floating_point()
    tt = t.to(x.dtype) if soft else t.long()
    kwargs = dict(weight=w, label_smoothing=label_smoothing)
    if not soft:
        kwargs["ignore_index"] = ignore_index
    loss = F.cross_entropy(x, tt, reduction=reduction, **kwargs)
    if z_loss == 0.0:
        return loss
    class_dim = 0 if x.dim() == 1 else 1
    z = z_loss * torch.logsumexp(x, dim=class_dim).square()
    if soft:
        counted_w = torch.ones_like(z)
        z_rows = z
    else:
        counted = tt != ignore_index
        z_rows = torch.where(counted, z, 0.0)  # (an ignored row of only -inf logits has z = inf)
        safe = torch.where(counted, tt, 0)
        counted_w = (w[safe] if w is not None else torch.ones_like(z)) * counted
    if reduction == "none":
        return loss + z_rows
    if reduction == "sum":
        return loss + z_rows.sum()
    return loss + z_rows.sum() / counted_w.sum()


def check(backend, x, t, weight=None, dloss=None, grad_atol=0.0, **options):
    """fastlm's loss and input gradient against the float64 oracle, eager as the yardstick."""
    xl = x.detach().requires_grad_(True)
    with fastlm.use_backend(backend):
        loss = fastlm.cross_entropy(xl, t, weight, **options)
    assert loss.dtype == x.dtype
    if dloss is None:
        dloss = torch.randn(loss.shape, device=x.device, dtype=torch.float32).to(x.dtype)
    (grad,) = torch.autograd.grad(loss, [xl], dloss)
    assert grad.dtype == x.dtype and grad.shape == x.shape

    def run(cast):
        xx = cast(x).detach().requires_grad_(True)
        tt = cast(t) if t.is_floating_point() else t
        ww = cast(weight) if weight is not None else None
        out = oracle(xx, tt, ww, **options)
        return out, torch.autograd.grad(out, [xx], cast(dloss))[0]

    ref, ref_grad = run(lambda v: v.double())
    eager, eager_grad = run(lambda v: v)
    assert_same_nonfinite(loss, ref, "loss")
    classes = x.shape[0 if x.dim() == 1 else 1]
    # The kernel sums a row in blocks of classes, then torch sums the rows: another order
    # than torch's, so a sum's rounding over those terms is allowed on top of the rule.
    terms = classes + max(t.numel() // (classes if t.is_floating_point() else 1), 1)
    assert_close(loss, ref, eager, "loss", atol=summation_floor(ref, loss.dtype, terms))
    assert_close(grad, ref_grad, eager_grad, "grad of input",
                 atol=summation_floor(ref_grad, grad.dtype, classes) + grad_atol)
    return loss, grad


def assert_same_nonfinite(out, ref, name):
    """Where torch gives inf or NaN (label smoothing over -inf logits, say), fastlm gives the
    same: NaN exactly where torch has NaN, +inf and -inf exactly where it has them."""
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    for what, kind in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = kind(o) != kind(r)
        if differ.any():
            idx = tuple(int(i) for i in differ.nonzero()[0]) if o.dim() else ()
            raise AssertionError(f"{name}: {what} pattern differs from torch's at {int(differ.sum())} element(s), "
                                 f"first at index {idx}: fastlm {o[idx].item()}, torch {r[idx].item()}")


def logits(n, c, dtype=torch.float32, scale=2.0):
    return (torch.randn(n, c, device=DEVICE) * scale).to(dtype)


def targets(n, c, ignore=0.15, ignore_index=-100, dtype=torch.int64):
    t = torch.randint(0, c, (n,), device=DEVICE)
    t[torch.rand(n, device=DEVICE) < ignore] = ignore_index
    return t.to(dtype)


def class_weight(c):
    return torch.rand(c, device=DEVICE) + 0.1


def soft_targets(shape, class_dim=1):
    return torch.softmax(torch.randn(shape, device=DEVICE) * 2, dim=class_dim)


# Every option alone, then combined. "weight" is a flag: the class weights are drawn per test.
OPTIONS = [
    {},
    {"weight": True},
    {"ignore_index": 3},
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"weight": True, "label_smoothing": 0.2, "ignore_index": 0},
    {"weight": True, "label_smoothing": 0.1, "ignore_index": 1, "z_loss": 1e-3, "softcap": 5.0},
]


def _ids(options):
    return "-".join(f"{k}={v}" if k != "weight" or v is not True else k for k, v in options.items()) or "plain"


def _split(options, c):
    options = dict(options)
    weight = class_weight(c) if options.pop("weight", False) else None
    return weight, options


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_class_index_targets(backend, reduction, options):
    n, c = 29, 37
    weight, options = _split(options, c)
    t = targets(n, c, ignore_index=options.get("ignore_index", -100))
    check(backend, logits(n, c), t, weight, reduction=reduction, **options)


SOFT_OPTIONS = [o for o in OPTIONS if "ignore_index" not in o] + [
    {"weight": True, "label_smoothing": 0.3, "z_loss": 1e-3, "softcap": 2.0}]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", SOFT_OPTIONS, ids=_ids)
def test_probability_targets(backend, reduction, options):
    n, c = 23, 41
    weight, options = _split(options, c)
    check(backend, logits(n, c), soft_targets((n, c)), weight, reduction=reduction, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalised_probability_targets(backend):
    """torch does not ask that soft targets sum to one (distillation with masses, say)."""
    n, c = 11, 19
    check(backend, logits(n, c), torch.rand(n, c, device=DEVICE) * 3, label_smoothing=0.1, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [1, 2, 3, 17, 50257])
def test_vocabulary_sizes(backend, c):
    n = 5 if c > 1000 else 13
    t = targets(n, c, ignore=0.2)
    check(backend, logits(n, c), t, reduction="none")
    check(backend, logits(n, c), t, class_weight(c), label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    check(backend, logits(n, c), soft_targets((n, c)), label_smoothing=0.05)


@pytest.mark.parametrize("c", [15, 16, 17, 33])
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_vocabulary_block_edges(monkeypatch, c, soft):
    """The kernels walk the vocabulary in blocks of at most MAX_BLOCK_C: with it set to 16,
    C = 15, 16, 17 and 33 take one partial, one full, one full + 1 and two full + 1 blocks."""
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_C", 16)
    assert ce_kernels._block(c) == 16
    n = 9
    t = soft_targets((n, c)) if soft else targets(n, c)
    check("triton", logits(n, c), t, reduction="none")
    check("triton", logits(n, c), t, class_weight(c), label_smoothing=0.1, z_loss=1e-2, softcap=3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets_equal_int64(backend):
    n, c = 17, 23
    x, t, w = logits(n, c), targets(n, c), class_weight(c)
    check(backend, x, t.int(), w, label_smoothing=0.1, reduction="none")

    def run(tt):
        xl = x.clone().requires_grad_(True)
        with fastlm.use_backend(backend):
            loss = fastlm.cross_entropy(xl, tt, w, label_smoothing=0.1)
        return loss, torch.autograd.grad(loss, [xl])[0]

    (l32, g32), (l64, g64) = run(t.int()), run(t)
    assert torch.equal(l32, l64) and torch.equal(g32, g64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_single_row_input(backend, reduction):
    """input (C,): a 0-d class index or a (C,) probability target, as torch accepts."""
    c = 31
    loss, _ = check(backend, logits(1, c)[0], torch.tensor(7, device=DEVICE), reduction=reduction)
    assert loss.shape == ()
    check(backend, logits(1, c)[0], soft_targets((c,), class_dim=0), reduction=reduction, z_loss=1e-2)
    check(backend, logits(1, c)[0], torch.tensor(4, device=DEVICE), class_weight(c), label_smoothing=0.2,
          reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(3, 13, 5), (2, 11, 3, 4)], ids=["3d", "4d"])
def test_spatial_inputs(backend, reduction, shape):
    """(N, C, d1, ...) inputs, the class dim second, as for segmentation or (B, V, T) logits."""
    c = shape[1]
    x = torch.randn(shape, device=DEVICE) * 2
    t = torch.randint(0, c, shape[:1] + shape[2:], device=DEVICE)
    t[torch.rand(t.shape, device=DEVICE) < 0.2] = -100
    loss, _ = check(backend, x, t, class_weight(c), reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    assert loss.shape == (t.shape if reduction == "none" else ())
    check(backend, x, soft_targets(shape), reduction=reduction, softcap=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    n, c = 21, 34
    transposed = torch.randn(c, n, device=DEVICE).t()  # (N, C) with the class stride N
    sliced = torch.randn(n, 2 * c, device=DEVICE)[:, ::2]  # class stride 2
    t = targets(2 * n, c)[::2]  # strided targets
    weight = class_weight(2 * c)[::2]
    for x in (transposed, sliced):
        assert not x.is_contiguous()
        check(backend, x, t, weight, label_smoothing=0.1, reduction="none")
        soft = soft_targets((c, n), class_dim=0).t()
        check(backend, x, soft, z_loss=1e-3)
    spatial = torch.randn(3, 5, 13, device=DEVICE).transpose(1, 2)  # (N, C, d) non-contiguous
    check(backend, spatial, torch.randint(0, 13, (3, 5), device=DEVICE), reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("bfloat16 casts truncate under the Triton interpreter: checked on a GPU")
    n, c = 19, 300
    t = targets(n, c)
    check(backend, logits(n, c, dtype), t, reduction="none")
    check(backend, logits(n, c, dtype), t, class_weight(c).to(dtype), label_smoothing=0.1, z_loss=1e-3,
          softcap=5.0)
    check(backend, logits(n, c, dtype), soft_targets((n, c)).to(dtype), reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_are_stable(backend):
    """Logits in the hundreds: the online softmax subtracts the running max, nothing overflows.

    The backward forms softmax as exp(x - lse) from the float32 lse the forward saved, so the
    gradient carries lse's rounding, eps(float32) * |lse| relative: allowed here on top of
    the rule (3e-5 at |x| ~ 1000; below 16-bit resolution for logits under ~100)."""
    n, c = 7, 200
    x = logits(n, c, scale=300.0)
    lse_rounding = torch.finfo(torch.float32).eps * x.abs().max().item()
    check(backend, x, targets(n, c), z_loss=1e-4, grad_atol=lse_rounding)
    check(backend, x.half(), targets(n, c))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_target_ignored(backend, reduction):
    """The one deliberate difference from torch: "mean" over no counted target is 0, not NaN,
    and the gradient is zero."""
    n, c = 6, 10
    x = logits(n, c).requires_grad_(True)
    t = torch.full((n,), -100, device=DEVICE)
    with fastlm.use_backend(backend):
        loss = fastlm.cross_entropy(x, t, class_weight(c), reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    (grad,) = torch.autograd.grad(loss.sum(), [x])
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))
    if reduction == "mean":
        assert torch.isnan(F.cross_entropy(x.detach(), t))  # what torch gives instead


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_target_ignored(backend):
    n, c = 15, 12
    t = targets(n, c, ignore=0.0)
    assert (t != -100).all()
    check(backend, logits(n, c), t, class_weight(c), label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
    x = torch.randn(0, 9, device=DEVICE, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=DEVICE)
    with fastlm.use_backend(backend):
        assert fastlm.cross_entropy(x, t, reduction="none").shape == (0,)
        assert fastlm.cross_entropy(x, t, reduction="sum").item() == 0.0
        loss = fastlm.cross_entropy(x, t)
    assert loss.item() == 0.0
    assert torch.autograd.grad(loss, [x])[0].shape == (0, 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    n, c = 33, 77
    x, t, w = logits(n, c), targets(n, c), class_weight(c)

    def once():
        xl = x.clone().requires_grad_(True)
        with fastlm.use_backend(backend):
            loss = fastlm.cross_entropy(xl, t, w, label_smoothing=0.1, z_loss=1e-3)
        return loss, torch.autograd.grad(loss, [xl])[0]

    (l1, g1), (l2, g2) = once(), once()
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_and_no_grad(backend):
    n, c = 8, 20
    x, t = logits(n, c).requires_grad_(True), targets(n, c)
    with fastlm.use_backend(backend):
        loss = fastlm.cross_entropy(x, t, reduction="none")
        (g1,) = torch.autograd.grad(loss.sum(), [x], retain_graph=True)
        (g2,) = torch.autograd.grad(loss.sum(), [x])
        with torch.no_grad():
            again = fastlm.cross_entropy(x, t, reduction="none")
    assert torch.equal(g1, g2)
    assert torch.equal(again, loss.detach())


@pytest.mark.skipif(ON_GPU, reason="on CUDA an out-of-range index gives NaN instead (no host sync)")
@pytest.mark.parametrize("bad", [10, 11, -1, -7])
def test_out_of_range_target_raises_on_cpu(bad):
    x, t = logits(4, 10), targets(4, 10, ignore=0.0)
    t[1] = bad
    for backend in BACKENDS:
        with fastlm.use_backend(backend), pytest.raises(ValueError, match=f"class index {bad}"):
            fastlm.cross_entropy(x, t)
    t[1] = -100
    with fastlm.use_backend("torch"):
        fastlm.cross_entropy(x, t)  # ignore_index itself is fine


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_row_is_nan_in_the_ops(backend):
    """What the CUDA path does, checked on the ops themselves here: the kernel never reads
    with the bad index as an address; that row's loss and gradient are NaN, others exact."""
    n, c = 6, 10
    x, t = logits(n, c), targets(n, c, ignore=0.0)
    t[2], t[4] = c, -3
    chosen = ce_ops.pick_backend("cross_entropy", x, None, backend)
    loss, lse, coef = ce_ops.rows_fwd(chosen, x, t, None, -100, 0.0, 0.0, 0.0)
    grad = ce_ops.rows_bwd(chosen, torch.ones(n, device=DEVICE), x, t, None, lse, coef, -100, 0.0, 0.0)
    bad = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    bad[[2, 4]] = True
    assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all()
    good = ~bad
    ref = F.cross_entropy(x[good].double(), t[good], reduction="none")
    torch.testing.assert_close(loss[good].double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grad[good]).all()


def _bad_cases():
    x, t = logits(4, 10), targets(4, 10)
    w = class_weight(10)
    probs = soft_targets((4, 10))
    return [
        ("integer input", lambda: fastlm.cross_entropy(t, t), TypeError, "input"),
        ("0-d input", lambda: fastlm.cross_entropy(x[0, 0], t[0]), ValueError, "input"),
        ("input not a tensor", lambda: fastlm.cross_entropy([1.0, 2.0], t), TypeError, "input"),
        ("target dtype", lambda: fastlm.cross_entropy(x, t.to(torch.int16)), TypeError, "target"),
        ("target shape", lambda: fastlm.cross_entropy(x, t[:3]), ValueError, "target"),
        ("probability target shape", lambda: fastlm.cross_entropy(x, probs[:, :9]), ValueError, "target"),
        ("target device", lambda: fastlm.cross_entropy(x, t.to("meta")), ValueError, "target"),
        ("weight shape", lambda: fastlm.cross_entropy(x, t, w[:9]), ValueError, "weight"),
        ("weight dtype", lambda: fastlm.cross_entropy(x, t, w.long()), TypeError, "weight"),
        ("weight device", lambda: fastlm.cross_entropy(x, t, w.to("meta")), ValueError, "weight"),
        ("reduction", lambda: fastlm.cross_entropy(x, t, reduction="batchmean"), ValueError, "reduction"),
        ("label_smoothing", lambda: fastlm.cross_entropy(x, t, label_smoothing=1.5), ValueError,
         "label_smoothing"),
        ("z_loss", lambda: fastlm.cross_entropy(x, t, z_loss=-0.1), ValueError, "z_loss"),
        ("z_loss nan", lambda: fastlm.cross_entropy(x, t, z_loss=float("nan")), ValueError, "z_loss"),
        ("softcap", lambda: fastlm.cross_entropy(x, t, softcap=0.0), ValueError, "softcap"),
        ("softcap negative", lambda: fastlm.cross_entropy(x, t, softcap=-1.0), ValueError, "softcap"),
        ("ignore_index", lambda: fastlm.cross_entropy(x, t, ignore_index=1.5), TypeError, "ignore_index"),
        ("ignore_index with probabilities", lambda: fastlm.cross_entropy(x, probs, ignore_index=0), ValueError,
         "ignore_index"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, call, exc, word = case
    with pytest.raises(exc, match=word):
        call()


def test_explicit_backend_that_cannot_run_raises():
    x, t = logits(3, 5).double(), targets(3, 5)
    with fastlm.use_backend("triton"), pytest.raises(fastlm.BackendUnavailableError, match="float64"):
        fastlm.cross_entropy(x, t)
    with fastlm.use_backend("torch"):  # the reference takes float64
        torch.testing.assert_close(fastlm.cross_entropy(x, t), F.cross_entropy(x, t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_opcheck(backend, soft):
    n, c = 10, 24
    x = logits(n, c).requires_grad_(True)
    t = soft_targets((n, c)) if soft else targets(n, c)
    with fastlm.use_backend(backend):
        torch.library.opcheck(ce_ops._cross_entropy, (x, t, class_weight(c), -100, 0.1, 1e-3, 3.0))
        torch.library.opcheck(ce_ops._cross_entropy, (x, t, None, -100, 0.0, 0.0, 0.0))
        _, lse, coef = ce_ops._cross_entropy(x.detach(), t, None, -100, 0.1, 0.0, 0.0)
        dloss = torch.randn(n, device=DEVICE)
        torch.library.opcheck(ce_ops._cross_entropy_bwd, (dloss, x.detach(), t, None, lse, coef, -100, 0.1, 0.0,
                                                          backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(backend, reduction):
    import torch._dynamo

    torch._dynamo.reset()

    def loss_fn(x, t, w):
        return fastlm.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, z_loss=1e-3).sum()

    n, c = 12, 20
    x, t, w = logits(n, c).requires_grad_(True), targets(n, c), class_weight(c)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    with fastlm.use_backend(backend):
        expected = loss_fn(x, t, w)
        (g_expected,) = torch.autograd.grad(expected, [x])
        got = compiled(x, t, w)
        (g_got,) = torch.autograd.grad(got, [x])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g_got, g_expected)


# ----------------------------------------------------------------------------- infinite and NaN logits
#
# Vocabulary masking with -inf (constrained decoding, subset heads) is ordinary use. Each
# row below is -inf in another pattern, with the kernels walking the vocabulary in blocks of
# 16 (MAX_BLOCK_C patched), so that whole blocks are -inf: the first one, a middle one, the
# last (partial) one, every third class, everything but the target. The float64 oracle is
# torch's own cross_entropy: where torch's loss is inf or NaN (a -inf target logit, label
# smoothing or probability targets over -inf logits, a zero class weight times -inf) fastlm
# gives the same inf/NaN pattern, and its gradient is finite wherever torch's is.

NEG_BLOCK = 16
NEG_CLASSES = 3 * NEG_BLOCK + 5  # three full blocks and a partial one


def _free_class(lo, hi, avoid, ok=lambda c: True):
    """A random class in [lo, hi) that is not ``avoid`` (ignore_index) and passes ``ok``."""
    while True:
        c = int(torch.randint(lo, hi, ()))
        if c != avoid and ok(c):
            return c


def neg_inf_rows(ignore_index=-100, soft=False):
    """(logits (R, C), class-index targets (R,), probability targets (R, C)) with -inf in
    every pattern; only the plain row, row 6, is free of them."""
    c, b = NEG_CLASSES, NEG_BLOCK
    x = logits(10, c)
    t = torch.empty(10, dtype=torch.int64, device=DEVICE)
    neg = torch.zeros(10, c, dtype=torch.bool, device=DEVICE)
    neg[0, :b] = True                                          # the first block
    t[0] = _free_class(b, c, ignore_index)
    neg[1, b:2 * b] = True                                     # a middle block
    t[1] = _free_class(0, c, ignore_index, lambda k: not b <= k < 2 * b)
    neg[2, ::3] = True                                         # every third class
    t[2] = _free_class(0, c, ignore_index, lambda k: k % 3 != 0)
    t[3] = _free_class(0, c, ignore_index)                     # all but the target
    neg[3] = True
    neg[3, t[3]] = False
    neg[4, :b] = True                                          # the target itself is -inf
    t[4] = _free_class(0, b, ignore_index)
    neg[5, 3 * b:] = True                                      # the last, partial block
    t[5] = _free_class(0, 3 * b, ignore_index)
    t[6] = _free_class(0, c, ignore_index)                     # no -inf at all
    neg[7, b:3 * b] = True                                     # two middle blocks, row ignored
    t[7] = ignore_index
    neg[8, 1::2] = True                                        # every other class, row ignored
    t[8] = ignore_index
    neg[9, 2 * b:] = True                                      # all blocks after the second
    t[9] = _free_class(0, 2 * b, ignore_index)
    x = x.masked_fill(neg, float("-inf"))
    probs = soft_targets((10, c))
    # Probability targets: zero mass on some -inf classes (0 * -inf: NaN in torch), mass on others.
    probs = probs.masked_fill(neg & (torch.rand(10, c, device=DEVICE) < 0.5), 0.0)
    return x, t, probs


def zero_weights(c):
    """Class weights with zeros, on -inf classes and on targets alike."""
    w = class_weight(c)
    w[::4] = 0.0
    return w


NEG_OPTIONS = OPTIONS + [{"weight": "zeros"}, {"weight": "zeros", "label_smoothing": 0.1, "z_loss": 1e-2}]


def _neg_split(options, c):
    options = dict(options)
    kind = options.pop("weight", False)
    weight = zero_weights(c) if kind == "zeros" else class_weight(c) if kind else None
    return weight, options


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("options", NEG_OPTIONS, ids=_ids)
def test_neg_inf_logits_class_index(monkeypatch, backend, reduction, options):
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_C", NEG_BLOCK)
    weight, options = _neg_split(options, NEG_CLASSES)
    x, t, _ = neg_inf_rows(options.get("ignore_index", -100))
    check(backend, x, t, weight, reduction=reduction, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("options", [o for o in NEG_OPTIONS if "ignore_index" not in o], ids=_ids)
def test_neg_inf_logits_probability_targets(monkeypatch, backend, reduction, options):
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_C", NEG_BLOCK)
    weight, options = _neg_split(options, NEG_CLASSES)
    x, _, probs = neg_inf_rows()
    check(backend, x, probs, weight, reduction=reduction, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-2}, {"weight": "zeros"},
                                     {"softcap": 3.0}, {"soft": True}], ids=_ids)
def test_pos_inf_and_nan_logits(monkeypatch, backend, reduction, options):
    """+inf or NaN anywhere in a counted row makes torch's loss NaN (and only -inf too); an
    ignored row counts 0 whatever its logits. Softcap maps +-inf to +-softcap (finite)."""
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_C", NEG_BLOCK)
    options = dict(options)
    soft = options.pop("soft", False)
    weight, options = _neg_split(options, NEG_CLASSES)
    x = logits(7, NEG_CLASSES)
    x[0, 3] = float("inf")
    x[1, NEG_BLOCK + 2] = float("nan")
    x[2] = float("-inf")
    x[3, 2 * NEG_BLOCK:] = float("inf")
    x[4, 5] = float("inf")  # ignored
    x[5, 7] = float("nan")  # ignored
    t = targets(7, NEG_CLASSES, ignore=0.0)
    t[4] = t[5] = -100
    if soft:
        t = soft_targets((7, NEG_CLASSES))
    check(backend, x, t, weight, reduction=reduction, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_example_neg_inf_logits(backend):
    """The issue's example: -inf in the second half of every row gave NaN (torch: finite)."""
    x = torch.randn(3, 10, device=DEVICE)
    x[:, 5:] = float("-inf")
    t = torch.tensor([0, 1, 2], device=DEVICE)
    loss, _ = check(backend, x, t)
    assert torch.isfinite(loss)


def test_whole_first_chunk_neg_inf_at_the_real_block_size():
    """The issue's reproduction at the kernel's own block (8192): 8208 classes, the first
    8192 -inf, target 8200 (the Triton backend gave NaN; torch is finite)."""
    c = ce_kernels.MAX_BLOCK_C + 16
    x = logits(2, c)
    x[:, :ce_kernels.MAX_BLOCK_C] = float("-inf")
    t = torch.tensor([ce_kernels.MAX_BLOCK_C + 8, c - 1], device=DEVICE)
    loss, grad = check("triton", x, t, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_reference_rows_neg_inf_directly():
    """The reference's own functions (the oracle of every kernel test) against torch."""
    from fastlm.reference import cross_entropy as ref

    x, t, _ = neg_inf_rows()
    x = x.double()
    w = zero_weights(NEG_CLASSES).double()
    for eps in (0.0, 0.1):
        loss, lse, coef = ref.cross_entropy_rows(x, t, w, -100, eps, 0.0, 0.0)
        expected = F.cross_entropy(x, t, w, reduction="none", label_smoothing=eps)
        assert_same_nonfinite(loss, expected, f"loss (label_smoothing={eps})")
        finite = torch.isfinite(expected)
        torch.testing.assert_close(loss[finite], expected[finite])
        xx = x.clone().requires_grad_(True)
        dloss = torch.randn(x.shape[0], dtype=torch.float64, device=DEVICE)
        (expected_grad,) = torch.autograd.grad(F.cross_entropy(xx, t, w, reduction="none", label_smoothing=eps),
                                               [xx], dloss)
        grad = ref.cross_entropy_rows_bwd(dloss, x, t, w, lse, coef, -100, eps, 0.0)
        ok = torch.isfinite(expected_grad)
        assert torch.isfinite(grad[ok]).all()
        torch.testing.assert_close(grad[ok], expected_grad[ok])


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_and_z_loss_with_neg_inf_logits(backend):
    """fastlm's extras, as documented in fastlm/reference/cross_entropy.py: softcap maps -inf
    to -softcap (the cap is applied to every logit, as softcap * tanh(x / softcap) does), so
    a masked class gets a finite share again; z_loss uses the logsumexp of the finite logits."""
    x, t, _ = neg_inf_rows()
    with fastlm.use_backend(backend):
        capped = fastlm.cross_entropy(x, t, reduction="none", softcap=3.0)
        by_hand = fastlm.cross_entropy(3.0 * torch.tanh(x / 3.0), t, reduction="none")
        torch.testing.assert_close(capped, by_hand)
        assert torch.isfinite(capped).all()
        plain = fastlm.cross_entropy(x, t, reduction="none")
        with_z = fastlm.cross_entropy(x, t, reduction="none", z_loss=0.5)
    lse = torch.logsumexp(x.double(), -1)
    counted = t != -100
    assert torch.isfinite(lse[counted]).all()
    finite = counted & torch.isfinite(plain)  # (not the row whose target is -inf: inf either way)
    torch.testing.assert_close((with_z - plain)[finite].double(), 0.5 * lse[finite] ** 2, rtol=1e-5, atol=1e-5)
    assert torch.equal(with_z[~counted], torch.zeros_like(with_z[~counted]))


def test_float64_stays_float64():
    """The reference takes float64 (the auto backend's fallback for it): its per-row results
    are float64, so the custom op's fake must say so (opcheck), and "mean" must divide by
    the class weights summed in float64 (a float32 sum was 1.5e-8 off torch)."""
    x, t = logits(17, 23).double(), targets(17, 23)
    w = class_weight(23).double()
    with fastlm.use_backend("torch"):
        got = fastlm.cross_entropy(x, t, w, label_smoothing=0.1)
        torch.library.opcheck(ce_ops._cross_entropy, (x.requires_grad_(True), t, w, -100, 0.1, 1e-3, 0.0))
    torch.testing.assert_close(got, F.cross_entropy(x.detach(), t, w, label_smoothing=0.1), rtol=1e-13, atol=0)


_HUGE_CLASS_STRIDE = """
import sys, torch, fastlm, torch.nn.functional as F
device = sys.argv[1]
big = 2 ** 30  # class 2 sits 2^31 elements past class 0: an int32 c * stride_xc wraps negative
storage = torch.empty(2 * big + 8, dtype=torch.float16, device=device)  # 4 GiB, untouched but 12 elements
x = storage.as_strided((4, 3), (1, big))
x.copy_(torch.randn(4, 3))
t = torch.tensor([2, 0, 2, 1], device=device)
with fastlm.use_backend("triton"):
    xl = x.detach().requires_grad_(True)
    loss = fastlm.cross_entropy(xl, t, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), [xl])
xd = x.detach().double().requires_grad_(True)
ref = F.cross_entropy(xd, t, reduction="none")
(ref_grad,) = torch.autograd.grad(ref.sum(), [xd])
torch.testing.assert_close(loss.double(), ref, rtol=2e-3, atol=2e-3)
torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-3, atol=2e-3)
# Probability targets laid out the same way: their class offsets c * stride_tc too.
probs = torch.empty(2 * big + 8, dtype=torch.float16, device=device).as_strided((4, 3), (1, big))
probs.copy_(torch.softmax(torch.randn(4, 3), -1))
with fastlm.use_backend("triton"):
    loss = fastlm.cross_entropy(x, probs, reduction="none")
ref = F.cross_entropy(x.double(), probs.double(), reduction="none")
torch.testing.assert_close(loss.double(), ref, rtol=2e-3, atol=2e-3)
print("ok")
"""


def test_class_offsets_are_int64():
    """Logits whose class stride puts a class 2^31 elements past the row start (a view over a
    4 GiB storage of which 12 elements are touched), and probability targets alike: with
    int32 class offsets c * stride_xc wraps negative and the kernel reads far outside the
    tensor (a segfault under the interpreter, hence the subprocess); the launcher now sees
    that (C - 1) * stride leaves int32 and the kernel forms those offsets in int64."""
    done = subprocess.run([sys.executable, "-c", _HUGE_CLASS_STRIDE, str(DEVICE)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), \
        f"exit code {done.returncode}: {done.stderr[-2000:]}"


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("c", [32000, 128256, 256000])
def test_gpu_real_vocabularies(dtype, c):
    n = 64
    t = targets(n, c)
    check("triton", logits(n, c, dtype), t, label_smoothing=0.1, z_loss=1e-4)
    check("triton", logits(n, c, dtype), t, class_weight(c), reduction="none", softcap=30.0)


@pytest.mark.gpu
def test_gpu_out_of_range_target_is_nan():
    n, c = 8, 1000
    x, t = logits(n, c).requires_grad_(True), targets(n, c, ignore=0.0)
    t[3] = c + 5
    loss = fastlm.cross_entropy(x, t, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), [x])
    assert torch.isnan(loss[3]) and torch.isnan(grad[3]).all()
    others = torch.arange(n, device=DEVICE) != 3
    assert torch.isfinite(loss[others]).all() and torch.isfinite(grad[others]).all()


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_more_than_2_to_the_31_elements():
    """N * C past 2^31: offsets are int64 (an int32 offset would wrap and read far rows)."""
    c = 131072
    n = 2 ** 31 // c + 3
    x = torch.randn(n, c, device=DEVICE, dtype=torch.bfloat16)
    t = torch.randint(0, c, (n,), device=DEVICE)
    x.requires_grad_(True)
    loss = fastlm.cross_entropy(x, t, reduction="none")
    (grad,) = torch.autograd.grad(loss, [x], torch.ones_like(loss))
    last = slice(n - 4, n)  # rows that start past element 2^31
    ref = F.cross_entropy(x.detach()[last].double(), t[last], reduction="none")
    torch.testing.assert_close(loss[last].double(), ref, rtol=2e-2, atol=2e-2)
    ref_grad = torch.softmax(x.detach()[last].double(), -1)
    ref_grad[torch.arange(4, device=DEVICE), t[last]] -= 1
    torch.testing.assert_close(grad[last].double(), ref_grad, rtol=2e-2, atol=1e-3)


# ----------------------------------------------------------------------------- one launch for both passes

@pytest.mark.parametrize("c", [15, 16, 17, 40])
@pytest.mark.parametrize("options", [
    dict(),
    dict(label_smoothing=0.1, z_loss=1e-3),
    dict(softcap=5.0, weight=True),
    dict(soft=True, label_smoothing=0.2),
    dict(soft=True, weight=True, z_loss=1e-3),
], ids=["plain", "smooth-zloss", "softcap-weight", "soft-smooth", "soft-weight-zloss"])
def test_fwd_bwd_in_one_launch_equals_the_two(monkeypatch, c, options):
    """_cross_entropy_fwd_bwd_kernel (the fused linear cross-entropy's chunks) against
    cross_entropy_fwd then cross_entropy_bwd: the same loss, lse, coef and gradient, bit for bit
    on the same kernel code, written in place over the logits; blocks of 16 classes so that
    C = 15, 16, 17, 40 cross the block edges; ignored and out-of-range rows included."""
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_C", 16)
    rows = 7
    x = (torch.randn(rows, c, device=DEVICE) * 3).to(torch.float32)
    if options.get("soft"):
        t = torch.softmax(torch.randn(rows, c, device=DEVICE), -1)
    else:
        t = torch.randint(0, c, (rows,), device=DEVICE)
        t[2] = -100  # ignored
        t[4] = c + 3  # out of range: NaN loss and gradient in the kernels
    w = torch.rand(c, device=DEVICE) + 0.5 if options.get("weight") else None
    args = (options.get("label_smoothing", 0.0), options.get("z_loss", 0.0), options.get("softcap", 0.0))
    dloss = torch.rand(rows, device=DEVICE) + 0.1
    loss, lse, coef = ce_kernels.cross_entropy_fwd(x, t, w, -100, *args)
    grad = ce_kernels.cross_entropy_bwd(dloss, x, t, w, lse, coef, -100, args[0], args[2])
    inplace = x.clone()
    got = ce_kernels.cross_entropy_fwd_bwd(inplace, t, w, -100, *args, dloss, out=inplace)
    assert got[3] is inplace
    for name, a, b in zip(("loss", "lse", "coef", "grad"), got, (loss, lse, coef, grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
    assert torch.isfinite(grad[[0, 1, 3, 5, 6]]).all()
    # A fresh output (poisoned under FASTLM_POISON) and a stride-0 dloss, as the chunks pass it.
    scale = torch.tensor(0.25, device=DEVICE).expand(rows)
    fresh = ce_kernels.cross_entropy_fwd_bwd(x, t, w, -100, *args, scale)[3]
    torch.testing.assert_close(fresh, ce_kernels.cross_entropy_bwd(scale, x, t, w, lse, coef, -100, args[0], args[2]),
                               rtol=0, atol=0, equal_nan=True)


_FWD_BWD_BARRIER = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastlm.kernels import cross_entropy as ce
checked = 0
for kernel, sig, const, warps in ce.gpu_compile_variants():
    if kernel is not ce._cross_entropy_fwd_bwd_kernel or const["SOFT"] or sig["X"] != "*bf16":
        continue
    ptx = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": warps}).asm["ptx"].splitlines()
    stores = [i for i, line in enumerate(ptx) if "st.global" in line]
    first_grad = next(i for i in stores if re.search(r"st\\.global(\\.v\\d)?\\.b16", ptx[i]))
    last_loss = max(i for i in stores if i < first_grad)  # Loss, Lse, Coef: after the x_t read
    assert any("bar.sync" in line for line in ptx[last_loss:first_grad]), (const, ptx[last_loss:first_grad])
    checked += 1
assert checked == 9, checked  # 3 plain; 6 with STATS and LIMIT (barrier inside the live-row branch)
print("ok")
"""


def test_fwd_bwd_orders_the_target_logit_read_before_the_gradient_stores():
    """In place (the fused linear cross-entropy's chunks), _cross_entropy_fwd_bwd_kernel's loss
    pass reads the target logit x_t after its last cross-warp reduction, in thread 0, while the
    warp holding column t may already be writing its gradient there: a race the interpreter
    cannot show (it runs a program's passes one after another). Compiled for sm_90 (no GPU
    needed), a CTA barrier must lie between the loss stores (which follow that read) and the
    first gradient store. A subprocess: the interpreter does not compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _FWD_BWD_BARRIER], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), \
        f"exit code {done.returncode}: {done.stderr[-3000:]}"
