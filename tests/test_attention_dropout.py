"""Attention dropout's randomness: where the seed comes from and what reproduces a mask.

The seed is one int64 drawn per call by the generator of the inputs' device (on a GPU the
CUDA generator's Philox offset, as SDPA and flash-attn draw theirs), kept on that device and
saved for the backward, which regenerates the forward's mask from it. So torch.manual_seed
(torch.cuda.manual_seed on a GPU) reproduces a mask, two calls draw two masks, nothing is
copied from the host per call, and a CUDA graph draws a new mask on every replay.
"""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.ops import attention as attn_ops

from .conftest import DEVICE
from .test_attention import check, naive, qkv

BACKENDS = ["torch", "triton"]
P = 0.3


def _sdpa(q, k, v):
    """SDPA on (B, L, H, D) tensors, through its (B, H, L, D) interface."""
    out = fastlm.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=P)
    return out.transpose(1, 2)


def _varlen(q, k, v):
    B, L, H, D = q.shape
    cu = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=q.device)
    out = fastlm.flash_attn_varlen_func(q.reshape(B * L, H, D), k.reshape(B * L, -1, D), v.reshape(B * L, -1, D),
                                        cu, cu, L, L, dropout_p=P)
    return out.reshape(B, L, H, -1)


def _module(q, k, v):
    mha = fastlm.nn.MultiheadAttention(q.shape[-1] * q.shape[-2], q.shape[-2], dropout=P, batch_first=True,
                                       device=q.device)
    x = q.flatten(-2)
    return mha(x, x, x, need_weights=False)[0]


INTERFACES = {
    "flash_attn_func": lambda q, k, v: fastlm.flash_attn_func(q, k, v, dropout_p=P),
    "flash_attn_varlen_func": _varlen,
    "scaled_dot_product_attention": _sdpa,
    "nn.MultiheadAttention": _module,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interface", list(INTERFACES))
def test_seed_is_drawn_on_the_inputs_device_and_never_copied(monkeypatch, backend, interface):
    """Every public interface draws its seed with torch.randint on the inputs' own device (its
    generator: CUDA's Philox offset on a GPU), and nothing moves the seed between devices (a
    host-to-device copy per call, which a CUDA graph cannot capture). Spies on torch.randint
    and Tensor.to record every draw and every move of a one-element int64 tensor."""
    draws, moves = [], []
    randint, to = torch.randint, torch.Tensor.to

    def spy_randint(*args, **kwargs):
        out = randint(*args, **kwargs)
        draws.append((kwargs.get("device"), out.device))
        return out

    def spy_to(self, *args, **kwargs):
        if self.dtype == torch.int64 and self.shape == (1,):
            moves.append((args, kwargs))
        return to(self, *args, **kwargs)

    q, k, v = qkv(2, 17, 17, 2, 2, 16)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    monkeypatch.setattr(torch, "randint", spy_randint)
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    with fastlm.use_backend(backend):
        out = INTERFACES[interface](*leaves)
        out.sum().backward()
    monkeypatch.undo()
    assert len(draws) == 1, draws  # one seed per call, the backward draws none
    asked, got = draws[0]
    assert asked is not None and torch.device(asked) == q.device and got == q.device, draws
    assert not moves, f"the seed was moved between devices: {moves}"


def test_draw_dropout_seed_takes_the_device():
    """draw_dropout_seed(device) creates the seed there (a meta tensor shows it without a GPU);
    with no device it stays on the CPU, as before."""
    assert attn_ops.draw_dropout_seed(torch.device("meta")).device.type == "meta"
    seed = attn_ops.draw_dropout_seed(DEVICE)
    assert seed.device == DEVICE and seed.dtype == torch.int64 and seed.shape == (1,)
    assert attn_ops.draw_dropout_seed().device.type == "cpu"
    assert attn_ops._seed_for(0.0, DEVICE) is None and attn_ops._seed_for(0.1, DEVICE).device == DEVICE


def test_a_seed_on_another_device_is_refused():
    """The custom op takes the seed where q is, never copies it: a mismatch is a clear error
    (the meta device stands in for a second device on a CPU-only machine)."""
    q, k, v = qkv(1, 17, 17, 2, 2, 16)
    seed = torch.zeros(1, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="seed"):
        torch.ops.fastlm.attention(q, k, v, None, None, None, None, seed, 0.25, True, -1, -1, 0.0, 0.1, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_manual_seed_reproduces_output_and_gradients_and_calls_differ(backend):
    """torch.manual_seed before a call fixes its mask, forward and backward; the next call,
    without reseeding, draws another one."""
    q, k, v = qkv(2, 17, 33, 2, 1, 16)
    dout = torch.randn(2, 17, 2, 16, device=DEVICE)

    def run():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        with fastlm.use_backend(backend):
            out = fastlm.flash_attn_func(*leaves, dropout_p=P, causal=True)
            return (out,) + torch.autograd.grad(out, leaves, dout)

    torch.manual_seed(21)
    first, second = run(), run()
    torch.manual_seed(21)
    again = run()
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for a, b in zip(first, second):
        assert not torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_uses_the_forwards_mask_after_other_draws(backend):
    """Between the forward and the backward the program draws other random numbers and runs
    another dropout call: the backward still uses the forward's mask (its saved seed), checked
    against the float64 oracle run on the mask dropout_mask reports for that seed."""
    B, L, S, H, Hk, D = 2, 17, 20, 4, 2, 16
    torch.manual_seed(4)
    keep = attn_ops.dropout_mask(attn_ops.draw_dropout_seed(DEVICE), B, H, L, S, P, backend, DEVICE)
    assert 0.6 < keep.float().mean().item() < 0.8

    def ours(q, k, v):
        torch.manual_seed(4)  # the call draws the same seed
        out = fastlm.flash_attn_func(q, k, v, dropout_p=P)
        torch.rand(1000, device=q.device)
        fastlm.flash_attn_func(q.detach(), k.detach(), v.detach(), dropout_p=P)
        return out

    check(backend, ours, lambda q, k, v: naive(q, k, v, keep=keep.to(q.dtype), dropout_p=P), qkv(B, L, S, H, Hk, D))


# ----------------------------------------------------------------------------- GPU only

def _gpu_inputs():
    return qkv(2, 257, 257, 4, 2, 64, dtype=torch.float16)


@pytest.mark.gpu
def test_gpu_cuda_generator_controls_the_mask():
    """torch.cuda.manual_seed alone fixes the mask: reseeding the CPU generator differently
    changes nothing (the seed no longer comes from it)."""
    q, k, v = _gpu_inputs()
    with fastlm.use_backend("triton"):
        torch.cuda.manual_seed(5)
        torch.random.default_generator.manual_seed(1)
        a = fastlm.flash_attn_func(q, k, v, dropout_p=P)
        torch.cuda.manual_seed(5)
        torch.random.default_generator.manual_seed(2)
        b = fastlm.flash_attn_func(q, k, v, dropout_p=P)
        c = fastlm.flash_attn_func(q, k, v, dropout_p=P)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.gpu
def test_gpu_dropout_makes_no_host_sync():
    """Forward and backward with dropout under torch's sync debug mode set to error: no host
    sync and no synchronous host-to-device copy of a seed."""
    q, k, v = (t.requires_grad_(True) for t in _gpu_inputs())
    with fastlm.use_backend("triton"):
        fastlm.flash_attn_func(q, k, v, dropout_p=P).sum().backward()  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = fastlm.flash_attn_func(q, k, v, dropout_p=P)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_draw_new_masks():
    """Captured in a CUDA graph, the seed's draw is part of the graph: two replays give two
    masks (as SDPA's dropout does under graphs), and torch.cuda.manual_seed before a replay
    reproduces it."""
    q, k, v = _gpu_inputs()
    with fastlm.use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile) outside the capture
            for _ in range(2):
                fastlm.flash_attn_func(q, k, v, dropout_p=P)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fastlm.flash_attn_func(q, k, v, dropout_p=P)
    replays = []
    for seed in (None, None, 9, 9):
        if seed is not None:
            torch.cuda.manual_seed(seed)
        graph.replay()
        replays.append(out.clone())
    torch.cuda.synchronize()
    assert all(torch.isfinite(r).all() for r in replays)
    assert not torch.equal(replays[0], replays[1])
    assert torch.equal(replays[2], replays[3])

