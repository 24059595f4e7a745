"""fastlm.kl_div, fastlm.jsd and fastlm.linear_jsd against float64 oracles.

- kl_div: the oracle is torch's own F.kl_div in float64 (the yardstick of the tolerance rule
  is F.kl_div in the tested dtype), special values included: NaN where torch has NaN.
- jsd: the oracle is the generalised JSD written out as Liger-Kernel's LigerJSD describes
  it (M = beta * P + (1 - beta) * Q with P the teacher's and Q the student's distribution,
  loss = sum(beta * P * log P + (1 - beta) * Q * log Q - M * log M), the forward KL at
  beta = 0 and the reverse KL at beta = 1, the sum over counted rows divided by their
  count), differentiated by torch's autograd; the two ends are checked against F.kl_div.
- linear_jsd: the oracle is that JSD of log_softmax(x @ W.T / T) for both models, unfused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.kernels import distill as kernels
from fastlm.reference import distill as ref
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE, ON_GPU

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def _quiet(fn, *args, **kwargs):
    """Calls F.kl_div / fastlm.kl_div without torch's 'mean' deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def logprobs(*shape, dtype=torch.float32, scale=2.0):
    return torch.log_softmax(torch.randn(*shape, device=DEVICE) * scale, dim=-1).to(dtype)


def labels(rows_shape, vocab, ignore=0.3, ignore_index=-100):
    t = torch.randint(0, vocab, rows_shape, device=DEVICE)
    t[torch.rand(rows_shape, device=DEVICE) < ignore] = ignore_index
    return t


def assert_same_nonfinite(out, expected, name):
    o, r = out.detach().double().cpu(), expected.detach().double().cpu()
    for what, kind in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = kind(o) != kind(r)
        if differ.any():
            idx = tuple(int(i) for i in differ.nonzero()[0]) if o.dim() else ()
            raise AssertionError(f"{name}: {what} pattern differs from the oracle's at {int(differ.sum())} "
                                 f"element(s), first at {idx}: fastlm {o[idx].item()}, oracle {r[idx].item()}")


# ============================================================================= kl_div

def _kl_check(backend, x, t, reduction="mean", log_target=False, target_grad=False, **legacy):
    """fastlm.kl_div's loss and gradients against F.kl_div in float64, F.kl_div in the
    tested dtype as the yardstick."""
    xl = x.detach().requires_grad_(True)
    tl_ = t.detach().requires_grad_(target_grad)
    with fastlm.use_backend(backend):
        loss = _quiet(fastlm.kl_div, xl, tl_, reduction=reduction, log_target=log_target, **legacy)
    dtype = torch.result_type(x, t)
    assert loss.dtype == dtype
    dloss = torch.randn(loss.shape, device=x.device).to(loss.dtype)
    wrt = [xl, tl_] if target_grad else [xl]
    grads = torch.autograd.grad(loss, wrt, dloss)

    def run(cast):
        xx = cast(x).detach().requires_grad_(True)
        tt = cast(t).detach().requires_grad_(target_grad)
        out = _quiet(F.kl_div, xx, tt, reduction=reduction, log_target=log_target, **legacy)
        return out, torch.autograd.grad(out, [xx, tt] if target_grad else [xx], cast(dloss))

    ref_loss, ref_grads = run(lambda v: v.double())
    eager_loss, eager_grads = run(lambda v: v)
    assert_same_nonfinite(loss, ref_loss, "loss")
    terms = max(x.numel(), t.numel())
    assert_close(loss, ref_loss, eager_loss, "loss", atol=summation_floor(ref_loss, loss.dtype, terms))
    for name, g, r, e in zip(("input", "target"), grads, ref_grads, eager_grads):
        assert g.shape == r.shape and g.dtype == (x.dtype if name == "input" else t.dtype)
        assert_same_nonfinite(g, r, f"grad of {name}")
        # A broadcast operand's gradient is a sum over the broadcast elements.
        assert_close(g, r, e, f"grad of {name}", atol=summation_floor(r, g.dtype, terms // max(g.numel(), 1)))
    return loss, grads


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_reference_is_torchs_formula_with_special_values(log_target):
    """The reference's pointwise loss and both gradients are torch's in float64, at 0, +-inf
    and NaN in both arguments (NaN exactly where torch has NaN)."""
    vals = torch.tensor([0.0, 0.3, 1.0, 2.5, -0.7, float("inf"), float("-inf"), float("nan")], dtype=torch.float64)
    x = vals[:, None].expand(8, 8).reshape(-1).clone().requires_grad_(True)
    t = vals[None, :].expand(8, 8).reshape(-1).clone()
    if not log_target:
        t = t.abs()  # probabilities (a negative one is NaN in both: xlogy's log)
    t.requires_grad_(True)
    out = F.kl_div(x, t, reduction="none", log_target=log_target)
    g = torch.rand_like(out) + 0.5
    dx, dt = torch.autograd.grad(out, [x, t], g)
    mine = ref.kl_div_pointwise(x.detach(), t.detach(), log_target)
    mdx, mdt = ref.kl_div_pointwise_bwd(g, x.detach(), t.detach(), log_target, True)
    for a, b, name in ((mine, out, "loss"), (mdx, dx, "dinput"), (mdt, dt, "dtarget")):
        torch.testing.assert_close(a, b.detach(), equal_nan=True, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_special_values_follow_torch(backend, log_target):
    """Zero probabilities, -inf log-probabilities and NaN: torch's loss and gradients (its NaN
    at 0 * -inf included), on every backend."""
    x = logprobs(4, 19)
    x[0, 3] = float("-inf")
    x[1, :5] = float("-inf")
    x[2, 7] = float("nan")
    t = torch.softmax(torch.randn(4, 19, device=DEVICE), -1)
    t[0, 3] = 0.0      # 0 * -inf: NaN, as torch
    t[1, 2:9] = 0.0    # some of the -inf inputs have zero target probability
    t[3, :4] = 0.0
    if log_target:
        t = t.log()    # log 0 = -inf
    _kl_check(backend, x, t, reduction="none", log_target=log_target, target_grad=True)
    _kl_check(backend, x, t, reduction="sum", log_target=log_target, target_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_div_matches_torch(backend, reduction, log_target, dtype):
    x = logprobs(3, 113, dtype=dtype)
    t = logprobs(3, 113, dtype=dtype)
    if not log_target:
        t = t.exp()
    _kl_check(backend, x, t, reduction, log_target, target_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xshape,tshape", [((17,), (17,)), ((), ()), ((1,), (1,)), ((2, 3, 29), (2, 3, 29)),
                                           ((4,), (3, 4)), ((3, 4), (4,)), ((3, 1), (3, 5)),
                                           ((2, 1, 5), (1, 3, 5)), ((2, 3, 1), (2, 3, 7)), ((0, 5), (0, 5))])
@pytest.mark.parametrize("reduction", ["none", "mean", "batchmean"])
def test_kl_div_shapes_and_broadcasting(backend, xshape, tshape, reduction):
    """Any shape, and broadcasting as torch allows (the gradient of a broadcast operand summed
    back to its shape); 'batchmean' divides by input.size(0) as torch does, even where the
    target broadcasts the input to more rows; no elements give torch's NaN."""
    x = torch.randn(xshape, device=DEVICE) - 2.0
    t = torch.rand(tshape, device=DEVICE)
    _kl_check(backend, x, t, reduction, target_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_div_mixed_dtypes_promote_as_torch(backend):
    x = logprobs(3, 17, dtype=torch.float16)
    t = logprobs(3, 17).exp()
    _kl_check(backend, x, t, "none", target_grad=True)
    _kl_check(backend, x, torch.tensor(0.3, device=DEVICE), "none", target_grad=True)  # a 0-d float32: float16
    _kl_check(backend, torch.tensor(-1.5, device=DEVICE), t.half(), "none", target_grad=True)


def test_kl_div_float64_on_the_reference():
    x, t = logprobs(3, 17).double(), logprobs(3, 17).exp().double()
    _kl_check("torch", x, t, "batchmean", target_grad=True)
    with fastlm.use_backend("torch"):  # the ops' own reference path (what torch.compile runs)
        from fastlm.ops import distill as ops
        rows = ops._kl_div_rows(x, t, x.shape, "sum", False)
    torch.testing.assert_close(rows, F.kl_div(x, t, reduction="sum"))


@pytest.mark.parametrize("vocab", [15, 16, 17, 33, 48])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_vocab_block_edges(monkeypatch, vocab, log_target):
    """Chunks of 16 classes (MAX_BLOCK_C patched): one below, at and above a block, and more."""
    monkeypatch.setattr(kernels, "MAX_BLOCK_C", 16)
    x, t = logprobs(3, vocab), logprobs(3, vocab)
    if not log_target:
        t = t.exp()
    for reduction in ("none", "sum"):
        _kl_check("triton", x, t, reduction, log_target, target_grad=True)


@pytest.mark.parametrize("vocab", [kernels.MAX_BLOCK_C - 1, kernels.MAX_BLOCK_C, kernels.MAX_BLOCK_C + 1])
def test_kl_div_default_block_edges(vocab):
    """The kernels' own widest chunk, one below, at and one above (two chunks, the second of one class)."""
    _kl_check("triton", logprobs(2, vocab), logprobs(2, vocab).exp(), "sum", target_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_div_non_contiguous(backend):
    x = logprobs(29, 6).t()             # class stride 29
    t = logprobs(6, 40).exp()[:, 3:32]  # a row stride of 40
    assert not x.is_contiguous() and not t.is_contiguous()
    _kl_check(backend, x, t, "none", target_grad=True)
    _kl_check(backend, x, t, "batchmean", target_grad=True)


def test_kl_div_poisoned_outputs_are_all_written():
    """conftest fills every kernel output with NaN first: the loss, its row sums and both
    gradients come back finite for finite inputs."""
    from fastlm.kernels.launch import poison_enabled
    assert poison_enabled()
    x, t = logprobs(5, 37), logprobs(5, 37).exp()
    loss, (dx, dt) = _kl_check("triton", x, t, "none", target_grad=True)
    assert torch.isfinite(loss).all() and torch.isfinite(dx).all() and torch.isfinite(dt).all()
    loss, (dx,) = _kl_check("triton", x, t, "sum")
    assert torch.isfinite(loss) and torch.isfinite(dx).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size_average,reduce", [(None, False), (False, None), (True, True), (False, True)])
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
def test_kl_div_legacy_arguments(backend, size_average, reduce, reduction):
    """size_average and reduce, positional in torch's order, override reduction by torch's
    legacy rule; 'batchmean' still divides by the batch then, as torch does."""
    x, t = logprobs(4, 9), logprobs(4, 9).exp()
    with fastlm.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fastlm.kl_div(x, t, size_average, reduce, reduction)
        expected = F.kl_div(x, t, size_average, reduce, reduction)
    torch.testing.assert_close(out, expected)


def test_kl_div_signature_is_torchs():
    import inspect
    mine = inspect.signature(fastlm.kl_div).parameters
    theirs = inspect.signature(F.kl_div).parameters
    assert [(p.name, p.default, p.kind) for p in mine.values()] == \
        [(p.name, p.default, p.kind) for p in theirs.values()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_div_warns_on_mean_as_torch(backend):
    x, t = logprobs(2, 5), logprobs(2, 5).exp()
    with fastlm.use_backend(backend):
        with pytest.warns(UserWarning, match="batchmean"):
            fastlm.kl_div(x, t)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fastlm.kl_div(x, t, reduction="batchmean")
        assert not [w for w in caught if "batchmean" in str(w.message)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_div_bad_arguments(backend):
    x, t = logprobs(3, 5), logprobs(3, 5).exp()
    with fastlm.use_backend(backend):
        with pytest.raises(fastlm.ArgumentError, match="reduction"):
            fastlm.kl_div(x, t, reduction="avg")
        with pytest.raises(ValueError, match="reduction"):  # torch raises ValueError here too
            fastlm.kl_div(x, t, reduction="avg")
        with pytest.raises(RuntimeError, match="target"):
            fastlm.kl_div(x, logprobs(3, 6), reduction="sum")
        with pytest.raises(fastlm.ArgumentTypeError, match="target"):
            fastlm.kl_div(x, torch.ones(3, 5, dtype=torch.int64, device=DEVICE), reduction="sum")
        with pytest.raises(fastlm.ArgumentTypeError, match="input"):
            fastlm.kl_div(x.tolist(), t, reduction="sum")
        with pytest.raises(fastlm.ArgumentTypeError, match="log_target"):
            fastlm.kl_div(x, t, reduction="sum", log_target="yes")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["shape", "int-target", "reduction", "list-input", "list-target"])
def test_kl_div_raises_what_torch_raises(backend, case):
    """Code written for torch catches what torch raises: fastlm's error is an instance of it."""
    x, t = logprobs(3, 5), logprobs(3, 5).exp()
    args = {"shape": (x, logprobs(2, 5), "sum"), "int-target": (x, torch.ones(3, 5, dtype=torch.int64), "sum"),
            "reduction": (x, t, "avg"), "list-input": (x.tolist(), t, "sum"), "list-target": (x, t.tolist(), "sum")}
    a, b, reduction = args[case]
    with pytest.raises(Exception) as theirs:
        F.kl_div(a, b, reduction=reduction)
    with fastlm.use_backend(backend), pytest.raises(type(theirs.value)) as ours:
        fastlm.kl_div(a, b, reduction=reduction)
    assert isinstance(ours.value, (fastlm.ArgumentError, fastlm.ArgumentTypeError))


@pytest.mark.skipif(ON_GPU, reason="the cuda backend exists there; on CPU it cannot run")
def test_kl_div_cuda_backend_refuses_on_cpu():
    with fastlm.use_backend("cuda"), pytest.raises(fastlm.BackendUnavailableError):
        fastlm.kl_div(logprobs(2, 5), logprobs(2, 5).exp(), reduction="sum")


# ============================================================================= jsd

def liger_jsd(s, t, label=None, beta=0.5, ignore_index=-100):
    """Liger-Kernel's definition written out (float64 in, float64 out), rows (R, V)."""
    P, Q = t.exp(), s.exp()
    if beta == 0.0:
        per_class = P * (t - s)
    elif beta == 1.0:
        per_class = Q * (s - t)
    else:
        M = beta * P + (1 - beta) * Q
        per_class = beta * P * t + (1 - beta) * Q * s - M * M.log()
    rows = per_class.sum(-1)
    if label is None:
        return rows.sum() / rows.numel()
    counted = label != ignore_index
    return torch.where(counted, rows, 0.0).sum() / counted.sum().clamp_min(1)


def gkd_jsd(s, t, beta):
    """GKD's definition, beta * KL(P || M) + (1 - beta) * KL(Q || M), by F.kl_div (batchmean)."""
    P, Q = t.exp(), s.exp()
    log_m = (beta * P + (1 - beta) * Q).log()
    kl_p = F.kl_div(log_m, t, reduction="batchmean", log_target=True)
    kl_q = F.kl_div(log_m, s, reduction="batchmean", log_target=True)
    return beta * kl_p + (1 - beta) * kl_q


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_reference_is_gkd_and_liger(beta):
    s, t = logprobs(6, 31).double(), logprobs(6, 31).double()
    loss, _ = ref.jsd_rows(s, t, None, beta, -100, False)
    torch.testing.assert_close(loss.mean(), liger_jsd(s, t, beta=beta))
    torch.testing.assert_close(loss.mean(), gkd_jsd(s, t, beta))


def test_jsd_ends_are_the_two_kl_directions():
    """beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher) (Liger's forward
    and reverse KL), and they are the limits of JSD_beta / beta and JSD_beta / (1 - beta)."""
    s, t = logprobs(5, 23).double(), logprobs(5, 23).double()
    rows = s.shape[0]
    forward_kl = F.kl_div(s, t, reduction="sum", log_target=True) / rows   # KL(P_teacher || P_student)
    reverse_kl = F.kl_div(t, s, reduction="sum", log_target=True) / rows   # KL(P_student || P_teacher)
    for backend in BACKENDS:
        with fastlm.use_backend(backend):
            j0, j1 = fastlm.jsd(s.float(), t.float(), beta=0.0), fastlm.jsd(s.float(), t.float(), beta=1.0)
            torch.testing.assert_close(j0.double(), forward_kl, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(j1.double(), reverse_kl, rtol=1e-5, atol=1e-6)
    eps = 1e-6
    near0 = ref.jsd_rows(s, t, None, eps, -100, False)[0].mean() / eps
    near1 = ref.jsd_rows(s, t, None, 1 - eps, -100, False)[0].mean() / eps
    torch.testing.assert_close(near0, forward_kl, rtol=1e-4, atol=0)
    torch.testing.assert_close(near1, reverse_kl, rtol=1e-4, atol=0)


def cancellation_atol(s, t, dtype):
    """The loss is a difference of entropy-like sums that cancel (0 for equal models): its
    rounding scales with those sums, sum P |log P| + Q |log Q| per row, not with the loss."""
    s, t = s.double(), t.double()
    terms = (t.exp() * t.abs()).nan_to_num(0.0) + (s.exp() * s.abs()).nan_to_num(0.0)
    return torch.finfo(dtype).eps * (1.0 + terms.sum(-1).mean().item())


def _jsd_check(backend, s, t, label=None, beta=0.5, ignore_index=-100, dloss=None):
    """fastlm.jsd and its student gradient against liger_jsd in float64 (autograd), the same
    formula in the tested dtype as the yardstick."""
    sl = s.detach().requires_grad_(True)
    with fastlm.use_backend(backend):
        loss = fastlm.jsd(sl, t, label, beta=beta, ignore_index=ignore_index)
    assert loss.dtype == s.dtype and loss.shape == ()
    if dloss is None:
        dloss = torch.rand((), device=s.device) + 0.5
    dloss = torch.as_tensor(dloss, device=s.device)
    (grad,) = torch.autograd.grad(loss, [sl], dloss.to(loss.dtype))
    vocab = s.shape[-1]
    lab = label.reshape(-1) if label is not None else None

    def run(cast):
        ss = cast(s).detach().requires_grad_(True)
        out = liger_jsd(ss.reshape(-1, vocab), cast(t).reshape(-1, vocab), lab, beta, ignore_index)
        return out, torch.autograd.grad(out, [ss], dloss.to(out.dtype))[0]

    ref_loss, ref_grad = run(lambda v: v.double())
    eager_loss, eager_grad = run(lambda v: v)
    assert_close(loss, ref_loss, eager_loss, "loss", atol=summation_floor(ref_loss, loss.dtype, s.numel())
                 + cancellation_atol(s.reshape(-1, vocab), t.reshape(-1, vocab), loss.dtype))
    assert_close(grad, ref_grad, eager_grad, "grad of student")
    return loss, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_jsd_matches_liger_formula(backend, beta, dtype):
    s, t = logprobs(2, 5, 113, dtype=dtype), logprobs(2, 5, 113, dtype=dtype)
    _jsd_check(backend, s, t, labels((2, 5), 113), beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 17), (7,)])
def test_jsd_shapes_without_target(backend, shape):
    _jsd_check(backend, logprobs(*shape), logprobs(*shape), None, 0.4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_ignore_index(backend):
    """Ignored rows count for nothing, even NaN ones; a custom ignore_index; every row ignored
    gives 0 with zero gradients."""
    s, t = logprobs(6, 20), logprobs(6, 20)
    label = torch.tensor([3, 7, 7, 0, 7, 1], device=DEVICE)
    s[1] = float("nan")
    s[4, 2] = float("nan")
    clean = s.masked_fill(torch.isnan(s), 0.0)
    _jsd_check(backend, clean, t, label, 0.5, ignore_index=7)
    sl, cl = s.requires_grad_(True), clean.requires_grad_(True)
    with fastlm.use_backend(backend):
        loss_nan = fastlm.jsd(sl, t, label, ignore_index=7)
        (grad_nan,) = torch.autograd.grad(loss_nan, [sl])
        loss = fastlm.jsd(cl, t, label, ignore_index=7)
        (grad,) = torch.autograd.grad(loss, [cl])
    torch.testing.assert_close(loss_nan, loss)
    torch.testing.assert_close(grad_nan, grad)
    assert (grad_nan[[1, 2, 4]] == 0).all()
    everything = torch.full((6,), -100, device=DEVICE)
    s0 = logprobs(6, 20).requires_grad_(True)
    with fastlm.use_backend(backend):
        loss0 = fastlm.jsd(s0, t, everything)
        (grad0,) = torch.autograd.grad(loss0, [s0])
    assert loss0.item() == 0.0 and (grad0 == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_masked_vocabulary_is_finite(backend, beta):
    """Classes at -inf in both models (a masked vocabulary) add nothing: the loss and
    gradient equal those over the unmasked classes alone."""
    s, t = logprobs(4, 24), logprobs(4, 24)
    keep = torch.ones(24, dtype=torch.bool, device=DEVICE)
    keep[[0, 5, 6, 23]] = False
    s_m = torch.log_softmax(s.masked_fill(~keep, float("-inf")), -1)
    t_m = torch.log_softmax(t.masked_fill(~keep, float("-inf")), -1)
    sl = s_m.requires_grad_(True)
    with fastlm.use_backend(backend):
        loss = fastlm.jsd(sl, t_m, beta=beta)
        (grad,) = torch.autograd.grad(loss, [sl])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[:, ~keep] == 0).all()
    expected, expected_grad = _jsd_check(backend, s_m[:, keep].detach(), t_m[:, keep], None, beta,
                                          dloss=1.0)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad[:, keep], expected_grad)


@pytest.mark.parametrize("vocab", [15, 16, 17, 33])
@pytest.mark.parametrize("beta", [0.0, 0.6, 1.0])
def test_jsd_vocab_block_edges(monkeypatch, vocab, beta):
    monkeypatch.setattr(kernels, "MAX_BLOCK_C", 16)
    _jsd_check("triton", logprobs(5, vocab), logprobs(5, vocab), labels((5,), vocab), beta)


@pytest.mark.parametrize("vocab", [kernels.MAX_BLOCK_C - 1, kernels.MAX_BLOCK_C + 1])
def test_jsd_default_block_edges(vocab):
    _jsd_check("triton", logprobs(2, vocab), logprobs(2, vocab), None, 0.5)
    x, w = torch.randn(3, 16, device=DEVICE), torch.randn(vocab, 16, device=DEVICE) * 0.3
    _ljsd_check("triton", x, w, torch.randn(3, 8, device=DEVICE), torch.randn(vocab, 8, device=DEVICE) * 0.3,
                None, 0.5, temperature=2.0, chunk_size=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_non_contiguous(backend):
    s = logprobs(3, 4, 19).transpose(0, 1)          # (4, 3, 19), rows not in memory order
    t = logprobs(4, 3, 40)[..., 5:24]               # a row stride of 40
    label = labels((3, 4), 19).t()
    assert not s.is_contiguous() and not t.is_contiguous() and not label.is_contiguous()
    _jsd_check(backend, s, t, label, 0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_teacher_gets_no_gradient(backend):
    s, t = logprobs(3, 9).requires_grad_(True), logprobs(3, 9).requires_grad_(True)
    with fastlm.use_backend(backend):
        loss = fastlm.jsd(s, t)
    gs, gt = torch.autograd.grad(loss, [s, t], allow_unused=True)
    assert gs is not None and gt is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_bad_arguments(backend):
    s, t = logprobs(3, 5), logprobs(3, 5)
    with fastlm.use_backend(backend):
        for beta in (-0.1, 1.5, float("nan"), True, "0.5"):
            with pytest.raises(fastlm.ArgumentError, match="beta"):
                fastlm.jsd(s, t, beta=beta)
        with pytest.raises(fastlm.ArgumentError, match="teacher_logprobs"):
            fastlm.jsd(s, logprobs(3, 6))
        with pytest.raises(fastlm.ArgumentError, match="target"):
            fastlm.jsd(s, t, torch.zeros(4, dtype=torch.int64, device=DEVICE))
        with pytest.raises(fastlm.ArgumentTypeError, match="target"):
            fastlm.jsd(s, t, torch.zeros(3, device=DEVICE))
        with pytest.raises(fastlm.ArgumentTypeError, match="student_logprobs"):
            fastlm.jsd(torch.zeros(3, 5, dtype=torch.int64, device=DEVICE), t)
        with pytest.raises(fastlm.ArgumentError, match="student_logprobs"):
            fastlm.jsd(torch.tensor(0.0, device=DEVICE), torch.tensor(0.0, device=DEVICE))
        with pytest.raises(fastlm.ArgumentTypeError, match="ignore_index"):
            fastlm.jsd(s, t, ignore_index=1.0)


# ============================================================================= linear_jsd

def _ljsd_check(backend, x, w, xt, wt, label=None, beta=0.5, temperature=1.0, chunk_size=None):
    """fastlm.linear_jsd and the student's gradients against liger_jsd of the unfused
    log-softmaxed logits in float64; the unfused path in the tested dtype as the yardstick."""
    xl, wl = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    with fastlm.use_backend(backend):
        loss = fastlm.linear_jsd(xl, wl, xt, wt, label, beta, temperature=temperature, chunk_size=chunk_size)
    assert loss.dtype == x.dtype and loss.shape == ()
    dloss = torch.rand((), device=x.device) + 0.5
    dx, dw = torch.autograd.grad(loss, [xl, wl], dloss.to(loss.dtype))
    vocab, lab = w.shape[0], (label.reshape(-1) if label is not None else None)

    def run(cast):
        xx, ww = cast(x).detach().requires_grad_(True), cast(w).detach().requires_grad_(True)
        s = torch.log_softmax((xx @ ww.t()).float() / temperature, -1).reshape(-1, vocab)
        t = torch.log_softmax((cast(xt) @ cast(wt).t()).float() / temperature, -1).reshape(-1, vocab)
        if cast(x).dtype == torch.float64:
            s, t = s.double(), t.double()
        out = liger_jsd(s, t, lab, beta)
        return (out,) + torch.autograd.grad(out, [xx, ww], dloss.to(out.dtype))

    ref_out = run(lambda v: v.double())
    eager = run(lambda v: v)
    hidden = x.shape[-1]
    with torch.no_grad():
        s64 = torch.log_softmax(x.double() @ w.double().t() / temperature, -1)
        t64 = torch.log_softmax(xt.double() @ wt.double().t() / temperature, -1)
    assert_close(loss, ref_out[0], eager[0], "loss", atol=summation_floor(ref_out[0], loss.dtype, x.numel())
                 + cancellation_atol(s64, t64, loss.dtype))
    assert_close(dx, ref_out[1], eager[1], "grad of student_input",
                 atol=summation_floor(ref_out[1], dx.dtype, vocab))
    assert_close(dw, ref_out[2], eager[2], "grad of student_weight",
                 atol=summation_floor(ref_out[2], dw.dtype, x.numel() // hidden))
    return loss, dx, dw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_linear_jsd_matches_unfused(backend, beta, chunk_size):
    x, w = torch.randn(2, 5, 16, device=DEVICE), torch.randn(37, 16, device=DEVICE) * 0.3
    xt, wt = torch.randn(2, 5, 24, device=DEVICE), torch.randn(37, 24, device=DEVICE) * 0.3
    _ljsd_check(backend, x, w, xt, wt, labels((2, 5), 37), beta, temperature=1.0, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_linear_jsd_temperature(backend, temperature):
    x, w = torch.randn(7, 16, device=DEVICE), torch.randn(29, 16, device=DEVICE) * 0.5
    xt, wt = torch.randn(7, 16, device=DEVICE), torch.randn(29, 16, device=DEVICE) * 0.5
    _ljsd_check(backend, x, w, xt, wt, None, 0.3, temperature=temperature, chunk_size=4)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_jsd_16_bit(backend, dtype):
    x, w = torch.randn(9, 32, device=DEVICE).to(dtype), (torch.randn(45, 32, device=DEVICE) * 0.2).to(dtype)
    xt, wt = torch.randn(9, 16, device=DEVICE).to(dtype), (torch.randn(45, 16, device=DEVICE) * 0.2).to(dtype)
    _ljsd_check(backend, x, w, xt, wt, labels((9,), 45), 0.5, chunk_size=4)


@pytest.mark.parametrize("vocab", [15, 16, 17, 33])
def test_linear_jsd_vocab_block_edges(monkeypatch, vocab):
    monkeypatch.setattr(kernels, "MAX_BLOCK_C", 16)
    x, w = torch.randn(5, 16, device=DEVICE), torch.randn(vocab, 16, device=DEVICE) * 0.5
    xt, wt = torch.randn(5, 8, device=DEVICE), torch.randn(vocab, 8, device=DEVICE) * 0.5
    for beta in (0.0, 0.5, 1.0):
        _ljsd_check("triton", x, w, xt, wt, labels((5,), vocab), beta, temperature=1.5, chunk_size=2)


def test_linear_jsd_gradients_only_to_the_student():
    x, w = torch.randn(4, 8, device=DEVICE, requires_grad=True), torch.randn(11, 8, device=DEVICE, requires_grad=True)
    xt, wt = torch.randn(4, 8, device=DEVICE, requires_grad=True), torch.randn(11, 8, device=DEVICE,
                                                                             requires_grad=True)
    for backend in BACKENDS:
        with fastlm.use_backend(backend):
            loss = fastlm.linear_jsd(x, w, xt, wt)
        grads = torch.autograd.grad(loss, [x, w, xt, wt], allow_unused=True)
        assert grads[0] is not None and grads[1] is not None and grads[2] is None and grads[3] is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_jsd_non_contiguous_and_all_ignored(backend):
    x = torch.randn(16, 6, device=DEVICE).t()           # (6, 16), transposed
    w = torch.randn(16, 21, device=DEVICE).t() * 0.5    # (21, 16), transposed
    xt, wt = torch.randn(6, 10, device=DEVICE)[:, ::2], torch.randn(21, 5, device=DEVICE)
    _ljsd_check(backend, x, w, xt, wt, labels((6,), 21), 0.5, chunk_size=4)
    xl = x.detach().requires_grad_(True)
    with fastlm.use_backend(backend):
        loss = fastlm.linear_jsd(xl, w, xt, wt, torch.full((6,), -100, device=DEVICE))
    (dx,) = torch.autograd.grad(loss, [xl])
    assert loss.item() == 0.0 and (dx == 0).all()


def test_linear_jsd_without_grad_gives_the_same_loss():
    x, w = torch.randn(6, 8, device=DEVICE), torch.randn(13, 8, device=DEVICE)
    xt, wt = torch.randn(6, 8, device=DEVICE), torch.randn(13, 8, device=DEVICE)
    for backend in BACKENDS:
        with fastlm.use_backend(backend):
            with torch.no_grad():
                a = fastlm.linear_jsd(x, w, xt, wt, chunk_size=2)
            b = fastlm.linear_jsd(x, w.requires_grad_(True), xt, wt, chunk_size=2)
        torch.testing.assert_close(a, b.detach())
        w.requires_grad_(False)


def test_linear_jsd_bad_arguments():
    x, w, xt, wt = (torch.randn(4, 8, device=DEVICE), torch.randn(11, 8, device=DEVICE),
                    torch.randn(4, 6, device=DEVICE), torch.randn(11, 6, device=DEVICE))
    with pytest.raises(fastlm.ArgumentError, match="student_weight"):
        fastlm.linear_jsd(x, torch.randn(11, 7, device=DEVICE), xt, wt)
    with pytest.raises(fastlm.ArgumentError, match="teacher_weight"):
        fastlm.linear_jsd(x, w, xt, torch.randn(12, 6, device=DEVICE))
    with pytest.raises(fastlm.ArgumentError, match="teacher_input"):
        fastlm.linear_jsd(x, w, torch.randn(5, 6, device=DEVICE), wt)
    with pytest.raises(fastlm.ArgumentTypeError, match="student_weight"):
        fastlm.linear_jsd(x, w.double(), xt, wt)
    for temperature in (0.0, -1.0, float("inf")):
        with pytest.raises(fastlm.ArgumentError, match="temperature"):
            fastlm.linear_jsd(x, w, xt, wt, temperature=temperature)
    with pytest.raises(fastlm.ArgumentError, match="chunk_size"):
        fastlm.linear_jsd(x, w, xt, wt, chunk_size=0)
    with pytest.raises(fastlm.ArgumentError, match="beta"):
        fastlm.linear_jsd(x, w, xt, wt, beta=2.0)
    with pytest.raises(fastlm.ArgumentError, match="target"):
        fastlm.linear_jsd(x, w, xt, wt, torch.zeros(3, dtype=torch.int64, device=DEVICE))


def test_wide_class_offsets(monkeypatch):
    """A class stride that takes (C - 1) * stride past 2^31 sets WIDE_C (int64 class offsets);
    the kernels give the same answers on that path (forced here on small tensors)."""
    assert kernels._wide(3, 2 ** 30) and not kernels._wide(3, 2 ** 30 - 1) and not kernels._wide(2 ** 20, 1)
    monkeypatch.setattr(kernels, "_wide", lambda classes, *strides: True)
    x, t = logprobs(17, 5).t(), logprobs(5, 17)
    _kl_check("triton", x, t.exp(), "none", target_grad=True)
    _kl_check("triton", x, t, "sum", log_target=True, target_grad=True)
    _jsd_check("triton", x, t, labels((5,), 17), 0.5)
    _ljsd_check("triton", torch.randn(4, 8, device=DEVICE), torch.randn(17, 8, device=DEVICE),
                torch.randn(4, 8, device=DEVICE), torch.randn(17, 8, device=DEVICE), None, 0.5, chunk_size=3)


# ============================================================================= custom ops

def test_custom_ops_pass_opcheck():
    """The registrations (schema, fake, autograd) on the reference path."""
    from fastlm.ops import distill as ops
    s = logprobs(3, 7).requires_grad_(True)
    t = logprobs(3, 7)
    label = torch.tensor([1, -100, 2], device=DEVICE)
    with fastlm.use_backend("torch"):
        torch.library.opcheck(ops._kl_div, (s, t.exp(), False, True))
        torch.library.opcheck(ops._kl_div, (s, t, True, False))
        torch.library.opcheck(ops._jsd, (s, t, label, 0.5, -100))
        x, w = torch.randn(5, 4, device=DEVICE), torch.randn(7, 4, device=DEVICE, requires_grad=True)
        torch.library.opcheck(ops._linear_jsd, (x, w, x.clone(), w.detach().clone(), None, 0.5, -100, 1.0, 2, True))


def test_compiled_matches_eager():
    s = logprobs(4, 9).requires_grad_(True)
    t = logprobs(4, 9)
    label = labels((4,), 9)

    def f(s, t, label):
        return fastlm.jsd(s, t, label, beta=0.3) + fastlm.kl_div(s, t, reduction="batchmean", log_target=True)

    eager = f(s, t, label)
    (g_eager,) = torch.autograd.grad(eager, [s])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(s, t, label)
    (g_compiled,) = torch.autograd.grad(compiled, [s])
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)


# ============================================================================= modules

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(), dict(reduction="batchmean", log_target=True), dict(reduction="none"),
                                    dict(size_average=False), dict(reduce=False, log_target=True)],
                         ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_kl_div_loss_module_is_torchs(backend, kwargs):
    ours, theirs = fastlm.nn.KLDivLoss(**kwargs), torch.nn.KLDivLoss(**kwargs)
    assert isinstance(ours, torch.nn.KLDivLoss)
    assert ours.reduction == theirs.reduction and ours.log_target == theirs.log_target
    assert repr(ours) == repr(theirs) and ours.state_dict().keys() == theirs.state_dict().keys()
    x = logprobs(5, 13).requires_grad_(True)
    t = logprobs(5, 13)
    if not kwargs.get("log_target"):
        t = t.exp()
    with fastlm.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(x, t)
        expected = theirs(x, t)
    (g,) = torch.autograd.grad(got.sum(), [x])
    (g_ref,) = torch.autograd.grad(expected.sum(), [x])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_modules_call_the_functions(backend):
    s, t = logprobs(4, 3, 11).requires_grad_(True), logprobs(4, 3, 11)
    label = labels((4, 3), 11, ignore_index=5)
    module = fastlm.nn.JSDLoss(beta=0.2, ignore_index=5)
    assert repr(module) == "JSDLoss(beta=0.2, ignore_index=5)" and not list(module.parameters())
    with fastlm.use_backend(backend):
        torch.testing.assert_close(module(s, t, label), fastlm.jsd(s, t, label, beta=0.2, ignore_index=5))
    x, w = torch.randn(6, 8, device=DEVICE, requires_grad=True), torch.randn(11, 8, device=DEVICE, requires_grad=True)
    xt, wt = torch.randn(6, 4, device=DEVICE), torch.randn(11, 4, device=DEVICE)
    lin = fastlm.nn.LinearJSDLoss(beta=0.7, temperature=2.0, chunk_size=4)
    assert "temperature=2.0" in repr(lin) and "chunk_size=4" in repr(lin) and not list(lin.parameters())
    with fastlm.use_backend(backend):
        got = lin(x, w, xt, wt)
        expected = fastlm.linear_jsd(x, w, xt, wt, None, 0.7, temperature=2.0, chunk_size=4)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, [x, w]), torch.autograd.grad(expected, [x, w]))
