"""flash_attn_with_kvcache's inference features (issue 20): the paged cache (block_table),
cache_leftpad, split-KV decoding (num_splits), and the paged varlen call, on both backends,
against float64 oracles built here by gathering each batch's keys by hand.

Under the interpreter the kernels' key blocks are 16 wide: caches of 16-row pages and lengths
around multiples of 16 are the edges.
"""

from __future__ import annotations

import pytest
import torch

import fastlm

from .conftest import DEVICE
from .test_attention_alibi_sinks import oracle

BACKENDS = ["torch", "triton"]


def _paged(k_cache, v_cache, page):
    """The dense (B, S_max, Hk, D) caches scattered into shuffled pages: (k pages, v pages,
    block_table (B, S_max / page) int32)."""
    B, S_max, Hk, D = k_cache.shape
    per = S_max // page
    order = torch.randperm(B * per, device=DEVICE)
    table = order.reshape(B, per).to(torch.int32)
    kp = torch.empty(B * per, page, Hk, D, device=DEVICE)
    vp = torch.empty(B * per, page, Hk, D, device=DEVICE)
    kp[order] = k_cache.reshape(B * per, page, Hk, D)
    vp[order] = v_cache.reshape(B * per, page, Hk, D)
    return kp, vp, table


def _unpage(kp, table):
    B, per = table.shape
    return kp[table.long()].reshape(B, per * kp.shape[1], *kp.shape[2:])


def _expected(q, k_cache, v_cache, k_new, v_new, ends, pads, **kw):
    """Per batch: the keys [pad, end) of the cache then the new ones, attended bottom-right."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        kk = torch.cat([k_cache[b, pads[b]:ends[b]], k_new[b]])[None].double()
        vv = torch.cat([v_cache[b, pads[b]:ends[b]], v_new[b]])[None].double()
        slopes = kw.get("slopes")
        o, l_ = oracle(q[b:b + 1].double(), kk, vv, kw.get("sinks"), None if slopes is None else slopes[b].double(),
                       causal=kw.get("causal", False), window=kw.get("window", (-1, -1)), softcap=kw.get("softcap", 0.0))
        outs.append(o)
        lses.append(l_)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_cache_equals_the_dense_one(backend, page, num_splits):
    """The same keys in shuffled pages: the same output and lse as the dense cache, and the new
    keys written to the right page slots (one batch writes across a page boundary)."""
    B, S_max, H, Hk, D, n = 3, 64, 4, 2, 16, 3
    k_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    kp, vp, table = _paged(k_cache, v_cache, page)
    q = torch.randn(B, n, H, D, device=DEVICE)
    k_new, v_new = torch.randn(B, n, Hk, D, device=DEVICE), torch.randn(B, n, Hk, D, device=DEVICE)
    lens = torch.tensor([0, 15, 47], dtype=torch.int32, device=DEVICE)  # 15 + 3 crosses a 16-row page
    with fastlm.use_backend(backend):
        out_d, lse_d = fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                                      causal=True, return_softmax_lse=True, num_splits=num_splits)
        out_p, lse_p = fastlm.flash_attn_with_kvcache(q, kp, vp, k_new, v_new, cache_seqlens=lens, block_table=table,
                                                      causal=True, return_softmax_lse=True, num_splits=num_splits)
    torch.testing.assert_close(out_p, out_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_p, lse_d, rtol=1e-5, atol=1e-6)
    assert torch.equal(_unpage(kp, table), k_cache) and torch.equal(_unpage(vp, table), v_cache)
    want, _ = _expected(q, k_cache, v_cache, k_new[:, :0], v_new[:, :0], (lens + n).tolist(), [0] * B, causal=True)
    torch.testing.assert_close(out_p.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_pages_of_256_rows(backend):
    """flash-attn's CUDA page size (256): a decode step over two pages per batch."""
    B, S_max, H, D = 2, 512, 2, 16
    k_cache = torch.randn(B, S_max, H, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, H, D, device=DEVICE)
    kp, vp, table = _paged(k_cache, v_cache, 256)
    q = torch.randn(B, 1, H, D, device=DEVICE)
    lens = torch.tensor([300, 257], dtype=torch.int32, device=DEVICE)
    with fastlm.use_backend(backend):
        out = fastlm.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=table)
    want, _ = _expected(q, k_cache, v_cache, k_cache[:, :0], v_cache[:, :0], lens.tolist(), [0, 0])
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True])
def test_leftpad_keys_start_after_the_padding(backend, paged):
    """cache_leftpad: batch b sees rows [leftpad, cache_seqlens + new) (flash-attn's), causal
    and ALiBi measured from its own first and last keys, the padding rows never read (they
    hold NaN here)."""
    B, S_max, H, Hk, D, n = 3, 48, 4, 2, 16, 2
    k_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    lens = [7, 20, 33]
    pads = [0, 5, 17]
    for b, p in enumerate(pads):
        k_cache[b, :p] = float("nan")
        v_cache[b, :p] = float("nan")
    q = torch.randn(B, n, H, D, device=DEVICE)
    k_new, v_new = torch.randn(B, n, Hk, D, device=DEVICE), torch.randn(B, n, Hk, D, device=DEVICE)
    slopes = torch.rand(B, H, device=DEVICE) * 0.3
    kc, vc = k_cache.clone(), v_cache.clone()
    extra = {}
    if paged:
        kc, vc, extra["block_table"] = _paged(kc, vc, 16)
    with fastlm.use_backend(backend):
        out, lse = fastlm.flash_attn_with_kvcache(
            q, kc, vc, k_new, v_new, cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
            cache_leftpad=torch.tensor(pads, dtype=torch.int32, device=DEVICE), causal=True, alibi_slopes=slopes,
            return_softmax_lse=True, **extra)
    want, want_lse = _expected(q, k_cache, v_cache, k_new, v_new, lens, pads, causal=True, slopes=slopes)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leftpad_rotary_positions_count_from_the_first_key(backend):
    """With cache_leftpad the new k (and a causal q) are rotated at cache_seqlens - leftpad, +1, ...:
    the same call as on a cache whose padding was cut off."""
    B, S_max, H, D, n = 2, 32, 2, 16, 2
    k_cache = torch.randn(B, S_max, H, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, H, D, device=DEVICE)
    q = torch.randn(B, n, H, D, device=DEVICE)
    k_new, v_new = torch.randn(B, n, H, D, device=DEVICE), torch.randn(B, n, H, D, device=DEVICE)
    cos, sin = fastlm.rotary_cos_sin(S_max, D, device=DEVICE)
    lens, pads = [9, 20], [0, 6]
    with fastlm.use_backend(backend):
        out = fastlm.flash_attn_with_kvcache(
            q, k_cache.clone(), v_cache.clone(), k_new, v_new, rotary_cos=cos, rotary_sin=sin,
            cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
            cache_leftpad=torch.tensor(pads, dtype=torch.int32, device=DEVICE), causal=True)
        for b in range(B):  # the same batch with its padding removed from the cache
            kb = torch.zeros(1, S_max, H, D, device=DEVICE)
            vb = torch.zeros(1, S_max, H, D, device=DEVICE)
            kb[0, :lens[b] - pads[b]] = k_cache[b, pads[b]:lens[b]]
            vb[0, :lens[b] - pads[b]] = v_cache[b, pads[b]:lens[b]]
            want = fastlm.flash_attn_with_kvcache(q[b:b + 1], kb, vb, k_new[b:b + 1], v_new[b:b + 1],
                                                  rotary_cos=cos, rotary_sin=sin,
                                                  cache_seqlens=lens[b] - pads[b], causal=True)
            torch.testing.assert_close(out[b:b + 1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [2, 3, 7, 64])
def test_split_kv_equals_one_pass(backend, num_splits):
    """Split-KV decoding merges to the one-pass answer: sinks, a window that leaves one batch's
    split without keys, a batch with an empty cache (only the new key), more splits than key
    blocks."""
    B, S_max, H, Hk, D = 3, 80, 4, 1, 32
    k_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    q = torch.randn(B, 1, H, D, device=DEVICE)
    k_new, v_new = torch.randn(B, 1, Hk, D, device=DEVICE), torch.randn(B, 1, Hk, D, device=DEVICE)
    lens = torch.tensor([0, 33, 79], dtype=torch.int32, device=DEVICE)
    sinks = torch.randn(H, device=DEVICE)
    outs = []
    for splits in (1, num_splits):
        with fastlm.use_backend(backend):
            outs.append(fastlm.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k_new, v_new,
                                                       cache_seqlens=lens, window_size=(20, 0), sinks=sinks,
                                                       num_splits=splits, return_softmax_lse=True))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-6)
    want, want_lse = _expected(q, k_cache, v_cache, k_new, v_new, lens.tolist(), [0] * B, window=(20, 0),
                               sinks=sinks)
    torch.testing.assert_close(outs[1][0].double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1][1].double(), want_lse, rtol=1e-4, atol=1e-5)


def test_split_kv_really_splits(monkeypatch):
    """num_splits > 1 on the Triton backend launches the split grid and the merge kernel."""
    from fastlm.kernels import attention as kern
    launched = []
    real = kern._attn_combine_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]
    monkeypatch.setattr(kern, "_attn_combine_kernel", Spy())
    k_cache = torch.randn(1, 64, 1, 16, device=DEVICE)
    q = torch.randn(1, 1, 2, 16, device=DEVICE)
    with fastlm.use_backend("triton"):
        fastlm.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=64, num_splits=4)
        assert launched
        launched.clear()
        fastlm.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=64, num_splits=1)
        assert not launched


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_with_block_table(backend):
    """flash_attn_varlen_func over a paged cache equals it over the packed keys (forward only)."""
    H, Hk, D, page = 4, 2, 16, 16
    lq, lk = [3, 1, 17], [20, 1, 40]
    per = 3
    q = torch.randn(sum(lq), H, D, device=DEVICE)
    k = torch.randn(sum(lk), Hk, D, device=DEVICE)
    v = torch.randn(sum(lk), Hk, D, device=DEVICE)
    cu_q = torch.tensor([0, 3, 4, 21], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 21, 61], dtype=torch.int32, device=DEVICE)
    dense_k = torch.zeros(3, per * page, Hk, D, device=DEVICE)
    dense_v = torch.zeros(3, per * page, Hk, D, device=DEVICE)
    for b in range(3):
        dense_k[b, :lk[b]] = k[int(cu_k[b]):int(cu_k[b + 1])]
        dense_v[b, :lk[b]] = v[int(cu_k[b]):int(cu_k[b + 1])]
    kp, vp, table = _paged(dense_k, dense_v, page)
    with fastlm.use_backend(backend):
        want, want_lse = fastlm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 40, causal=True, return_lse=True)
        out, lse = fastlm.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 17, 40, causal=True, block_table=table,
                                                 return_lse=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="block_table"):
        fastlm.flash_attn_varlen_func(q.requires_grad_(True), kp, vp, cu_q, cu_k, 17, 40, block_table=table)


def test_bad_inference_arguments_name_themselves():
    k_cache = torch.randn(2, 32, 2, 16, device=DEVICE)
    q = torch.randn(2, 1, 2, 16, device=DEVICE)
    lens = torch.tensor([4, 9], dtype=torch.int32, device=DEVICE)
    table = torch.tensor([[0], [1]], dtype=torch.int32, device=DEVICE)
    cases = [
        (dict(block_table=table, cache_batch_idx=torch.tensor([0, 1], device=DEVICE)), "cache_batch_idx"),
        (dict(block_table=table.long()), "block_table"),
        (dict(block_table=torch.tensor([[0], [5]], dtype=torch.int32, device=DEVICE)), "block_table"),
        (dict(cache_leftpad=torch.tensor([0, 10], dtype=torch.int32, device=DEVICE)), "cache_leftpad"),
        (dict(cache_leftpad=torch.tensor([0], dtype=torch.int32, device=DEVICE)), "cache_leftpad"),
        (dict(num_splits=-2), "num_splits"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            fastlm.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=lens, **kwargs)
    odd_pages = torch.randn(2, 24, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of 16"):
        fastlm.flash_attn_with_kvcache(q, odd_pages, odd_pages.clone(), cache_seqlens=lens, block_table=table)
