"""Attention inputs that could make a kernel read or write outside its tensors.

Packed sequences (cu_seqlens) and KV-cache lengths (cache_seqlens) are index data. On CPU
tensors the op checks them (no device sync there) and raises a ValueError naming the
argument; on CUDA tensors a check would cost a host sync on every call, so the kernels clamp
instead: a start to [0, rows], an end to [start, rows], a length to max_seqlen, a used cache
length to [0, cache length], and the write of new keys into the cache to the cache's rows.
The clamps are tested here through the kernels themselves (kernels.attention_fwd / _bwd,
which the checks do not guard), with NaN sentinels in the memory just outside q, k, v and
the caches: an out-of-bounds read would put NaN into the output.
"""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.kernels import attention as kernels
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE, ON_GPU

BACKENDS = ["torch", "triton"]
NAN = float("nan")


def _cu(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _fenced(rows, *inner, pad=5, before=True):
    """A random (rows, *inner) tensor viewed inside a larger storage whose `pad` rows before
    (if `before`) and after it hold NaN. Returns the view."""
    lead = pad if before else 0
    store = torch.full((lead + rows + pad,) + inner, NAN, device=DEVICE)
    store[lead:lead + rows] = torch.randn((rows,) + inner, device=DEVICE)
    return store[lead:lead + rows]


def _naive(q, k, v, scale, causal):
    """One sequence (L, H, D) x (S, Hk, D) in float64, bottom-right causal; no key: 0."""
    q, k, v = q.double(), k.double(), v.double()
    L, H, S, Hk = q.shape[0], q.shape[1], k.shape[0], k.shape[1]
    kk, vv = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
    s = torch.einsum("lhd,shd->hls", q, kk) * scale
    if causal:
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        s = s.masked_fill(j > i + S - L, float("-inf"))
    seen = torch.isfinite(s).any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~seen, 0.0), dim=-1) * seen
    return torch.einsum("hls,shd->lhd", p, vv)


# ----------------------------------------------------------------------------- cu_seqlens: CPU checks

def _varlen_call(cu_q, cu_k=None, max_q=8, max_k=8, total=8):
    q = torch.randn(total, 2, 16, device=DEVICE)
    k = torch.randn(total, 2, 16, device=DEVICE)
    v = torch.randn(total, 2, 16, device=DEVICE)
    cu_k = cu_q if cu_k is None else cu_k
    return lambda: fastlm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)


BAD_CU = [
    # (id, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, the argument named, words in the message)
    ("past the end (the issue's crash)", [0, 4, 20], [0, 4, 20], 16, 16, "cu_seqlens_q", "end"),
    ("short of the end", [0, 4, 6], [0, 4, 8], 8, 8, "cu_seqlens_q", "end"),
    ("k past the end", [0, 4, 8], [0, 4, 9], 8, 8, "cu_seqlens_k", "end"),
    ("not starting at 0", [2, 4, 8], [0, 4, 8], 8, 8, "cu_seqlens_q", "start"),
    ("negative start", [-3, 4, 8], [0, 4, 8], 8, 8, "cu_seqlens_q", "start"),
    ("decreasing", [0, 6, 3, 8], [0, 3, 6, 8], 8, 8, "cu_seqlens_q", "non-decreasing"),
    ("k decreasing", [0, 3, 6, 8], [0, 6, 3, 8], 8, 8, "cu_seqlens_k", "non-decreasing"),
    ("longer than max_seqlen_q", [0, 4, 8], [0, 4, 8], 3, 8, "max_seqlen_q", "cu_seqlens_q"),
    ("longer than max_seqlen_k", [0, 4, 8], [0, 2, 8], 8, 5, "max_seqlen_k", "cu_seqlens_k"),
]


@pytest.mark.skipif(ON_GPU, reason="the checks run on CPU tensors (on CUDA the kernels clamp)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_CU, ids=lambda c: c[0])
def test_varlen_checks_cu_seqlens_on_cpu(backend, case):
    _, cu_q, cu_k, max_q, max_k, name, word = case
    call = _varlen_call(_cu(cu_q), _cu(cu_k), max_q, max_k)
    with fastlm.use_backend(backend), pytest.raises(ValueError, match=name) as info:
        call()
    assert word in str(info.value)


@pytest.mark.skipif(ON_GPU, reason="the checks run on CPU tensors (on CUDA the kernels clamp)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_int64_offsets_past_int32_are_not_truncated(backend):
    # 2^32 + 8 truncates to 8 in int32: a valid-looking [0, 4, 8] that is not what was passed.
    call = _varlen_call(_cu([0, 4, 2 ** 32 + 8], torch.int64), _cu([0, 4, 8], torch.int64))
    with fastlm.use_backend(backend), pytest.raises(ValueError, match="cu_seqlens_q.*int32"):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_accepts_int64_and_empty_sequences(backend):
    """The checks let every valid layout through: int64 offsets, empty sequences, a batch of
    none, a max_seqlen above the longest length."""
    for cu, max_len in (([0, 0, 5, 5, 8], 5), ([0, 8], 11), ([0], 0)):
        total = cu[-1]
        q, k, v = (torch.randn(total, 2, 16, device=DEVICE) for _ in range(3))
        with fastlm.use_backend(backend):
            out = fastlm.flash_attn_varlen_func(q, k, v, _cu(cu, torch.int64), _cu(cu), max_len, max_len)
        expected = torch.cat([_naive(q[a:b], k[a:b], v[a:b], 16 ** -0.5, False) for a, b in zip(cu, cu[1:])]
                             + [torch.zeros(0, 2, 16, dtype=torch.float64, device=DEVICE)])
        assert_close(out, expected, None, "out", atol=summation_floor(expected, out.dtype, 8))


# ----------------------------------------------------------------------------- cu_seqlens: kernel clamps

@pytest.mark.parametrize("bad", [
    [0, 4, 12],    # the end past the rows: reads the NaN fence after q and k
    [-3, 4, 8],    # a negative start: reads the fence before them
    [0, 4, 2 ** 31 - 1],  # what a saturated int64 offset becomes
], ids=["end past the rows", "negative start", "int32 max"])
def test_kernels_clamp_cu_seqlens_to_the_rows(bad):
    """Forward and backward with offsets outside [0, rows] equal the call with the offsets
    clamped ([0, 4, 8]): nothing outside q, k, v, out or dout is read."""
    total, H, Hk, D = 8, 4, 2, 16
    q, k, v = _fenced(total, H, D), _fenced(total, Hk, D), _fenced(total, Hk, D)
    dout = _fenced(total, H, D)
    good = _cu([0, 4, 8])
    scale = D ** -0.5

    def fwd(cu):
        return kernels.attention_fwd(q, k, v, scale, True, -1, 0, 0.0, None, 0.0, None, cu_seqlens_q=cu,
                                     cu_seqlens_k=cu, max_seqlen_q=8, max_seqlen_k=8)

    out, lse = fwd(good)
    expected = torch.cat([_naive(q[a:b], k[a:b], v[a:b], scale, True) for a, b in ((0, 4), (4, 8))])
    assert_close(out, expected, None, "out", atol=summation_floor(expected, out.dtype, 8))
    out_bad, lse_bad = fwd(_cu(bad))
    assert torch.equal(out_bad, out) and torch.equal(lse_bad, lse)

    def bwd(cu):
        return kernels.attention_bwd(dout, q, k, v, out, lse, scale, True, -1, 0, 0.0, None, 0.0, None,
                                     cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=8, max_seqlen_k=8)

    grads, grads_bad = bwd(good), bwd(_cu(bad))
    for name, g, gb in zip(("dq", "dk", "dv"), grads, grads_bad):
        assert torch.isfinite(g).all(), name
        assert torch.equal(gb, g), name


def test_kernels_cut_sequences_to_max_seqlen():
    """A sequence longer than max_seqlen_q / _k is cut to it (the rows past it are not
    written), whatever the tile size: the kernels never go past the lengths they were given."""
    total, H, D = 8, 2, 16
    q, k, v = _fenced(total, H, D), _fenced(total, H, D), _fenced(total, H, D)
    cu = _cu([0, 4, 8])
    scale = D ** -0.5
    out, lse = kernels.attention_fwd(q, k, v, scale, True, -1, -1, 0.0, None, 0.0, None, cu_seqlens_q=cu,
                                     cu_seqlens_k=cu, max_seqlen_q=3, max_seqlen_k=3)
    for a in (0, 4):
        expected = _naive(q[a:a + 3], k[a:a + 3], v[a:a + 3], scale, False)
        assert_close(out[a:a + 3], expected, None, "out", atol=summation_floor(expected, out.dtype, 3))
        assert torch.isfinite(lse[:, a:a + 3]).all()


# ----------------------------------------------------------------------------- the KV cache

def _cache(B, S, Hk, D, pad=5):
    """A (B, S, Hk, D) cache viewed in a (B, S + pad, Hk, D) storage: the pad rows after
    every batch's cache (including the last) hold NaN."""
    store = torch.full((B, S + pad, Hk, D), NAN, device=DEVICE)
    store[:, :S] = torch.randn(B, S, Hk, D, device=DEVICE)
    return store[:, :S]


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_clamps_used_cache_lengths_to_the_cache(causal):
    """seqused_k past the cache (the issue: 3.5e34 in the output) or negative attends to
    the clamped length [0, S]; the NaN rows just past each cache are never read."""
    B, L, H, Hk, S, D = 4, 2, 4, 2, 21, 16
    q = torch.randn(B, L, H, D, device=DEVICE)
    k_cache, v_cache = _cache(B, S, Hk, D), _cache(B, S, Hk, D)
    used = _cu([S + 3, -4, 7, S])
    scale = D ** -0.5
    out, lse = kernels.attention_fwd(q, k_cache, v_cache, scale, True, -1, 0 if causal else -1, 0.0, None, 0.0,
                                     None, seqused_k=used)
    for b, n in enumerate(used.clamp(0, S).tolist()):
        expected = _naive(q[b], k_cache[b, :n], v_cache[b, :n], scale, causal)
        assert_close(out[b], expected, None, f"out[{b}]", atol=summation_floor(expected, out.dtype, S))
    # Batch 1 (length -4 -> 0) sees no key: output 0, lse +inf; the others a finite lse.
    assert torch.isinf(lse[1]).all() and torch.isfinite(lse[[0, 2, 3]]).all()


def _kv_args(B=3, L=2, H=4, Hk=2, S=10, D=16, new=1):
    q = torch.randn(B, L, H, D, device=DEVICE)
    k_cache, v_cache = torch.randn(B, S, Hk, D, device=DEVICE), torch.randn(B, S, Hk, D, device=DEVICE)
    k_new = torch.randn(B, new, Hk, D, device=DEVICE) if new else None
    v_new = torch.randn(B, new, Hk, D, device=DEVICE) if new else None
    return q, k_cache, v_cache, k_new, v_new


@pytest.mark.skipif(ON_GPU, reason="the checks run on CPU tensors (on CUDA the kernels clamp)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    ("negative tensor", lambda B: _cu([3, -1, 0]), 1, "cache_seqlens.*>= 0"),
    ("negative int", lambda B: -2, 1, "cache_seqlens.*>= 0"),
    ("negative without new keys", lambda B: _cu([3, -1, 0]), 0, "cache_seqlens.*>= 0"),
    ("past the cache with new keys", lambda B: _cu([3, 10, 0]), 1, "cache_seqlens.*cache length 10"),
    ("int past the cache with new keys", lambda B: 10, 1, "cache_seqlens.*cache length 10"),
    ("past the cache without new keys", lambda B: _cu([3, 11, 0]), 0, "cache_seqlens.*cache length 10"),
    ("int past the cache without new keys", lambda B: 11, 0, "cache_seqlens.*cache length 10"),
    ("int64 past int32", lambda B: _cu([3, 2 ** 32 + 1, 0], torch.int64), 0, "cache_seqlens.*cache length 10"),
    ("int past int32", lambda B: 2 ** 40, 0, "cache_seqlens.*cache length 10"),
], ids=lambda c: c[0] if isinstance(c, tuple) else c)
def test_kvcache_checks_cache_seqlens_on_cpu(backend, case):
    _, seqlens, new, pattern = case
    q, k_cache, v_cache, k_new, v_new = _kv_args(new=new)
    before = k_cache.clone(), v_cache.clone()
    with fastlm.use_backend(backend), pytest.raises(ValueError, match=pattern):
        fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens(3))
    # Nothing was written into the caches before the error.
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_accepts_the_edges(backend):
    """A cache filled exactly (lengths + new = S), an empty cache, int64 lengths."""
    S = 10
    q, k_cache, v_cache, k_new, v_new = _kv_args(S=S, new=2)
    seqlens = _cu([S - 2, 0, 5], torch.int64)
    with fastlm.use_backend(backend):
        out = fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True)
    for b, n in enumerate((S, 2, 7)):
        assert torch.equal(k_cache[b, n - 2:n], k_new[b]) and torch.equal(v_cache[b, n - 2:n], v_new[b])
        expected = _naive(q[b], k_cache[b, :n], v_cache[b, :n], 16 ** -0.5, True)
        assert_close(out[b], expected, None, f"out[{b}]", atol=summation_floor(expected, out.dtype, n))


# ----------------------------------------------------------------------------- head dim 0

def _zero_head_dim_cases():
    q, k, v = (torch.randn(2, 3, 4, 0, device=DEVICE) for _ in range(3))
    return [
        ("flash_attn_func", lambda: fastlm.flash_attn_func(q, k, v), "head dim"),
        ("flash_attn_func with scale", lambda: fastlm.flash_attn_func(q, k, v, softmax_scale=1.0), "head dim"),
        ("flash_attn_varlen_func", lambda: fastlm.flash_attn_varlen_func(
            q[0], k[0], v[0], _cu([0, 3]), _cu([0, 3]), 3, 3), "head dim"),
        ("flash_attn_with_kvcache", lambda: fastlm.flash_attn_with_kvcache(q, k, v, cache_seqlens=2), "head dim"),
        ("scaled_dot_product_attention", lambda: fastlm.scaled_dot_product_attention(q, k, v), "query.*E"),
        ("scaled_dot_product_attention with scale",
         lambda: fastlm.scaled_dot_product_attention(q, k, v, scale=0.5), "query.*E"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _zero_head_dim_cases(), ids=lambda c: c[0])
def test_head_dim_zero_is_a_clear_error(backend, case):
    _, call, pattern = case
    with fastlm.use_backend(backend), pytest.raises(ValueError, match=pattern):
        call()


def test_multihead_attention_rejects_zero_width():
    with pytest.raises(ValueError, match="embed_dim"):
        fastlm.nn.MultiheadAttention(0, 1)


# ----------------------------------------------------------------------------- on a GPU: clamped, no sync

@pytest.mark.gpu
def test_bad_index_data_on_cuda_is_clamped_without_a_host_sync():
    """On CUDA tensors nothing is checked on the host (a check would sync): bad offsets and
    cache lengths run, clamped, and read nothing outside the tensors (NaN fences)."""
    total, H, D = 8, 2, 16
    q, k, v = _fenced(total, H, D), _fenced(total, H, D), _fenced(total, H, D)
    B, S = 3, 10
    kq = torch.randn(B, 1, H, D, device=DEVICE)
    k_cache, v_cache = _cache(B, S, H, D), _cache(B, S, H, D)
    k_new, v_new = torch.randn(B, 2, H, D, device=DEVICE), torch.randn(B, 2, H, D, device=DEVICE)
    cu_q, cu_k, cu_ok = _cu([-3, 4, 2 ** 31 - 1]), _cu([0, 6, 3]), _cu([0, 4, 8])
    cu64 = _cu([0, 4, 2 ** 40], torch.int64)
    lens = _cu([-5, 7, S + 7])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync from here on raises
    try:
        out = fastlm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 8, 8)
        out64 = fastlm.flash_attn_varlen_func(q, k, v, cu64, cu_ok, 8, 8)
        kv = fastlm.flash_attn_with_kvcache(kq, k_cache, v_cache, k_new, v_new, cache_seqlens=lens)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out[:8]).all() and torch.isfinite(out64).all() and torch.isfinite(kv).all()
    # The new keys went to rows clamped into each batch's own cache (two to one row: either).
    assert torch.isfinite(k_cache).all()
    assert any(torch.equal(k_cache[0, 0], k_new[0, i]) for i in (0, 1))
    assert any(torch.equal(k_cache[2, S - 1], k_new[2, i]) for i in (0, 1))
    assert torch.equal(k_cache[1, 7:9], k_new[1])
    # An int64 length past int32 saturates (2**32 + 3 must not wrap to 3): clamped to the end.
    k_cache, v_cache = _cache(B, S, H, D), _cache(B, S, H, D)
    kept = k_cache[:, :S - 2].clone()
    fastlm.flash_attn_with_kvcache(kq, k_cache, v_cache, k_new, v_new,
                                   cache_seqlens=_cu([2 ** 32 + 3] * B, torch.int64))
    assert torch.equal(k_cache[:, :S - 2], kept)


def test_transposed_mask_whose_key_offsets_pass_int32_is_copied_first():
    """The kernels form key offsets (key * stride) in int32: a mask whose key stride puts its
    last key 2^31 elements or more past its first is made contiguous first (meta tensors)."""
    from fastlm.kernels import attention as K
    prob = type("P", (), dict(B=1, H=1, L=2 ** 16, S=2 ** 15 + 1))()  # the sizes _mask_args reads
    wide = torch.empty_strided((1, 1, 2 ** 16, 2 ** 15 + 1), (1, 1, 1, 2 ** 16), device="meta")
    _, kind, strides = K._mask_args(wide, prob)
    assert kind == 2 and strides[3] == 1
    narrow = torch.empty_strided((1, 1, 16, 2 ** 15), (1, 1, 1, 16), device="meta")
    prob.L, prob.S = 16, 2 ** 15
    assert K._mask_args(narrow, prob)[2][3] == 16  # a view still
