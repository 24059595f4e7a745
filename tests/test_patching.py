"""fastlm.patch / unpatch on plain PyTorch models."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastlm

from .conftest import DEVICE


class MyNorm(torch.nn.LayerNorm):  # a user's subclass: its forward is kept
    pass


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.blocks = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32),
                                          torch.nn.RMSNorm(32))
        self.custom = MyNorm(32)
        self.head = torch.nn.Linear(32, 11)
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x, target):
        h = self.norm(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.custom(self.blocks(h))
        logits = self.head(h)
        return self.loss(logits.flatten(0, 1), target.flatten())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_swaps_in_place_and_unpatch_restores(backend):
    torch.manual_seed(0)
    net = Net().to(DEVICE)
    x = torch.randn(2, 9, 32, device=DEVICE)
    t = torch.randint(0, 11, (2, 9), device=DEVICE)
    before = net(x, t)
    g_before = torch.autograd.grad(before, list(net.parameters()))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = {k: v.data_ptr() for k, v in net.named_parameters()}

    replaced = fastlm.patch(net)
    assert sorted(replaced) == sorted([("norm", "LayerNorm"), ("attn", "MultiheadAttention"),
                                       ("blocks.3", "RMSNorm"), ("loss", "CrossEntropyLoss")])
    assert type(net.norm) is fastlm.nn.LayerNorm and type(net.attn) is fastlm.nn.MultiheadAttention
    assert type(net.blocks[3]) is fastlm.nn.RMSNorm and type(net.loss) is fastlm.nn.CrossEntropyLoss
    assert type(net.custom) is MyNorm and type(net.head) is torch.nn.Linear
    assert {k: v.data_ptr() for k, v in net.named_parameters()} == params  # the same tensors
    assert net.state_dict().keys() == state.keys()
    with fastlm.use_backend(backend):
        after = net(x, t)
        g_after = torch.autograd.grad(after, list(net.parameters()))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_after, g_before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    restored = fastlm.unpatch(net)
    assert sorted(restored) == sorted(replaced)
    assert type(net.norm) is torch.nn.LayerNorm and type(net.loss) is torch.nn.CrossEntropyLoss
    assert not hasattr(net.loss, "z_loss") and not hasattr(net.norm, "_fastlm_original_class")
    torch.testing.assert_close(net(x, t), before)


def test_patch_linear_and_the_model_itself():
    lin = torch.nn.Linear(8, 4)
    assert fastlm.patch(lin) == []
    assert fastlm.patch(lin, linear=True) == [("", "Linear")]
    assert type(lin) is fastlm.nn.Linear and lin.activation is None
    x = torch.randn(3, 8)
    torch.testing.assert_close(lin(x), x @ lin.weight.t() + lin.bias)
    assert fastlm.unpatch(lin) == [("", "Linear")] and type(lin) is torch.nn.Linear


def test_patching_twice_is_harmless_and_bad_input_is_named():
    net = torch.nn.Sequential(torch.nn.LayerNorm(4))
    assert len(fastlm.patch(net)) == 1 and fastlm.patch(net) == []
    with pytest.raises(TypeError, match="model"):
        fastlm.patch("not a module")


def test_patched_attention_warns_about_need_weights_once():
    import fastlm.nn.attention as mha
    mha._warned_need_weights = False
    net = torch.nn.Sequential()
    net.attn = torch.nn.MultiheadAttention(16, 2)
    fastlm.patch(net)
    x = torch.randn(5, 2, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net.attn(x, x, x)
    assert any("need_weights" in str(w.message) for w in caught)
