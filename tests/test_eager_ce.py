"""The losses' CPU path (issue 17): without z_loss and softcap, fastlm.cross_entropy on the
"torch" backend is torch's own F.cross_entropy, with fastlm's documented differences kept
("mean" over no counted target is 0 with zero gradients; an out-of-range class index raises
fastlm's ValueError), and the reference that serves the extras holds no (R, C) one-hot.

Each native result is checked against torch on the same inputs (bitwise: it is torch's call)
and against the path every such call took before (the reference, reached here by turning
the native path off), with the same inf/NaN pattern.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops import cross_entropy as ce_ops
from fastlm.ops import linear_cross_entropy as lce_ops
from fastlm.reference import cross_entropy as ref

CPU = torch.device("cpu")


def _inputs(shape, dtype, soft=False, ignore_index=-100, special=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    class_dim = 0 if len(shape) == 1 else 1
    c = shape[class_dim]
    if special:  # +-inf and NaN logits in some rows (torch's pattern is the contract)
        flat = x.movedim(class_dim, -1).reshape(-1, c) if len(shape) > 1 else x.reshape(1, c)
        flat = flat.clone()
        flat[0, : c // 2] = float("-inf")
        if flat.shape[0] > 2:
            flat[1, 1] = float("inf")
            flat[2, 2] = float("nan")
        if len(shape) > 1:
            x = flat.reshape(x.movedim(class_dim, -1).shape).movedim(-1, class_dim).contiguous()
        else:
            x = flat.reshape(shape)
    if soft:
        t = torch.softmax(torch.randn(shape, generator=g) * 2, dim=class_dim)
        return x, t.to(dtype if dtype != torch.float64 else torch.float64)
    tshape = shape[:class_dim] + shape[class_dim + 1:]
    t = torch.randint(0, c, tshape, generator=g)
    if t.dim():
        t[torch.rand(tshape, generator=g) < 0.2] = ignore_index
    return x, t


def _old_path(monkeypatch):
    """Turn the native path off: every call runs the reference, as every CPU call did before."""
    monkeypatch.setattr(ce_ops, "_native", lambda *a, **k: None)


def _run(x, t, weight, **options):
    xl = x.detach().clone().requires_grad_(True)
    with fastlm.use_backend("torch"):
        loss = fastlm.cross_entropy(xl, t, weight, **options)
    dloss = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, [xl], dloss)
    return loss.detach(), grad


def _torch(x, t, weight, **options):
    xl = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(xl, t.long() if not t.is_floating_point() else t, weight, **options)
    dloss = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, [xl], dloss)
    return loss.detach(), grad


def _same_nonfinite(a, b, name):
    a, b = a.double(), b.double()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(a), kind(b)), f"{name}: {kind.__name__} pattern differs"


def _close_to_old(new, old, name, dtype):
    _same_nonfinite(new, old, name)
    ok = torch.isfinite(old)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 3e-2)
    torch.testing.assert_close(new[ok].double(), old[ok].double(), rtol=tol, atol=tol, msg=name)


GRID = [
    dict(shape=(13, 37), options={}),
    dict(shape=(13, 37), options={"label_smoothing": 0.1}),
    dict(shape=(13, 37), options={"label_smoothing": 1.0, "reduction": "sum"}),
    dict(shape=(13, 37), options={"weight": True, "label_smoothing": 0.2, "ignore_index": 3}),
    dict(shape=(13, 37), options={"weight": True, "reduction": "none"}),
    dict(shape=(13, 37), options={"soft": True}),
    dict(shape=(13, 37), options={"soft": True, "weight": True, "label_smoothing": 0.1, "reduction": "sum"}),
    dict(shape=(4, 11, 3, 5), options={"label_smoothing": 0.1}),
    dict(shape=(4, 11, 3, 5), options={"weight": True, "reduction": "none"}),
    dict(shape=(4, 11, 6), options={"soft": True, "reduction": "none"}),
    dict(shape=(29,), options={"reduction": "none"}),
    dict(shape=(29,), options={"label_smoothing": 0.3}),
]


def _case(case, dtype, special, seed=0):
    options = dict(case["options"])
    soft = options.pop("soft", False)
    weighted = options.pop("weight", False)
    x, t = _inputs(case["shape"], dtype, soft, options.get("ignore_index", -100), special, seed)
    c = case["shape"][0 if len(case["shape"]) == 1 else 1]
    w = (torch.rand(c, generator=torch.Generator().manual_seed(seed + 1)) + 0.1).to(dtype) if weighted else None
    return x, t, w, options


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("special", [False, True], ids=["finite", "inf-nan"])
@pytest.mark.parametrize("case", GRID, ids=lambda c: f"{len(c['shape'])}d-" + ("-".join(c["options"]) or "plain"))
def test_native_is_torch_and_the_old_path(monkeypatch, case, dtype, special):
    x, t, w, options = _case(case, dtype, special)
    loss, grad = _run(x, t, w, **options)
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == x.shape
    # torch's own call: the same numbers, inf/NaN included
    t_loss, t_grad = _torch(x, t, w, **options)
    assert torch.equal(loss.isnan(), t_loss.isnan()) and torch.equal(grad.isnan(), t_grad.isnan())
    torch.testing.assert_close(loss, t_loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad, t_grad, rtol=0, atol=0, equal_nan=True)
    # the path every such call took before: the reference
    _old_path(monkeypatch)
    o_loss, o_grad = _run(x, t, w, **options)
    assert o_loss.shape == loss.shape and o_loss.dtype == loss.dtype
    _close_to_old(loss, o_loss, "loss", dtype)
    ok = torch.isfinite(t_grad)  # the gradient: finite wherever torch's is, and close there
    assert torch.isfinite(o_grad[ok]).all()
    _close_to_old(grad[ok], o_grad[ok], "grad", dtype)


def test_native_path_skips_the_ops_and_extras_do_not(monkeypatch):
    calls = []
    real = ce_ops._cross_entropy_eager
    monkeypatch.setattr(ce_ops, "_cross_entropy_eager", lambda *a: calls.append(1) or real(*a))
    x, t = _inputs((6, 9), torch.float32)
    with fastlm.use_backend("torch"):
        fastlm.cross_entropy(x, t, label_smoothing=0.1)
        assert calls == []
        fastlm.cross_entropy(x, t, z_loss=1e-3)
        fastlm.cross_entropy(x, t, softcap=3.0)
        assert len(calls) == 2
        with fastlm.use_backend("triton"):  # not the torch backend: the kernels
            fastlm.cross_entropy(x, t)
        assert len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(6, 10), (3, 10, 4)])
@pytest.mark.parametrize("options", [{}, {"weight": True}, {"label_smoothing": 0.1, "weight": True},
                                     {"label_smoothing": 1.0}], ids=lambda o: "-".join(o) or "plain")
def test_every_target_ignored_mean_is_zero(monkeypatch, dtype, shape, options):
    options = dict(options)
    w = torch.rand(shape[1]).to(dtype) + 0.1 if options.pop("weight", False) else None
    x = torch.randn(shape).to(dtype)
    t = torch.full(shape[:1] + shape[2:], -100)
    loss, grad = _run(x, t, w, **options)
    assert loss.dtype == dtype and torch.equal(loss, torch.zeros((), dtype=dtype))
    assert torch.equal(grad, torch.zeros_like(grad))
    assert torch.isnan(F.cross_entropy(x, t, w, **options))  # torch's answer
    _old_path(monkeypatch)
    o_loss, o_grad = _run(x, t, w, **options)
    assert torch.equal(o_loss, loss) and torch.equal(o_grad, grad)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_zero_class_weights_on_every_target_mean_is_the_sum(monkeypatch, label_smoothing):
    """A divisor of 0 through zero class weights (torch: NaN): fastlm divides by 1, as before."""
    x = torch.randn(5, 8)
    t = torch.tensor([1, 3, -100, 1, 3])
    w = torch.rand(8) + 0.1
    w[[1, 3]] = 0.0
    loss, grad = _run(x, t, w, label_smoothing=label_smoothing)
    expected = F.cross_entropy(x, t, w, reduction="sum", label_smoothing=label_smoothing)
    torch.testing.assert_close(loss, expected)
    _old_path(monkeypatch)
    o_loss, o_grad = _run(x, t, w, label_smoothing=label_smoothing)
    torch.testing.assert_close(loss, o_loss)
    torch.testing.assert_close(grad, o_grad)


def test_nan_logits_keep_torchs_nan_in_the_mean():
    """A NaN mean whose divisor is not 0 is torch's answer (a NaN logit), kept as it is."""
    x, t = _inputs((5, 8), torch.float32)
    t[:] = 2
    x[1, 4] = float("nan")
    loss, grad = _run(x, t, None)
    assert torch.isnan(loss)
    t_loss, t_grad = _torch(x, t, None)
    torch.testing.assert_close(grad, t_grad, equal_nan=True)


def test_no_rows():
    for soft in (False, True):
        x = torch.randn(0, 7)
        t = torch.zeros(0, 7) if soft else torch.zeros(0, dtype=torch.long)
        loss, grad = _run(x, t, None)
        assert loss.item() == 0.0 and grad.shape == (0, 7)


@pytest.mark.parametrize("bad", [7, 100, -1, -7])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"weight": True}, {"reduction": "none"},
                                     {"spatial": True}, {"int32": True}], ids=lambda o: "-".join(o) or "plain")
def test_out_of_range_index_raises_fastlms_error(monkeypatch, bad, options):
    options = dict(options)
    spatial, int32 = options.pop("spatial", False), options.pop("int32", False)
    x, t = _inputs((4, 7, 3) if spatial else (4, 7), torch.float32)
    t = t.clone()
    t.view(-1)[1] = bad
    if int32:
        t = t.int()
    w = torch.rand(7) + 0.1 if options.pop("weight", False) else None
    with fastlm.use_backend("torch"), pytest.raises(ValueError, match=rf"fastlm.cross_entropy: .*class index {bad}\b"):
        fastlm.cross_entropy(x, t, w, **options)


def test_targets_are_scanned_only_when_torch_objects(monkeypatch):
    def fail(*a):
        raise AssertionError("scanned")
    monkeypatch.setattr(ce_ops, "check_targets_in_range", fail)
    x, t = _inputs((6, 9), torch.float32)
    with fastlm.use_backend("torch"):
        fastlm.cross_entropy(x, t)
        fastlm.cross_entropy(x, t, label_smoothing=0.1, reduction="none")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("soft", [False, True])
def test_native_device_form(reduction, soft):
    """The "torch" backend off the host (CUDA): no host sync, sum / divisor for "mean", and an
    out-of-range index gives NaN for its row (loss and gradient), never reaching torch. Run
    here on CPU tensors through the same function."""
    x, t = _inputs((7, 9, 2), torch.float32, soft=soft)
    w = torch.rand(9) + 0.1
    if not soft:
        t = t.clone()
        t[2, 1] = 9
        t[4, 0] = -3
    xl = x.clone().requires_grad_(True)
    loss = ce_ops._native(xl, t, w, -100, reduction, 0.1, 9, False)
    (grad,) = torch.autograd.grad(loss.sum(), [xl])
    if soft:
        expected = F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(loss, expected)
        return
    bad = torch.zeros(7, 2, dtype=torch.bool)
    bad[2, 1] = bad[4, 0] = True
    if reduction == "none":
        assert torch.isnan(loss[bad]).all()
        good = F.cross_entropy(x, torch.where(bad, -100, t), w, reduction="none", label_smoothing=0.1)
        torch.testing.assert_close(loss[~bad], good[~bad])
    else:
        assert torch.isnan(loss)
    assert torch.isnan(grad.movedim(1, -1)[bad]).all()
    if reduction == "none":
        assert torch.isfinite(grad.movedim(1, -1)[~bad]).all()
    # every target ignored: 0, zero gradient, no NaN
    t_ign = torch.full((7, 2), -100)
    xl = x.clone().requires_grad_(True)
    loss = ce_ops._native(xl, t_ign, w, -100, "mean", 0.1, 9, False)
    assert loss.item() == 0.0
    assert torch.equal(torch.autograd.grad(loss, [xl])[0], torch.zeros_like(x))


def test_dtypes_the_reference_serves(monkeypatch):
    """16-bit logits with float32 class weights or probability targets: torch would need them
    rounded to 16 bits; the reference (float32) serves these, as before."""
    x, t = _inputs((6, 9), torch.bfloat16)
    w = torch.rand(9) + 0.1
    with fastlm.use_backend("torch"):
        assert ce_ops._native(x, t, w, -100, "mean", 0.0, 9, True) is None
        loss = fastlm.cross_entropy(x, t, w)
        probs = torch.softmax(torch.randn(6, 9), -1)
        assert ce_ops._native(x, probs, None, -100, "mean", 0.0, 9, True) is None
        soft = fastlm.cross_entropy(x, probs)
    assert loss.dtype == soft.dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), F.cross_entropy(x.float(), t, w), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(soft.float(), F.cross_entropy(x.float(), probs), rtol=1e-2, atol=1e-2)
    # float32 logits take float64 weights and targets as the reference did: cast to float32
    x32 = x.float()
    with fastlm.use_backend("torch"):
        got = fastlm.cross_entropy(x32, t, w.double(), label_smoothing=0.1)
    torch.testing.assert_close(got, F.cross_entropy(x32, t, w, label_smoothing=0.1), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_keeps_the_input_dtype(dtype):
    x, t = _inputs((6, 9), dtype)
    with fastlm.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastlm.cross_entropy(x, t)
    assert loss.dtype == dtype


def test_module_passes_every_option():
    x, t = _inputs((6, 9), torch.float32, ignore_index=2)
    w = torch.rand(9) + 0.1
    module = fastlm.nn.CrossEntropyLoss(w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    with fastlm.use_backend("torch"):
        got = module(x, t)
        with_z = fastlm.nn.CrossEntropyLoss(w, ignore_index=2, z_loss=1e-2)(x, t)
    torch.testing.assert_close(got, F.cross_entropy(x, t, w, ignore_index=2, reduction="sum", label_smoothing=0.1))
    torch.testing.assert_close(with_z, fastlm.cross_entropy(x, t, w, ignore_index=2, z_loss=1e-2))


# ----------------------------------------------------------------------------- linear_cross_entropy

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_small_is_linear_then_torch(reduction, bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(32, 16, generator=g, requires_grad=True)
    b = torch.randn(32, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, 32, (2, 5), generator=g)
    t[0, 1] = -100
    leaves = [v for v in (x, w, b) if v is not None]
    with fastlm.use_backend("torch"):
        loss = fastlm.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1)
    expected = F.cross_entropy(F.linear(x, w, b).reshape(-1, 32), t.reshape(-1), reduction=reduction,
                               label_smoothing=0.1)
    expected = expected.reshape(t.shape) if reduction == "none" else expected
    assert loss.shape == expected.shape and loss.dtype == expected.dtype
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    dloss = torch.rand(loss.shape)
    for a, e in zip(torch.autograd.grad(loss, leaves, dloss), torch.autograd.grad(expected, leaves, dloss)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_linear_large_or_chunked_keeps_the_chunks(monkeypatch):
    """The native path is for logits that fit in one chunk; a given chunk_size below N, or
    logits past _SMALL_LOGITS, still go chunk by chunk (the op's point: memory)."""
    shapes = []
    real = lce_ops._logits
    monkeypatch.setattr(lce_ops, "_logits", lambda *a: shapes.append(tuple(real(*a).shape)) or real(*a))
    x, w = torch.randn(40, 8), torch.randn(30, 8)
    t = torch.randint(0, 30, (40,))
    with fastlm.use_backend("torch"):
        fastlm.linear_cross_entropy(x, w, t, chunk_size=16)
        assert shapes == [(16, 30), (16, 30), (8, 30)]
        shapes.clear()
        monkeypatch.setattr(lce_ops, "_SMALL_LOGITS", 40 * 30 - 1)
        monkeypatch.setattr(lce_ops, "_CPU_MIN_CHUNK", 1)
        fastlm.linear_cross_entropy(x, w, t)
        assert shapes and all(s[0] < 40 for s in shapes)
        shapes.clear()
        fastlm.linear_cross_entropy(x, w, t, chunk_size=40)  # one chunk holds them all: native
        fastlm.linear_cross_entropy(x, w, t, z_loss=1e-3, chunk_size=40)  # an extra: the op
        assert shapes == [(40, 30)]


def test_linear_all_ignored_and_out_of_range():
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    t = torch.full((6,), -100)
    with fastlm.use_backend("torch"):
        loss = fastlm.linear_cross_entropy(x, w, t)
        gx, gw = torch.autograd.grad(loss, [x, w])
        assert loss.item() == 0.0 and not gx.any() and not gw.any()
        t[3] = 10
        with pytest.raises(ValueError, match=r"fastlm.linear_cross_entropy: .*class index 10\b"):
            fastlm.linear_cross_entropy(x, w, t)


# ----------------------------------------------------------------------------- the reference's memory

def _peak_bytes(fn):
    from fastlm.bench.runner import MiB, cpu_peak_memory_mib

    return cpu_peak_memory_mib(fn) * MiB


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "weight": True}, {"z_loss": 1e-3},
                                     {"soft": True, "label_smoothing": 0.1}],
                         ids=lambda o: "-".join(o) or "plain")
def test_reference_holds_one_rows_by_classes_tensor(monkeypatch, options):
    """No (R, C) one-hot or target mass: forward and backward each peak at about one (R, C)
    float32 tensor above the inputs (the old forward and backward held four).
    Probability targets with label smoothing take slices of 8 rows here (of 2^21 elements
    in use)."""
    monkeypatch.setattr(ref, "_SLICE_ELEMENTS", 8 * 4096)
    options = dict(options)
    r, c = 64, 4096
    x = torch.randn(r, c)
    soft = options.pop("soft", False)
    t = torch.softmax(torch.randn(r, c), -1) if soft else torch.randint(0, c, (r,))
    w = torch.rand(c) + 0.1 if options.pop("weight", False) else None
    eps, z = options.get("label_smoothing", 0.0), options.get("z_loss", 0.0)
    one = r * c * 4
    fwd = _peak_bytes(lambda: ref.cross_entropy_rows(x, t, w, -100, eps, z, 0.0))
    assert fwd <= 1.3 * one, fwd / one
    _, lse, coef = ref.cross_entropy_rows(x, t, w, -100, eps, z, 0.0)
    bwd = _peak_bytes(lambda: ref.cross_entropy_rows_bwd(torch.ones(r), x, t, w, lse, coef, -100, eps, 0.0))
    assert bwd <= 1.3 * one, bwd / one


def test_linear_cpu_chunks_have_a_floor(monkeypatch):
    """On CPU tensors the default chunk is at least _CPU_MIN_CHUNK rows (tiny chunks spend the
    time re-reading the weight gradient), still far below the whole (N, V) logits; a given
    chunk_size is kept as given."""
    shapes = []
    real = lce_ops._logits
    monkeypatch.setattr(lce_ops, "_logits", lambda *a: shapes.append(tuple(real(*a).shape)) or real(*a))
    n, h, v = 600, 8, 500  # default: ceil(500 / 8) = 63 chunks of 16 rows
    x, w = torch.randn(n, h, requires_grad=True), torch.randn(v, h, requires_grad=True)
    t = torch.randint(0, v, (n,))
    assert lce_ops.default_chunk_size(n, h, v) == 16
    with fastlm.use_backend("torch"):
        loss = fastlm.linear_cross_entropy(x, w, t, z_loss=1e-4)  # an extra: the chunked op
        assert shapes == [(256, v), (256, v), (88, v)]
        shapes.clear()
        fastlm.linear_cross_entropy(x, w, t, z_loss=1e-4, chunk_size=100)
        assert shapes == [(100, v)] * 6
    want = F.cross_entropy(F.linear(x.double(), w.double()), t) + 1e-4 * torch.logsumexp(
        F.linear(x.double(), w.double()), -1).pow(2).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
