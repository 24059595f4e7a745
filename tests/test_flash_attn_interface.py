"""fastlm's flash-attn functions called the way flash-attn 2.8's users call them (issue 20):
the parameter lists, in order, with their defaults; positional binding; the return types;
ALiBi, rotary inside the cache call, cache_batch_idx, and what is refused by name (the
paged cache, leftpad, split-KV and sinks: tests/test_attention_kvcache.py, _alibi_sinks.py).

FLASH_ATTN_28 is a copy of flash-attn 2.8's signatures (flash_attn/flash_attn_interface.py),
kept here so a departure fails a test. fastlm's own extras must be keyword-only.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import fastlm
from fastlm.ops import attention as attn_ops

from .conftest import DEVICE
from .test_attention import check, naive, qkv

BACKENDS = ["torch", "triton"]
_W = (-1, -1)

FLASH_ATTN_28 = {
    "flash_attn_func": [("q", None), ("k", None), ("v", None), ("dropout_p", 0.0), ("softmax_scale", None),
                        ("causal", False), ("window_size", _W), ("softcap", 0.0), ("alibi_slopes", None),
                        ("deterministic", False), ("return_attn_probs", False)],
    "flash_attn_varlen_func": [("q", None), ("k", None), ("v", None), ("cu_seqlens_q", None), ("cu_seqlens_k", None),
                               ("max_seqlen_q", None), ("max_seqlen_k", None), ("dropout_p", 0.0),
                               ("softmax_scale", None), ("causal", False), ("window_size", _W), ("softcap", 0.0),
                               ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False),
                               ("block_table", None)],
    "flash_attn_with_kvcache": [("q", None), ("k_cache", None), ("v_cache", None), ("k", None), ("v", None),
                                ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
                                ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None),
                                ("softmax_scale", None), ("causal", False), ("window_size", _W), ("softcap", 0.0),
                                ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
                                ("return_softmax_lse", False)],
}
REQUIRED = inspect.Parameter.empty


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_28))
def test_signature_is_flash_attn_28s(name):
    params = list(inspect.signature(getattr(fastlm, name)).parameters.values())
    positional = [p for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    got = [(p.name, None if p.default is REQUIRED else p.default) for p in positional]
    assert got == FLASH_ATTN_28[name]
    assert all(p.kind == p.KEYWORD_ONLY for p in params[len(positional):]), "fastlm's extras: keyword-only"


def _alibi_mask(slopes, B, H, L, S):
    i = torch.arange(L, device=DEVICE)[:, None]
    j = torch.arange(S, device=DEVICE)[None, :]
    return -slopes.reshape(-1, H, 1, 1).double() * (i + S - L - j).abs().double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_batch", [False, True], ids=["(H,)", "(B,H)"])
@pytest.mark.parametrize("causal,L,S", [(False, 7, 11), (True, 7, 11), (True, 13, 9)])
def test_alibi_is_flash_attns_formula(backend, per_batch, causal, L, S):
    """-slope * |i + S - L - j| on the scores (bottom-right aligned), forward and backward,
    with grouped-query heads; the slopes get no gradient."""
    B, H, Hk, D = 2, 4, 2, 16
    slopes = (torch.rand(B, H) if per_batch else torch.rand(H)).to(DEVICE) * 0.5 + 0.05
    bias = _alibi_mask(slopes, B, H, L, S)
    check(backend, lambda q, k, v: fastlm.flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes),
          lambda q, k, v: naive(q, k, v, causal=causal, mask=bias.to(q.dtype)), qkv(B, L, S, H, Hk, D))


@pytest.mark.parametrize("bad", ["float64", "shape", "list"])
def test_alibi_slopes_must_be_flash_attns_shape_and_dtype(bad):
    q, k, v = qkv(2, 4, 4, 4, 4, 16)
    slopes = {"float64": torch.rand(4, dtype=torch.float64), "shape": torch.rand(3), "list": [0.1] * 4}[bad]
    with pytest.raises(ValueError, match="alibi_slopes"):
        fastlm.flash_attn_func(q, k, v, alibi_slopes=slopes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_attn_probs_without_dropout_is_out_lse_none(backend):
    q, k, v = qkv(2, 5, 9, 4, 2, 16)
    with fastlm.use_backend(backend):
        got = fastlm.flash_attn_func(q, k, v, 0.0, None, True, return_attn_probs=True)
    assert isinstance(got, tuple) and len(got) == 3 and got[2] is None
    with fastlm.use_backend(backend):
        out, lse = fastlm.flash_attn_func(q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(got[0], out, rtol=0, atol=0)
    torch.testing.assert_close(got[1], lse, rtol=0, atol=0)
    assert got[1].shape == (2, 4, 5) and got[1].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_attn_probs_with_dropout_encodes_the_mask(backend):
    """S_dmask: the softmax probabilities, negative where dropout dropped: the kept ones,
    scaled by 1 / (1 - p), times v give the output."""
    B, L, S, H, Hk, D, p = 2, 6, 10, 4, 2, 16, 0.3
    q, k, v = qkv(B, L, S, H, Hk, D)
    with fastlm.use_backend(backend):
        out, lse, s_dmask = fastlm.flash_attn_func(q, k, v, p, causal=True, softcap=4.0, return_attn_probs=True)
    assert s_dmask.shape == (B, H, L, S)
    probs = s_dmask.abs()
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, L, device=DEVICE), rtol=1e-5, atol=1e-5)
    kept = torch.where(s_dmask > 0, probs, torch.zeros_like(probs)) / (1 - p)
    vv = v.repeat_interleave(H // Hk, dim=2)
    torch.testing.assert_close(out, torch.einsum("bhls,bshd->blhd", kept, vv), rtol=1e-4, atol=1e-5)
    assert (s_dmask < 0).any() and (s_dmask > 0).any()


def test_dropout_p_of_none_is_refused():
    q, k, v = qkv(1, 2, 2, 1, 1, 16)
    with pytest.raises((TypeError, ValueError), match="dropout_p"):
        fastlm.flash_attn_func(q, k, v, None)


def test_deterministic_is_accepted():
    q, k, v = qkv(1, 3, 5, 2, 2, 16)
    torch.testing.assert_close(fastlm.flash_attn_func(q, k, v, deterministic=True), fastlm.flash_attn_func(q, k, v),
                               rtol=0, atol=0)


def test_varlen_probs_with_dropout_are_refused_by_name():
    q = torch.randn(5, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    for kwargs, name in ((dict(dropout_p=0.1, return_attn_probs=True), "return_attn_probs"),):
        with pytest.raises(NotImplementedError, match=name):
            fastlm.flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, **kwargs)
    out, lse, none = fastlm.flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, return_attn_probs=True)
    assert none is None and lse.shape == (2, 5)


# ----------------------------------------------------------------------------- with_kvcache

def _cache(B=3, S_max=12, Hk=2, D=16, filled=(4, 0, 7)):
    k_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    return k_cache, v_cache, torch.tensor(filled, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_causal_defaults_to_false(backend):
    """flash-attn's default: two new queries both see every key up to the new ones."""
    k_cache, v_cache, lens = _cache()
    q = torch.randn(3, 2, 4, 16, device=DEVICE)
    k_new, v_new = torch.randn(3, 2, 2, 16, device=DEVICE), torch.randn(3, 2, 2, 16, device=DEVICE)
    with fastlm.use_backend(backend):
        out = fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens)
    for b in range(3):
        n = int(lens[b]) + 2
        want = naive(q[b:b + 1].double(), k_cache[b:b + 1, :n].double(), v_cache[b:b + 1, :n].double())
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("interleaved", [True, False])
def test_kvcache_rotary_at_the_cache_positions(backend, causal, interleaved):
    """k rotated at cache_seqlens, cache_seqlens + 1, ...; q too when causal, else every
    query at cache_seqlens (flash-attn's docstring); passed positionally, in flash-attn's order."""
    B, L, H, Hk, D, R = 3, 2, 4, 2, 16, 8
    k_cache, v_cache, lens = _cache(B, Hk=Hk, D=D)
    cos, sin = fastlm.rotary_cos_sin(12, R, device=DEVICE)
    q = torch.randn(B, L, H, D, device=DEVICE)
    k_new, v_new = torch.randn(B, L, Hk, D, device=DEVICE), torch.randn(B, L, Hk, D, device=DEVICE)
    kc, vc = k_cache.clone(), v_cache.clone()
    with fastlm.use_backend(backend):
        out = fastlm.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cos, sin, lens, causal=causal,
                                             rotary_interleaved=interleaved)
    pos = lens.long()[:, None] + torch.arange(L, device=DEVICE)
    k_rot = fastlm.rotary(k_new, cos, sin, pos, interleaved)
    q_rot = fastlm.rotary(q, cos, sin, pos if causal else lens.long()[:, None].expand(B, L), interleaved)
    for b in range(B):
        n = int(lens[b]) + L
        torch.testing.assert_close(kc[b, n - L:n], k_rot[b], rtol=0, atol=0)  # the rotated k is what is cached
        torch.testing.assert_close(vc[b, n - L:n], v_new[b], rtol=0, atol=0)
        want = naive(q_rot[b:b + 1].double(), kc[b:b + 1, :n].double(), vc[b:b + 1, :n].double(), causal=causal)
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_batch_idx_reads_and_writes_those_rows(backend):
    k_cache, v_cache, _ = _cache(B=4)
    idx = torch.tensor([2, 0, 3], device=DEVICE)
    lens = torch.tensor([3, 5, 1], dtype=torch.int32, device=DEVICE)
    q = torch.randn(3, 1, 4, 16, device=DEVICE)
    k_new, v_new = torch.randn(3, 1, 2, 16, device=DEVICE), torch.randn(3, 1, 2, 16, device=DEVICE)
    kc, vc = k_cache.clone(), v_cache.clone()
    with fastlm.use_backend(backend):
        out, lse = fastlm.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens, cache_batch_idx=idx,
                                                  causal=True, return_softmax_lse=True)
    assert torch.equal(kc[1], k_cache[1])  # the row no batch uses is untouched
    for b, row in enumerate(idx.tolist()):
        n = int(lens[b]) + 1
        assert torch.equal(kc[row, n - 1], k_new[b, 0]) and torch.equal(vc[row, n - 1], v_new[b, 0])
        want = naive(q[b:b + 1].double(), kc[row:row + 1, :n].double(), vc[row:row + 1, :n].double(), causal=True)
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-4, atol=1e-5)
    assert lse.shape == (3, 4, 1) and torch.isfinite(lse).all()


def test_kvcache_num_splits_and_rotary_checks():
    k_cache, v_cache, lens = _cache()
    q = torch.randn(3, 1, 4, 16, device=DEVICE)
    a = fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=0)
    b = fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_splits"):
        fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=-1)
    with pytest.raises(ValueError, match="rotary"):
        fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=torch.ones(12, 4, device=DEVICE),
                                       rotary_sin=torch.zeros(12, 4, device=DEVICE), cache_seqlens=lens)


@pytest.mark.parametrize("num_splits", [-1, True, "2"])
def test_kvcache_bad_num_splits_is_refused_on_the_int_seqlens_path_too(num_splits):
    """An int cache_seqlens takes the CPU decode path first: a bad num_splits must not pass
    there when a tensor cache_seqlens refuses it."""
    k_cache, v_cache, _ = _cache()
    q = torch.randn(3, 1, 4, 16, device=DEVICE)
    k_new, v_new = torch.randn(3, 1, 2, 16, device=DEVICE), torch.randn(3, 1, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="num_splits"):
        fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=3, num_splits=num_splits)


def test_flash_attn_func_positional_call_binds_flash_attns_arguments():
    """flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 0.0, None, False, True): the
    eleventh positional is return_attn_probs."""
    q, k, v = qkv(1, 3, 5, 2, 2, 16)
    got = fastlm.flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 0.0, None, False, True)
    assert len(got) == 3 and got[2] is None
    # (the lse takes the kernel path on CPU, the plain call torch's SDPA: equal to rounding)
    torch.testing.assert_close(got[0], fastlm.flash_attn_func(q, k, v, causal=True), rtol=1e-5, atol=1e-6)
    assert attn_ops.flash_attn_func is fastlm.flash_attn_func


# ----------------------------------------------------------------------------- apply_rotary_emb

APPLY_ROTARY_EMB = [("x", None), ("cos", None), ("sin", None), ("interleaved", False), ("inplace", False),
                    ("seqlen_offsets", 0), ("cu_seqlens", None), ("max_seqlen", None)]


def test_apply_rotary_emb_signature_is_flash_attns():
    params = list(inspect.signature(fastlm.apply_rotary_emb).parameters.values())
    assert [(p.name, None if p.default is REQUIRED else p.default) for p in params] == APPLY_ROTARY_EMB


def _rotated(x, cos, sin, positions, interleaved):
    """The formula, float64: x (..., tokens, heads, D) and positions (..., tokens)."""
    r = 2 * cos.shape[1]
    c, s = cos.double()[positions][..., None, :], sin.double()[positions][..., None, :]
    x = x.double()
    if interleaved:
        a, b = x[..., 0:r:2], x[..., 1:r:2]
        out = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = x[..., :r // 2], x[..., r // 2:r]
        out = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return torch.cat((out, x[..., r:]), dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offsets", ["none", "int", "tensor"])
def test_apply_rotary_emb_batched(backend, interleaved, offsets):
    B, S, H, D, R = 3, 5, 2, 16, 8
    cos, sin = fastlm.rotary_cos_sin(20, R, device=DEVICE)
    x = torch.randn(B, S, H, D, device=DEVICE, requires_grad=True)
    off = {"none": 0, "int": 4, "tensor": torch.tensor([0, 7, 2], device=DEVICE)}[offsets]
    with fastlm.use_backend(backend):
        out = fastlm.apply_rotary_emb(x, cos, sin, interleaved, False, off)
    pos = torch.arange(S, device=DEVICE) + (off[:, None] if isinstance(off, torch.Tensor) else off)
    pos = pos.expand(B, S)
    x64 = x.detach().double().requires_grad_(True)
    want = _rotated(x64, cos, sin, pos, interleaved)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    (got_grad,) = torch.autograd.grad(out, x, g)
    (want_grad,) = torch.autograd.grad(want, x64, g.double())
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_rotary_emb_packed_with_offsets_and_inplace(backend):
    lengths, H, D, R = [3, 0, 5, 1], 2, 16, 16
    cu = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32, device=DEVICE)
    off = torch.tensor([2, 0, 1, 6], device=DEVICE)
    cos, sin = fastlm.rotary_cos_sin(16, R, device=DEVICE)
    x = torch.randn(sum(lengths), H, D, device=DEVICE)
    pos = torch.cat([torch.arange(n, device=DEVICE) + o for n, o in zip(lengths, off.tolist())])
    want = _rotated(x, cos, sin, pos, False)
    y = x.clone()
    with fastlm.use_backend(backend):
        got = fastlm.apply_rotary_emb(y, cos, sin, inplace=True, seqlen_offsets=off, cu_seqlens=cu, max_seqlen=5)
    assert got is y
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)


def test_apply_rotary_emb_bad_arguments_name_themselves():
    cos, sin = fastlm.rotary_cos_sin(8, 8)
    x = torch.randn(2, 3, 1, 8)
    for kwargs, name in ((dict(seqlen_offsets=torch.zeros(3, dtype=torch.long)), "seqlen_offsets"),
                         (dict(seqlen_offsets=0.5), "seqlen_offsets"),
                         (dict(cu_seqlens=torch.tensor([0, 3])), "x must be")):
        with pytest.raises(ValueError, match=name):
            fastlm.apply_rotary_emb(x, cos, sin, **kwargs)


# ----------------------------------------------------------------------------- torch 2.13's cross_entropy

def test_cross_entropy_takes_torchs_positional_order():
    import torch.nn.functional as F
    want = [p.name for p in inspect.signature(F.cross_entropy).parameters.values()]
    params = list(inspect.signature(fastlm.cross_entropy).parameters.values())
    assert [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD] == want
    assert all(p.kind == p.KEYWORD_ONLY for p in params[len(want):])
    x, t = torch.randn(6, 5, device=DEVICE), torch.randint(0, 5, (6,), device=DEVICE)
    t[1] = 2
    # torch's positional call: weight, size_average, ignore_index, reduce, reduction, label_smoothing
    args = (None, None, 2, None, "sum", 0.1)
    torch.testing.assert_close(fastlm.cross_entropy(x, t, *args), F.cross_entropy(x, t, *args), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size_average,reduce", [(False, None), (None, False), (True, True), (False, True)])
def test_cross_entropy_legacy_reduction_arguments(size_average, reduce):
    import torch.nn.functional as F
    x, t = torch.randn(6, 5, device=DEVICE), torch.randint(0, 5, (6,), device=DEVICE)
    with pytest.warns(UserWarning):
        got = fastlm.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning):
        want = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_probability_targets_with_ignore_index_raise_torchs_runtime_error():
    import torch.nn.functional as F
    x, p = torch.randn(3, 5, device=DEVICE), torch.softmax(torch.randn(3, 5, device=DEVICE), -1)
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, p, ignore_index=3)
    with pytest.raises(RuntimeError, match="ignore_index"):
        fastlm.cross_entropy(x, p, ignore_index=3)
    with pytest.raises(ValueError, match="ignore_index"):  # and still a ValueError, as fastlm's argument errors
        fastlm.cross_entropy(x, p, ignore_index=3)


# ----------------------------------------------------------------------------- HF's apply_rotary_pos_emb

def _hf_rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _hf_apply(q, k, cos, sin, unsqueeze_dim):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _hf_rotate_half(q) * sin, k * cos + _hf_rotate_half(k) * sin


def _hf_cos_sin(B, S, D, device=DEVICE):
    """As HF's rotary embedding makes them: cat((freqs, freqs)) at per-batch position ids."""
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device).float() / D))
    pos = torch.randint(0, 50, (B, S), device=device).float()
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def test_apply_rotary_pos_emb_signature_is_hfs():
    params = list(inspect.signature(fastlm.apply_rotary_pos_emb).parameters.values())
    assert [(p.name, None if p.default is REQUIRED else p.default) for p in params] == \
        [("q", None), ("k", None), ("cos", None), ("sin", None), ("position_ids", None), ("unsqueeze_dim", 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("cos_batch", [3, 1], ids=["per-batch", "shared"])
def test_apply_rotary_pos_emb_is_hfs_formula(backend, unsqueeze_dim, cos_batch):
    B, S, H, Hk, D = 3, 5, 4, 2, 16
    cos, sin = _hf_cos_sin(cos_batch, S, D)
    shape = (lambda h: (B, h, S, D)) if unsqueeze_dim == 1 else (lambda h: (B, S, h, D))
    q = torch.randn(*shape(H), device=DEVICE, requires_grad=True)
    k = torch.randn(*shape(Hk), device=DEVICE, requires_grad=True)
    with fastlm.use_backend(backend):
        qe, ke = fastlm.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    q64, k64 = (t.detach().double().requires_grad_(True) for t in (q, k))
    wq, wk = _hf_apply(q64, k64, cos.double(), sin.double(), unsqueeze_dim)
    assert qe.shape == q.shape and ke.shape == k.shape
    torch.testing.assert_close(qe.double(), wq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ke.double(), wk, rtol=1e-5, atol=1e-6)
    gq, gk = torch.randn_like(qe), torch.randn_like(ke)
    got = torch.autograd.grad((qe, ke), (q, k), (gq, gk))
    want = torch.autograd.grad((wq, wk), (q64, k64), (gq.double(), gk.double()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_apply_rotary_pos_emb_refuses_what_it_cannot_mean():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = _hf_cos_sin(2, 5, 8, device="cpu")
    with pytest.raises(ValueError, match="halves"):
        fastlm.apply_rotary_pos_emb(q, k, torch.rand(2, 5, 8), sin)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        fastlm.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="does not match"):
        fastlm.apply_rotary_pos_emb(q[:, :, :4], k[:, :, :4], cos, sin)
