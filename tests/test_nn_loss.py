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
