"""fastlm.nn.CrossEntropyLoss is a faithful drop-in for torch.nn.CrossEntropyLoss."""

from __future__ import annotations

import pytest
import torch

import fastlm

from .conftest import DEVICE

BACKENDS = ["torch", "triton"]
KWARGS = [
    dict(),
    dict(ignore_index=2, reduction="sum"),
    dict(label_smoothing=0.1, reduction="none"),
    dict(weight=True, label_smoothing=0.05),
]


def _build(cls, kwargs):
    kwargs = dict(kwargs)
    if kwargs.get("weight") is True:
        kwargs["weight"] = torch.rand(11, device=DEVICE) + 0.1
    return cls(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", KWARGS, ids=lambda k: "-".join(k) or "default")
def test_same_results_as_torch(backend, kwargs):
    torch.manual_seed(3)
    ours = _build(fastlm.nn.CrossEntropyLoss, kwargs)
    theirs = torch.nn.CrossEntropyLoss(**{**kwargs, "weight": ours.weight})
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(9, 11, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 11, (9,), device=DEVICE)
    with fastlm.use_backend(backend):
        got = ours(x, t)
        (g,) = torch.autograd.grad(got.sum(), [x])
    expected = theirs(x, t)
    (g_ref,) = torch.autograd.grad(expected.sum(), [x])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_and_extensions():
    w = torch.rand(5)
    theirs = torch.nn.CrossEntropyLoss(weight=w)
    ours = fastlm.nn.CrossEntropyLoss(weight=torch.zeros(5), z_loss=1e-4, softcap=30.0)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, w)
    assert "z_loss=0.0001" in repr(ours) and "softcap=30.0" in repr(ours)
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    plain = fastlm.nn.CrossEntropyLoss(weight=w)(x, t)
    assert ours(x, t) > plain  # z_loss only adds


# ----------------------------------------------------------------------------- LinearCrossEntropyLoss

import inspect  # noqa: E402

import torch.nn.functional as F  # noqa: E402

TorchLCE = getattr(torch.nn, "LinearCrossEntropyLoss", None)
needs_torch_lce = pytest.mark.skipif(TorchLCE is None, reason="torch.nn.LinearCrossEntropyLoss is torch 2.13's")
_P = inspect.Parameter
# torch 2.13's LinearCrossEntropyLoss.__init__ and forward, copied here (name, kind, default).
TORCH_LCE_INIT = [
    ("self", _P.POSITIONAL_OR_KEYWORD, _P.empty),
    ("in_features", _P.POSITIONAL_OR_KEYWORD, _P.empty),
    ("num_classes", _P.POSITIONAL_OR_KEYWORD, _P.empty),
    ("out_features", _P.KEYWORD_ONLY, ()),
    ("bias", _P.KEYWORD_ONLY, False),
    ("device", _P.KEYWORD_ONLY, None),
    ("dtype", _P.KEYWORD_ONLY, None),
    ("reduction", _P.KEYWORD_ONLY, "mean"),
    ("weight", _P.KEYWORD_ONLY, None),
    ("ignore_index", _P.KEYWORD_ONLY, None),
    ("label_smoothing", _P.KEYWORD_ONLY, 0.0),
    ("options", _P.KEYWORD_ONLY, None),
]
TORCH_LCE_FORWARD = [
    ("self", _P.POSITIONAL_OR_KEYWORD, _P.empty),
    ("input", _P.POSITIONAL_OR_KEYWORD, _P.empty),
    ("target", _P.POSITIONAL_OR_KEYWORD, _P.empty),
]
FASTLM_EXTRAS = [("z_loss", 0.0), ("softcap", None), ("chunk_size", None), ("acc_dtype", None)]


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_linear_cross_entropy_loss_signatures_are_torchs():
    init = _params(fastlm.nn.LinearCrossEntropyLoss.__init__)
    assert init[:len(TORCH_LCE_INIT)] == TORCH_LCE_INIT
    assert init[len(TORCH_LCE_INIT):] == [(n, _P.KEYWORD_ONLY, d) for n, d in FASTLM_EXTRAS]
    assert _params(fastlm.nn.LinearCrossEntropyLoss.forward) == TORCH_LCE_FORWARD
    if TorchLCE is not None:  # torch 2.13: the copies above are still its lists
        assert _params(TorchLCE.__init__) == TORCH_LCE_INIT
        assert _params(TorchLCE.forward) == TORCH_LCE_FORWARD


LCE_ARGS = [
    dict(),
    dict(bias=True),
    dict(out_features=(3,), bias=True),
    dict(out_features=(2, 3)),
    dict(weight=True, reduction="sum", ignore_index=1, label_smoothing=0.1),
    dict(weight=True, bias=True, reduction="none"),
]


def _lce_pair(kwargs, dtype=torch.float64):
    """fastlm's and torch's modules from the same arguments and the same seed."""
    kwargs = dict(kwargs)
    if kwargs.get("weight") is True:
        kwargs["weight"] = torch.rand(7, device=DEVICE, dtype=dtype) + 0.2
    torch.manual_seed(11)
    ours = fastlm.nn.LinearCrossEntropyLoss(10, 7, device=DEVICE, dtype=dtype, **kwargs)
    torch.manual_seed(11)
    theirs = TorchLCE(10, 7, device=DEVICE, dtype=dtype, **kwargs)
    return ours, theirs


def _lce_inputs(module, n=13, probabilities=False):
    x = torch.randn(n, 10, device=DEVICE, dtype=torch.float64)
    if probabilities:
        t = torch.rand((n, 7, *module.out_features), device=DEVICE, dtype=torch.float64).softmax(1)
    else:
        t = torch.randint(0, 7, (n, *module.out_features), device=DEVICE)
        t.view(-1)[::4] = -100 if module.ignore_index is None else module.ignore_index
    return x, t


def _loss_and_grads(module, x, t, dloss=None):
    module.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    loss = module(xx, t)
    dloss = torch.randn_like(loss) if dloss is None else dloss
    loss.backward(dloss)
    return loss.detach(), dloss, [xx.grad] + [p.grad for p in module.parameters()]


@needs_torch_lce
@pytest.mark.parametrize("kwargs", LCE_ARGS, ids=lambda k: "-".join(k) or "default")
def test_linear_cross_entropy_loss_is_torchs(kwargs):
    """Same arguments -> same state (names, shapes, the initialisation's values), repr and
    class; the same weights -> the same loss and gradients as torch's module in float64."""
    ours, theirs = _lce_pair(kwargs)
    assert isinstance(ours, TorchLCE)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for name in theirs_sd:
        assert ours_sd[name].shape == theirs_sd[name].shape and torch.equal(ours_sd[name], theirs_sd[name]), name
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert repr(ours) == repr(theirs)
    for probabilities in (False, True):
        if probabilities and kwargs.get("ignore_index") is not None:
            continue  # torch refuses ignore_index with probabilities
        x, t = _lce_inputs(ours, probabilities=probabilities)
        got, dloss, g_got = _loss_and_grads(ours, x, t)
        ref, _, g_ref = _loss_and_grads(theirs, x, t, dloss)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        assert len(g_got) == len(g_ref)
        for g, r in zip(g_got, g_ref):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@needs_torch_lce
def test_linear_cross_entropy_loss_fused_path_and_state_dict_both_ways():
    """With chunk_size set the fused chunked op runs (class weights and bias included) and
    still gives torch's numbers; a state_dict loads from torch's module and back."""
    ours, theirs = _lce_pair(dict(weight=True, bias=True, label_smoothing=0.1))
    ours.chunk_size = 4
    with fastlm.use_backend("torch"):
        x, t = _lce_inputs(ours, n=15)
        got, dloss, g_got = _loss_and_grads(ours, x, t)
    ref, _, g_ref = _loss_and_grads(theirs, x, t, dloss)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(g_got, g_ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    torch.manual_seed(5)
    other = TorchLCE(10, 7, bias=True, weight=torch.rand(7, dtype=torch.float64), dtype=torch.float64)
    ours.load_state_dict(other.state_dict())
    assert torch.equal(ours.linear.weight, other.linear.weight) and torch.equal(ours.weight, other.weight)
    back = TorchLCE(10, 7, bias=True, weight=torch.zeros(7, dtype=torch.float64), dtype=torch.float64)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.linear.bias, other.linear.bias)


@needs_torch_lce
def test_patched_linear_cross_entropy_loss_gives_the_same_numbers():
    ours, theirs = _lce_pair(dict(weight=True, bias=True, out_features=(2,)))
    patched = TorchLCE(10, 7, device=DEVICE, dtype=torch.float64, weight=theirs.weight, bias=True, out_features=(2,))
    patched.load_state_dict(theirs.state_dict())
    model = torch.nn.ModuleList([patched])
    assert fastlm.patch(model) == [("0", "LinearCrossEntropyLoss")]
    assert type(patched) is fastlm.nn.LinearCrossEntropyLoss and patched.z_loss == 0.0 and patched.chunk_size is None
    x, t = _lce_inputs(patched)
    got, dloss, g_got = _loss_and_grads(patched, x, t)
    ref, _, g_ref = _loss_and_grads(theirs, x, t, dloss)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(g_got, g_ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert repr(patched) == repr(theirs)
    fastlm.unpatch(model)
    assert type(patched) is TorchLCE and "z_loss" not in patched.__dict__


def test_linear_cross_entropy_loss_extras_and_checks(monkeypatch):
    """The extras reach the op (z_loss adds, acc_dtype is dweight's accumulator) and show in
    the repr; torch's argument checks are kept. Runs on any torch (no torch module needed)."""
    import fastlm.ops.linear_cross_entropy as lce
    seen = []
    real = lce.resolve_acc_dtype
    monkeypatch.setattr(lce, "resolve_acc_dtype", lambda w, a: seen.append(a) or real(w, a))
    torch.manual_seed(2)
    plain = fastlm.nn.LinearCrossEntropyLoss(8, 20, bias=True)
    extra = fastlm.nn.LinearCrossEntropyLoss(8, 20, bias=True, z_loss=1e-2, chunk_size=4, acc_dtype=torch.float64)
    extra.load_state_dict(plain.state_dict())
    assert "z_loss=0.01" in repr(extra) and "chunk_size=4" in repr(extra) and "acc_dtype=torch.float64" in repr(extra)
    assert "z_loss" not in repr(plain)
    x, t = torch.randn(9, 8), torch.randint(0, 20, (9,))
    with fastlm.use_backend("torch"):
        loss = extra(x, t)
        loss.backward()
    logits = F.linear(x, plain.linear.weight, plain.linear.bias)
    expected = F.cross_entropy(logits, t) + 1e-2 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert seen and set(seen) == {torch.float64}
    with pytest.raises(RuntimeError, match="weight shape"):
        fastlm.nn.LinearCrossEntropyLoss(8, 20, weight=torch.ones(19))
    with pytest.raises(RuntimeError, match="label_smoothing"):
        fastlm.nn.LinearCrossEntropyLoss(8, 20, label_smoothing=1.5)
