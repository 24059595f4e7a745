"""torch.autocast reaches fastlm's matmul-like ops as it reaches torch's own: inputs cast to
the autocast dtype on entry, differentiably (float32 parameters get float32 gradients), and
nothing changes when autocast is off. The norms keep their input's dtype.

On CPU: the reference backend in bfloat16 and float16 autocast, and the Triton kernels (under
the interpreter) in float16 autocast only (the interpreter's bfloat16 dot is wrong, see
DESIGN.md)."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.ops._autocast import autocast_inputs

from .conftest import DEVICE

CASES = [("torch", torch.bfloat16), ("torch", torch.float16), ("triton", torch.float16)]


def _leaves(*shapes, scale=1.0):
    return [(torch.randn(*s, device=DEVICE) * scale).requires_grad_(True) for s in shapes]


def _run(fn, leaves, backend, dtype, autocast):
    """fn(*leaves) under the backend, with autocast or with the leaves cast by hand; returns
    the output and the gradients of the float32 leaves."""
    with fastlm.use_backend(backend):
        if autocast:
            with torch.autocast(DEVICE.type, dtype=dtype):
                out = fn(*leaves)
        else:
            out = fn(*(t.to(dtype) for t in leaves))
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    return out, grads


def _same_as_casting_by_hand(fn, leaves, backend, dtype):
    out_a, g_a = _run(fn, leaves, backend, dtype, autocast=True)
    out_b, g_b = _run(fn, leaves, backend, dtype, autocast=False)
    assert out_a.dtype == dtype, f"under autocast the output is {out_a.dtype}, expected {dtype}"
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for leaf, ga, gb in zip(leaves, g_a, g_b):
        assert ga.dtype == torch.float32, "a float32 leaf must get a float32 gradient"
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


@pytest.mark.parametrize("backend,dtype", CASES)
def test_linear(backend, dtype):
    leaves = _leaves((3, 17, 24), (40, 24), (40,), scale=0.3)
    _same_as_casting_by_hand(lambda x, w, b: fastlm.linear(x, w, b, activation="gelu"), leaves, backend, dtype)


def test_linear_mixes_a_low_precision_activation_with_float32_weights():
    """The case that fails without autocast support: a bf16 activation from the previous layer
    and float32 master weights."""
    x = torch.randn(5, 16, device=DEVICE).bfloat16()
    w = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    with pytest.raises(TypeError, match="weight"):
        fastlm.linear(x, w)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = fastlm.linear(x, w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_feed_forward(backend, dtype, activation):
    rows = 2 * 20 if activation == "swiglu" else 20
    leaves = _leaves((2, 9, 16), (rows, 16), (rows,), (16, 20), (16,), scale=0.3)
    _same_as_casting_by_hand(lambda *t: fastlm.feed_forward(*t, activation=activation), leaves, backend, dtype)


@pytest.mark.parametrize("backend,dtype", CASES)
def test_attention(backend, dtype):
    q, k, v = _leaves((2, 13, 4, 32), (2, 11, 2, 32), (2, 11, 2, 32))
    _same_as_casting_by_hand(lambda q, k, v: fastlm.flash_attn_func(q, k, v, causal=True), [q, k, v], backend, dtype)
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
    _same_as_casting_by_hand(lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                  enable_gqa=True),
                             [qt, kt, vt], backend, dtype)
    cu = torch.tensor([0, 5, 13], device=DEVICE, dtype=torch.int32)
    qp, kp, vp = (t.detach()[0, :13].contiguous().requires_grad_(True) for t in (q, q, q))
    _same_as_casting_by_hand(lambda q, k, v: fastlm.flash_attn_varlen_func(q, k, v, cu, cu, 8, 8, causal=True),
                             [qp, kp, vp], backend, dtype)


@pytest.mark.parametrize("backend,dtype", CASES)
def test_linear_cross_entropy(backend, dtype):
    x, w = _leaves((21, 16), (37, 16), scale=0.5)
    target = torch.randint(0, 37, (21,), device=DEVICE)
    with fastlm.use_backend(backend):
        with torch.autocast(DEVICE.type, dtype=dtype):
            loss_a = fastlm.linear_cross_entropy(x, w, target)
        loss_b = fastlm.linear_cross_entropy(x.to(dtype), w.to(dtype), target)
    ga = torch.autograd.grad(loss_a, [x, w])
    gb = torch.autograd.grad(loss_b, [x, w])
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for a, b in zip(ga, gb):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b.float(), rtol=0, atol=0)


def test_norms_keep_their_input_dtype():
    x = torch.randn(4, 32, device=DEVICE)
    w = torch.randn(32, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert fastlm.rms_norm(x, 32, w).dtype == torch.float32
        assert fastlm.layer_norm(x.bfloat16(), 32, w).dtype == torch.bfloat16


def test_nothing_changes_without_autocast_and_float64_is_left_alone():
    a, b = torch.randn(3, device=DEVICE), torch.randn(3, device=DEVICE, dtype=torch.float64)
    out = autocast_inputs(a, None, 2.0, b)
    assert out[0] is a and out[1] is None and out[2] == 2.0 and out[3] is b
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = autocast_inputs(a, None, b)
    assert out[0].dtype == torch.bfloat16 and out[2] is b


def test_a_gpt_trains_under_autocast():
    from fastlm.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, max_seq_len=32, n_layer=2, n_head=2, d_model=32)).to(DEVICE)
    ids = torch.randint(0, 64, (2, 16), device=DEVICE)
    with fastlm.use_backend("torch"):
        loss32 = model(ids, labels=ids)["loss"]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss16 = model(ids, labels=ids)["loss"]
    loss16.backward()
    assert torch.isfinite(loss16) and abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())


@pytest.mark.parametrize("backend,dtype", CASES)
def test_fused_residual_add_promotes_to_the_float32_stream(backend, dtype):
    x = torch.randn(6, 32, device=DEVICE).to(dtype).requires_grad_(True)  # a sublayer's low-precision output
    res = torch.randn(6, 32, device=DEVICE, requires_grad=True)           # the float32 residual stream
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    with pytest.raises(TypeError, match="residual"):
        fastlm.add_rms_norm(x, res, 32, w)
    with fastlm.use_backend(backend):
        with torch.autocast(DEVICE.type, dtype=dtype):
            y, h = fastlm.add_rms_norm(x, res, 32, w, return_residual=True)
        y_ref, h_ref = fastlm.add_rms_norm(x.float(), res, 32, w, return_residual=True)
    assert y.dtype == h.dtype == torch.float32
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    gx, gres, gw = torch.autograd.grad((y * h).sum(), [x, res, w])
    assert gx.dtype == dtype and gres.dtype == gw.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kvcache_casts_to_the_cache_dtype(backend):
    B, S_max, H, D = 2, 16, 2, 32
    k_cache = torch.randn(B, S_max, H, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, H, D, device=DEVICE)
    q, k, v = (torch.randn(B, 1, H, D, device=DEVICE).to(torch.float16) for _ in range(3))
    lengths = torch.tensor([3, 9], device=DEVICE, dtype=torch.int32)
    kc, vc = k_cache.clone(), v_cache.clone()
    with fastlm.use_backend(backend):
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            out = fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths)
        expected = fastlm.flash_attn_with_kvcache(q.float(), kc, vc, k.float(), v.float(), cache_seqlens=lengths)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)


def test_generation_under_autocast_keeps_its_cache_in_the_autocast_dtype(monkeypatch):
    from fastlm.models import EncoderDecoder, EncoderDecoderConfig, GPT, GPTConfig
    from fastlm.models import encdec, gpt as gpt_module

    seen = []
    real = gpt_module.flash_attn_with_kvcache

    def spy(q, k_cache, *args, **kwargs):
        seen.append(k_cache.dtype)
        return real(q, k_cache, *args, **kwargs)
    monkeypatch.setattr(gpt_module, "flash_attn_with_kvcache", spy)
    monkeypatch.setattr(encdec, "flash_attn_with_kvcache", spy, raising=False)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50, max_seq_len=24, n_layer=2, n_head=2, d_model=32)).to(DEVICE).eval()
    prompt = torch.randint(0, 50, (2, 5), device=DEVICE)
    with fastlm.use_backend("torch"), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = gpt.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    ed = EncoderDecoder(EncoderDecoderConfig(vocab_size=50, max_seq_len=24, n_encoder_layer=1, n_decoder_layer=1,
                                             n_head=2, d_model=32, d_hidden=64, dropout=0.0))
    with fastlm.use_backend("torch"), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = ed.to(DEVICE).eval().generate(prompt, 4)
    assert out.shape[0] == 2 and out.dtype == torch.long
    assert seen and set(seen) == {torch.bfloat16}
