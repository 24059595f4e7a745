"""fastlm.nn.LayerNorm and RMSNorm are faithful drop-ins for their torch.nn twins."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.testing import assert_close

from .conftest import DEVICE

BACKENDS = ["torch", "triton"]

LAYER_NORM_ARGS = [
    dict(normalized_shape=64),
    dict(normalized_shape=(4, 16), eps=1e-6),
    dict(normalized_shape=64, elementwise_affine=False),
    dict(normalized_shape=64, bias=False),
]
RMS_NORM_ARGS = [
    dict(normalized_shape=64),
    dict(normalized_shape=[4, 16], eps=1e-6),
    dict(normalized_shape=64, elementwise_affine=False),
]


def _pairs():
    for kwargs in LAYER_NORM_ARGS:
        yield torch.nn.LayerNorm, fastlm.nn.LayerNorm, kwargs
    for kwargs in RMS_NORM_ARGS:
        yield torch.nn.RMSNorm, fastlm.nn.RMSNorm, kwargs


PAIRS = list(_pairs())
IDS = [f"{ours.__name__}-{kw}" for _, ours, kw in PAIRS]


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("theirs,ours,kwargs", PAIRS, ids=IDS)
def test_same_parameters_and_state_dict_both_ways(theirs, ours, kwargs):
    a, b = theirs(**kwargs), ours(**kwargs)
    assert isinstance(b, theirs)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert a.state_dict().keys() == b.state_dict().keys()
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb)  # the same initialisation
    assert (a.eps, tuple(a.normalized_shape)) == (b.eps, tuple(b.normalized_shape))
    assert repr(a).replace(theirs.__name__, "") == repr(b).replace(ours.__name__, "")
    _randomise(a)
    b.load_state_dict(a.state_dict())
    _randomise(b)
    a.load_state_dict(b.state_dict())
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("theirs,ours,kwargs", PAIRS, ids=IDS)
def test_same_outputs_and_gradients(backend, theirs, ours, kwargs):
    a = theirs(**kwargs, device=DEVICE)
    _randomise(a)
    b = ours(**kwargs, device=DEVICE)
    b.load_state_dict(a.state_dict())
    shape = kwargs["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    x = torch.randn((3, 5) + shape, device=DEVICE)
    dy = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = a(xa)
    with fastlm.use_backend(backend):
        yb = b(xb)
        gb = torch.autograd.grad(yb, [xb, *b.parameters()], dy)
    ga = torch.autograd.grad(ya, [xa, *a.parameters()], dy)
    # the float64 oracle: torch's module in float64
    a64 = theirs(**kwargs, device=DEVICE, dtype=torch.float64)
    a64.load_state_dict(a.state_dict())
    x64 = x.double().requires_grad_(True)
    y64 = a64(x64)
    g64 = torch.autograd.grad(y64, [x64, *a64.parameters()], dy.double())
    assert_close(yb, y64, ya, "output")
    for i, (got, ref, eager) in enumerate(zip(gb, g64, ga)):
        assert_close(got, ref, eager, f"gradient {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,fn", [(fastlm.nn.LayerNorm, fastlm.add_layer_norm),
                                    (fastlm.nn.RMSNorm, fastlm.add_rms_norm)])
def test_residual_forward(backend, cls, fn):
    m = cls(32, device=DEVICE)
    _randomise(m)
    x, r = torch.randn(6, 32, device=DEVICE), torch.randn(6, 32, device=DEVICE)
    with fastlm.use_backend(backend):
        y, s = m(x, r, return_residual=True)
        assert torch.equal(m(x, r), y)
        assert torch.equal(s, x + r)
        torch.testing.assert_close(y, m(x + r))
    with pytest.raises(ValueError, match="residual"):
        m(x, return_residual=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_rms_norm_eps_none_matches_torch(backend, dtype):
    """Small inputs, where eps decides the answer: torch's eps=None is the epsilon of its
    compute type (float32 for 16-bit inputs), and fastlm's must be the same."""
    if backend == "triton" and dtype in (torch.bfloat16, torch.float64):
        pytest.skip("bfloat16: interpreter truncation; float64: no kernel")
    m = fastlm.nn.RMSNorm(16, eps=None, device=DEVICE, dtype=dtype)
    ref = torch.nn.RMSNorm(16, eps=None, device=DEVICE, dtype=dtype)
    x = torch.randn(4, 16, device=DEVICE, dtype=dtype) * 1e-3
    with fastlm.use_backend(backend):
        y = m(x)
        y2 = fastlm.add_rms_norm(x, x, 16)
    tol = dict(atol=1e-2, rtol=1e-2) if dtype in (torch.float16, torch.bfloat16) else {}
    torch.testing.assert_close(y, ref(x), **tol)
    torch.testing.assert_close(y2, ref(x + x), **tol)


def test_modules_move_with_to_and_keep_dtype():
    m = fastlm.nn.LayerNorm(8).to(torch.float16)
    assert m.weight.dtype == torch.float16
    y = m(torch.randn(2, 8, dtype=torch.float16))
    assert y.dtype == torch.float16
