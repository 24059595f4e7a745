"""Attention against a float64 oracle written here from the definition (and, for SDPA,
against torch's own scaled_dot_product_attention in float64).

Under the interpreter the kernels use 16 x 16 tiles, so lengths 15, 16, 17, 33 are the
block edges there; 255, 256, 257 are the GPU tiles' edges.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops import attention as attn_ops
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE, ON_GPU

BACKENDS = ["torch", "triton"]


def scores_and_mask(q, k, v, scale, softcap=0.0, shift=None, window=(-1, -1), causal=False, slopes=None):
    """The formula's scores (B, H, L, S): q k^T * scale, soft-capped, minus ALiBi's
    slope * |i + shift - j| (slopes (H,) or (B, H)); the window/causal mask (L, S) with queries
    aligned ``shift`` keys on (default S - L, bottom-right); and k's and v's heads repeated for
    GQA. Returns (s, ok, vv)."""
    B, L, H, D = q.shape
    S, Hk = k.shape[1], k.shape[2]
    shift = S - L if shift is None else shift
    scale = D ** -0.5 if scale is None else scale
    kk = k.repeat_interleave(H // Hk, dim=2)
    vv = v.repeat_interleave(H // Hk, dim=2)
    s = torch.einsum("blhd,bshd->bhls", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(L, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    if slopes is not None:
        s = s - slopes.to(s.dtype).reshape(-1, H, 1, 1) * (i + shift - j).abs().to(s.dtype)
    ok = torch.ones(L, S, dtype=torch.bool, device=q.device)
    left, right = window
    if causal:
        right = 0
    if left >= 0:
        ok = ok & (j >= i + shift - left)
    if right >= 0:
        ok = ok & (j <= i + shift + right)
    return s, ok, vv


def naive(q, k, v, scale=None, bottom_right=True, window=(-1, -1), causal=False, softcap=0.0, mask=None,
          keep=None, dropout_p=0.0):
    """Attention as the formula reads, (B, L, H, D) layout, by autograd-able torch ops.
    A query that sees no key gets 0."""
    B, L, H, D = q.shape
    S = k.shape[1]
    s, ok, vv = scores_and_mask(q, k, v, scale, softcap, S - L if bottom_right else 0, window, causal)
    ok = ok.expand(B, H, L, S)
    if mask is not None:
        if mask.dtype == torch.bool:
            ok = ok & mask
        else:
            s = s + mask.to(s.dtype)
    s = s.masked_fill(~ok, float("-inf"))
    seen = ok.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~seen, 0.0), dim=-1) * seen
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return torch.einsum("bhls,bshd->blhd", p, vv)


def qkv(B, L, S, H, Hk, D, Dv=None, dtype=torch.float32):
    q = torch.randn(B, L, H, D, device=DEVICE).to(dtype)
    k = torch.randn(B, S, Hk, D, device=DEVICE).to(dtype)
    v = torch.randn(B, S, Hk, Dv or D, device=DEVICE).to(dtype)
    return q, k, v


def _delta_rounding(inputs, dout) -> float:
    """The backward forms ds = p * (dp - delta) with delta = rowsum(dO * O) from the stored
    output (FlashAttention's formulation): dp - delta cancels, leaving the rounding of those
    dot products, eps * |dO| |V| sqrt(Dv), times |q| or |k| and the scale in dq and dk.
    torch's autograd differentiates the softmax without that cancellation, so this is
    allowed on top of the rule for the gradients."""
    q, k, v = inputs[:3]
    eps = torch.finfo(q.dtype).eps
    mags = [t.detach().abs().max().item() for t in (q, k, v, dout)]
    dv = v.shape[-1]
    return eps * mags[3] * mags[2] * dv ** 0.5 * max(mags[0], mags[1]) * q.shape[-1] ** -0.5


def check(backend, fastlm_fn, oracle_fn, inputs, grads=True, name="out", grad_rel_floor=0.0):
    """fastlm_fn(*inputs) against oracle_fn(*inputs) in float64 (and in the inputs' dtype as
    the yardstick), forward and the gradient of every input. grad_rel_floor adds
    grad_rel_floor * max|reference gradient| to the gradients' floor (large scores: exp's
    relative rounding grows with |s|, and eager's own error is then a lucky yardstick)."""
    leaves = [t.detach().requires_grad_(grads) for t in inputs]
    with fastlm.use_backend(backend):
        out = fastlm_fn(*leaves)
    assert out.dtype == inputs[0].dtype
    dout = torch.randn(out.shape, device=out.device).to(out.dtype)

    def run(cast):
        xs = [cast(t).detach().requires_grad_(grads) for t in inputs]
        o = oracle_fn(*xs)
        return o, (torch.autograd.grad(o, xs, cast(dout)) if grads else ())

    ref, ref_grads = run(lambda t: t.double())
    eager, eager_grads = run(lambda t: t)
    keys = inputs[1].shape[-3] if inputs[1].dim() >= 3 else inputs[1].shape[0]
    assert_close(out, ref, eager, name, atol=summation_floor(ref, out.dtype, keys))
    if grads:
        got = torch.autograd.grad(out, leaves, dout)
        cancel = _delta_rounding(inputs, dout)
        for label, g, r, e in zip("qkv", got, ref_grads, eager_grads):
            assert g.shape == r.shape and g.dtype == inputs[0].dtype
            terms = max(out.shape[1] if out.dim() == 4 else out.shape[0], keys)
            floor = summation_floor(r, g.dtype, terms) + cancel + grad_rel_floor * r.abs().max().item()
            assert_close(g, r, e, f"d{label}", atol=floor)
    return out


# ----------------------------------------------------------------------------- flash_attn_func

FLASH_OPTIONS = [
    {},
    {"causal": True},
    {"window_size": (5, 3)},
    {"window_size": (7, -1)},
    {"window_size": (-1, 2)},
    {"softcap": 2.5},
    {"softmax_scale": 0.37},
    {"causal": True, "window_size": (9, -1), "softcap": 4.0, "softmax_scale": 0.2},
]


def _oracle_flash(options):
    def oracle(q, k, v):
        return naive(q, k, v, scale=options.get("softmax_scale"), bottom_right=True,
                     window=options.get("window_size", (-1, -1)), causal=options.get("causal", False),
                     softcap=options.get("softcap", 0.0))
    return oracle


def _ids(o):
    return "-".join(f"{k}={v}" for k, v in o.items()) or "plain"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", FLASH_OPTIONS, ids=_ids)
@pytest.mark.parametrize("L,S", [(33, 33), (17, 40), (40, 17)])
def test_flash_attn_func_options(backend, options, L, S):
    inputs = qkv(2, L, S, 2, 2, 16)
    check(backend, lambda q, k, v: fastlm.flash_attn_func(q, k, v, **options), _oracle_flash(options), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", [(1, 1), (1, 47), (47, 1), (15, 16), (16, 17), (17, 15), (113, 113)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_lengths(backend, L, S, causal):
    """Lengths at the interpreter's tile edges, equal and not, down to one. Causal with
    L > S leaves the first L - S queries without a key: zeros, zero gradients."""
    inputs = qkv(1, L, S, 2, 1, 24)
    check(backend, lambda q, k, v: fastlm.flash_attn_func(q, k, v, causal=causal),
          _oracle_flash({"causal": causal}), inputs)


@pytest.mark.parametrize("L,S", [(255, 256), (256, 257), (257, 255)])
def test_flash_attn_func_gpu_tile_edges(L, S):
    inputs = qkv(1, L, S, 1, 1, 16)
    check("triton", lambda q, k, v: fastlm.flash_attn_func(q, k, v, causal=True), _oracle_flash({"causal": True}),
          inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [8, 16, 40, 64, 80, 96, 112, 128, 256])
def test_head_dims(backend, D):
    inputs = qkv(1, 19, 21, 2, 1, D)
    check(backend, lambda q, k, v: fastlm.flash_attn_func(q, k, v, causal=True), _oracle_flash({"causal": True}),
          inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_head_dim_differs(backend):
    inputs = qkv(2, 13, 18, 2, 2, 32, Dv=24)
    check(backend, lambda q, k, v: fastlm.flash_attn_func(q, k, v), _oracle_flash({}), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,Hk", [(4, 1), (6, 2), (4, 4)])
def test_grouped_query_attention(backend, H, Hk):
    inputs = qkv(2, 21, 19, H, Hk, 16)
    options = {"causal": True, "softcap": 3.0}
    check(backend, lambda q, k, v: fastlm.flash_attn_func(q, k, v, **options), _oracle_flash(options), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("bfloat16 casts truncate under the Triton interpreter: checked on a GPU")
    inputs = qkv(2, 37, 29, 2, 1, 40, dtype=dtype)
    options = {"causal": True, "window_size": (11, -1)}
    check(backend, lambda q, k, v: fastlm.flash_attn_func(q, k, v, **options), _oracle_flash(options), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_views_of_packed_qkv(backend):
    B, L, H, D = 2, 23, 3, 16
    qkv_packed = torch.randn(B, L, 3, H, D, device=DEVICE)
    inputs = [qkv_packed[:, :, i] for i in range(3)]
    assert not inputs[0].is_contiguous()
    check(backend, lambda q, k, v: fastlm.flash_attn_func(q, k, v, causal=True), _oracle_flash({"causal": True}),
          inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_and_rows_that_see_nothing(backend):
    q, k, v = qkv(1, 20, 12, 2, 2, 16)
    with fastlm.use_backend(backend):
        out, lse = fastlm.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert lse.shape == (1, 2, 20) and lse.dtype == torch.float32
    s = torch.einsum("blhd,bshd->bhls", q.double(), k.double()) * 16 ** -0.5
    i, j = torch.arange(20)[:, None], torch.arange(12)[None, :]
    s = s.masked_fill((j > i - 8).to(DEVICE), float("-inf"))
    expected = torch.logsumexp(s, -1)
    blind = torch.isneginf(expected)
    assert blind[..., :8].all() and not blind[..., 8:].any()
    assert torch.isinf(lse[blind]).all() and (lse[blind] > 0).all()  # +inf, FlashAttention's convention
    torch.testing.assert_close(lse[~blind].double(), expected[~blind], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, :8], torch.zeros_like(out[:, :8]))


# ----------------------------------------------------------------------------- varlen and KV cache

def _cu(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"causal": True}, {"window_size": (4, 2), "softcap": 3.0}], ids=_ids)
def test_varlen_equals_each_sequence_alone(backend, options):
    lq, lk = [5, 17, 1, 33, 0], [9, 17, 20, 31, 4]
    H, Hk, D = 4, 2, 24
    q = torch.randn(sum(lq), H, D, device=DEVICE)
    k = torch.randn(sum(lk), Hk, D, device=DEVICE)
    v = torch.randn(sum(lk), Hk, D, device=DEVICE)
    cu_q, cu_k = _cu(lq), _cu(lk)
    oracle_one = _oracle_flash(options)

    def oracle(q, k, v):
        outs = [oracle_one(q[None, a:b], k[None, c:d], v[None, c:d])[0]
                for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())]
        return torch.cat(outs)

    check(backend, lambda q, k, v: fastlm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), **options),
          oracle, [q, k, v])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("new", [0, 1, 3])
def test_kvcache_appends_in_place_and_attends(backend, new):
    B, S_max, H, Hk, D = 3, 40, 4, 2, 16
    k_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    seqlens = torch.tensor([5, 30, 0], dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, max(new, 1), H, D, device=DEVICE)
    k_new = torch.randn(B, new, Hk, D, device=DEVICE) if new else None
    v_new = torch.randn(B, new, Hk, D, device=DEVICE) if new else None
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b in range(B):
        if new:
            expected_k[b, seqlens[b]:seqlens[b] + new] = k_new[b]
            expected_v[b, seqlens[b]:seqlens[b] + new] = v_new[b]
    with fastlm.use_backend(backend):
        out = fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    for b in range(B):
        used = int(seqlens[b]) + new
        ref = naive(q[b:b + 1].double(), expected_k[b:b + 1, :used].double(), expected_v[b:b + 1, :used].double(),
                    causal=True)
        eager = naive(q[b:b + 1], expected_k[b:b + 1, :used], expected_v[b:b + 1, :used], causal=True)
        assert_close(out[b:b + 1], ref, eager, f"out of batch {b}", atol=summation_floor(ref, out.dtype, used))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_int_seqlens_and_full_cache(backend):
    B, S_max, H, D = 2, 24, 2, 16
    k_cache, v_cache = torch.randn(B, S_max, H, D, device=DEVICE), torch.randn(B, S_max, H, D, device=DEVICE)
    q = torch.randn(B, 1, H, D, device=DEVICE)
    with fastlm.use_backend(backend):
        full = fastlm.flash_attn_with_kvcache(q, k_cache, v_cache)
        part = fastlm.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=10)
    torch.testing.assert_close(full, naive(q, k_cache, v_cache, causal=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part, naive(q, k_cache[:, :10], v_cache[:, :10], causal=True), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- scaled_dot_product_attention

def _sdpa_inputs(B, H, Hk, L, S, E, dtype=torch.float32):
    q = torch.randn(B, H, L, E, device=DEVICE).to(dtype)
    k = torch.randn(B, Hk, S, E, device=DEVICE).to(dtype)
    v = torch.randn(B, Hk, S, E, device=DEVICE).to(dtype)
    return [q, k, v]


def _torch_sdpa(**kwargs):
    def oracle(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        return torch.nan_to_num(out, nan=0.0)  # torch gives NaN where fastlm gives 0 (rows that see nothing)
    return oracle


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", [(20, 20), (13, 31), (31, 13)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_torch(backend, L, S, is_causal):
    """is_causal aligned top-left, as torch's (with L > S the late queries see every key)."""
    check(backend, lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, is_causal=is_causal),
          _torch_sdpa(is_causal=is_causal), _sdpa_inputs(2, 3, 3, L, S, 16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool-padding", "bool-full", "float-full", "float-2d"])
def test_sdpa_masks(backend, kind):
    B, H, L, S = 2, 2, 17, 21
    if kind == "bool-padding":  # (B, 1, 1, S): a key padding mask, some keys of each batch hidden
        lengths = torch.tensor([21, 9], device=DEVICE)
        mask = (torch.arange(S, device=DEVICE)[None, :] < lengths[:, None])[:, None, None, :]
    elif kind == "bool-full":
        mask = torch.rand(B, H, L, S, device=DEVICE) > 0.3
        mask[0, 0, 3] = False  # a query that sees nothing: 0 here, NaN in torch
    elif kind == "float-full":
        mask = torch.randn(B, H, L, S, device=DEVICE)
    else:
        mask = torch.randn(L, S, device=DEVICE)
    cast_mask = (lambda m, like: m if m.dtype == torch.bool else m.to(like.dtype))
    check(backend, lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, attn_mask=mask),
          lambda q, k, v: _torch_sdpa(attn_mask=cast_mask(mask, q))(q, k, v), _sdpa_inputs(B, H, H, L, S, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_gqa_scale_and_shapes(backend):
    check(backend, lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.3,
                                                                       is_causal=True),
          _torch_sdpa(enable_gqa=True, scale=0.3, is_causal=True), _sdpa_inputs(2, 6, 2, 19, 19, 24))
    three_d = [torch.randn(3, 14, 16, device=DEVICE) for _ in range(3)]  # (B, L, E), no head dim
    check(backend, lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v), _torch_sdpa(), three_d)
    five_d = [torch.randn(2, 2, 2, 11, 16, device=DEVICE) for _ in range(3)]  # (N, G, H, L, E)
    check(backend, lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, is_causal=True),
          _torch_sdpa(is_causal=True), five_d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_views_of_packed_qkv(backend):
    B, L, H, E = 2, 18, 2, 16
    packed = torch.randn(B, L, 3 * H * E, device=DEVICE)
    views = [t.view(B, L, H, E).transpose(1, 2) for t in packed.split(H * E, dim=-1)]
    assert not views[0].is_contiguous()
    check(backend, lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, is_causal=True),
          _torch_sdpa(is_causal=True), views)


# ----------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_same_seed_same_output(backend):
    q, k, v = qkv(2, 24, 24, 2, 2, 16)
    with fastlm.use_backend(backend):
        torch.manual_seed(5)
        a = fastlm.flash_attn_func(q, k, v, dropout_p=0.3)
        torch.manual_seed(5)
        b = fastlm.flash_attn_func(q, k, v, dropout_p=0.3)
        c = fastlm.flash_attn_func(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_forward_and_backward_use_the_same_mask(backend, causal):
    B, L, S, H, p = 2, 33, 29, 2, 0.25
    inputs = qkv(B, L, S, H, 1, 16)
    torch.manual_seed(11)
    seed = attn_ops.draw_dropout_seed(DEVICE)
    keep = attn_ops.dropout_mask(seed, B, H, L, S, p, backend, DEVICE)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05

    def ours(q, k, v):
        torch.manual_seed(11)  # the call draws the same seed
        return fastlm.flash_attn_func(q, k, v, dropout_p=p, causal=causal)

    check(backend, ours, lambda q, k, v: naive(q, k, v, causal=causal, keep=keep.to(q.dtype), dropout_p=p), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_with_dropout_and_gqa(backend):
    """Packed sequences with dropout through the public API: sequence b uses the mask's
    [b, :, :its L, :its S] corner, forward and backward."""
    lq, lk, H, Hk, D, p = [7, 18, 1, 0], [12, 18, 5, 3], 4, 2, 16, 0.2
    q = torch.randn(sum(lq), H, D, device=DEVICE)
    k = torch.randn(sum(lk), Hk, D, device=DEVICE)
    v = torch.randn(sum(lk), Hk, D, device=DEVICE)
    cu_q, cu_k = _cu(lq), _cu(lk)
    torch.manual_seed(3)
    keep = attn_ops.dropout_mask(attn_ops.draw_dropout_seed(DEVICE), len(lq), H, max(lq), max(lk), p, backend, DEVICE)

    def ours(q, k, v):
        torch.manual_seed(3)
        return fastlm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), dropout_p=p, causal=True)

    check(backend, ours, varlen_dropout_oracle(cu_q, cu_k, keep, p), [q, k, v])


def varlen_dropout_oracle(cu_q, cu_k, keep, p, causal=True):
    """naive() per packed sequence, sequence b with the dropout mask's [b, :, :its L, :its S]."""
    def oracle(q, k, v):
        outs = []
        for b, (a, e, c, d) in enumerate(zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(),
                                             cu_k[1:].tolist())):
            kb = keep[b:b + 1, :, :e - a, :d - c].to(q.dtype)
            outs.append(naive(q[None, a:e], k[None, c:d], v[None, c:d], causal=causal, keep=kb, dropout_p=p)[0])
        return torch.cat(outs)
    return oracle


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_option_at_once(backend):
    """GQA, L != S, bottom-right causal with a left window, softcap, scale and dropout together."""
    B, L, S, H, Hk, D, p = 2, 21, 34, 6, 2, 24, 0.15
    options = {"causal": True, "window_size": (9, -1), "softcap": 3.0, "softmax_scale": 0.3}
    torch.manual_seed(8)
    keep = attn_ops.dropout_mask(attn_ops.draw_dropout_seed(DEVICE), B, H, L, S, p, backend, DEVICE)

    def ours(q, k, v):
        torch.manual_seed(8)
        return fastlm.flash_attn_func(q, k, v, dropout_p=p, **options)

    check(backend, ours, lambda q, k, v: naive(q, k, v, scale=0.3, window=(9, -1), causal=True, softcap=3.0,
                                               keep=keep.to(q.dtype), dropout_p=p), qkv(B, L, S, H, Hk, D))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_padding_mask_with_gqa(backend, is_causal):
    """A (B, 1, 1, S) key padding mask with grouped heads (is_causal cannot join a mask in
    torch's API: causal + padding is passed as one boolean mask)."""
    B, H, Hk, L, S = 3, 4, 2, 19, 19
    lengths = torch.tensor([19, 11, 1], device=DEVICE)
    mask = (torch.arange(S, device=DEVICE)[None, :] < lengths[:, None])[:, None, None, :]
    if is_causal:
        mask = mask & torch.ones(L, S, dtype=torch.bool, device=DEVICE).tril()
    check(backend, lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
          _torch_sdpa(attn_mask=mask, enable_gqa=True), _sdpa_inputs(B, H, Hk, L, S, 16))


def test_gpu_tile_edges_every_interface():
    """Lengths 255, 256, 257 (the GPU tiles' edges) through SDPA, varlen and the KV cache."""
    backend = "triton"
    check(backend, lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, is_causal=True),
          _torch_sdpa(is_causal=True), _sdpa_inputs(1, 1, 1, 257, 255, 16))
    lengths = [255, 256, 257]
    q, k, v = (torch.randn(sum(lengths), 1, 16, device=DEVICE) for _ in range(3))
    cu = _cu(lengths)
    oracle_one = _oracle_flash({"causal": True})

    def oracle(q, k, v):
        return torch.cat([oracle_one(q[None, a:b], k[None, a:b], v[None, a:b])[0]
                          for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])

    check(backend, lambda q, k, v: fastlm.flash_attn_varlen_func(q, k, v, cu, cu, 257, 257, causal=True), oracle,
          [q, k, v])
    k_cache, v_cache = torch.randn(3, 260, 1, 16, device=DEVICE), torch.randn(3, 260, 1, 16, device=DEVICE)
    seqlens = torch.tensor([254, 255, 256], dtype=torch.int32, device=DEVICE)
    qd, kn, vn = (torch.randn(3, 1, 1, 16, device=DEVICE) for _ in range(3))
    with fastlm.use_backend(backend):
        out = fastlm.flash_attn_with_kvcache(qd, k_cache, v_cache, kn, vn, cache_seqlens=seqlens)
    for b in range(3):
        used = int(seqlens[b]) + 1
        ref = naive(qd[b:b + 1].double(), k_cache[b:b + 1, :used].double(), v_cache[b:b + 1, :used].double())
        eager = naive(qd[b:b + 1], k_cache[b:b + 1, :used], v_cache[b:b + 1, :used])
        assert_close(out[b:b + 1], ref, eager, f"out of batch {b}", atol=summation_floor(ref, out.dtype, used))


def test_triton_dropout_mask_is_the_kernels():
    """A dropout of ~1 keeps almost nothing: the output equals the reference with the mask
    dropout_mask reports, so the mask is the one the kernel drew."""
    B, L, S, H, p = 1, 20, 20, 1, 0.9
    q, k, v = qkv(B, L, S, H, H, 16)
    torch.manual_seed(3)
    seed = attn_ops.draw_dropout_seed(DEVICE)
    keep = attn_ops.dropout_mask(seed, B, H, L, S, p, "triton", DEVICE)
    torch.manual_seed(3)
    with fastlm.use_backend("triton"):
        out = fastlm.flash_attn_func(q, k, v, dropout_p=p)
    torch.testing.assert_close(out, naive(q, k, v, keep=keep.float(), dropout_p=p), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- errors, opcheck, compile

def _bad_cases():
    q, k, v = qkv(1, 4, 4, 2, 2, 16)
    return [
        ("integer q", lambda: fastlm.flash_attn_func(q.long(), k, v), TypeError, "q"),
        ("dtype mismatch", lambda: fastlm.flash_attn_func(q, k.double(), v), TypeError, "k"),
        ("device", lambda: fastlm.flash_attn_func(q, k.to("meta"), v), ValueError, "k"),
        ("3-D q", lambda: fastlm.flash_attn_func(q[0], k, v), ValueError, "q"),
        ("head dim", lambda: fastlm.flash_attn_func(q, k[..., :8], v), ValueError, "head dim"),
        ("heads", lambda: fastlm.flash_attn_func(q[:, :, :1].expand(1, 4, 3, 16), k, v), ValueError, "heads"),
        ("k v mismatch", lambda: fastlm.flash_attn_func(q, k, v[:, :3]), ValueError, "k and v"),
        ("dropout", lambda: fastlm.flash_attn_func(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
        ("window", lambda: fastlm.flash_attn_func(q, k, v, window_size=(-2, 0)), ValueError, "window_size"),
        ("softcap", lambda: fastlm.flash_attn_func(q, k, v, softcap=-1.0), ValueError, "softcap"),
        ("scale", lambda: fastlm.flash_attn_func(q, k, v, softmax_scale=float("inf")), ValueError, "softmax_scale"),
        ("cu_seqlens", lambda: fastlm.flash_attn_varlen_func(q[0], k[0], v[0], [0, 4], _cu([4]), 4, 4),
         ValueError, "cu_seqlens_q"),
        ("kv cache k without v", lambda: fastlm.flash_attn_with_kvcache(q, k, v, k=k, cache_seqlens=0), ValueError,
         "k and v"),
        ("kv cache seqlens", lambda: fastlm.flash_attn_with_kvcache(q, k, v, cache_seqlens=1.5), ValueError,
         "cache_seqlens"),
        ("sdpa mask and causal", lambda: fastlm.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(4, 16, dtype=torch.bool, device=DEVICE), is_causal=True), ValueError,
         "attn_mask"),
        ("sdpa mask shape", lambda: fastlm.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.bool, device=DEVICE)), ValueError, "attn_mask"),
        ("sdpa mask dtype", lambda: fastlm.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(2, 16, dtype=torch.int64, device=DEVICE)), TypeError, "attn_mask"),
        ("sdpa heads without gqa", lambda: fastlm.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2)[:, :1], v.transpose(1, 2)[:, :1]), ValueError, "enable_gqa"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, call, exc, word = case
    with pytest.raises(exc, match=word):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v = (t.requires_grad_(True) for t in qkv(1, 17, 19, 2, 1, 16))
    with fastlm.use_backend(backend):
        torch.library.opcheck(attn_ops._attention, (q, k, v, None, None, None, None, None, 0.25, True, 3, 0, 2.0,
                                                    0.0, 0, 0))
        mask = torch.rand(1, 2, 17, 19, device=DEVICE) > 0.2
        torch.library.opcheck(attn_ops._attention, (q, k, v, mask, None, None, None, None, 0.25, False, -1, -1, 0.0,
                                                    0.0, 0, 0))
        out, lse = attn_ops._attention(q, k, v, None, None, None, None, None, 0.25, True, -1, 0, 0.0, 0.0, 0, 0)
        dout = torch.randn_like(out)
        torch.library.opcheck(attn_ops._attention_bwd, (dout, q.detach(), k.detach(), v.detach(), out.detach(),
                                                        lse.detach(), None, None, None, None, 0.25, True, -1, 0,
                                                        0.0, 0.0, 0, 0, backend, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    import torch._dynamo

    torch._dynamo.reset()

    def block(q, k, v):
        a = fastlm.scaled_dot_product_attention(q, k, v, is_causal=True)
        b = fastlm.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window_size=(4, 4))
        return a.sum() + b.float().square().sum()

    q, k, v = (t.requires_grad_(True) for t in _sdpa_inputs(1, 2, 2, 17, 17, 16))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with fastlm.use_backend(backend):
        expected = block(q, k, v)
        g_expected = torch.autograd.grad(expected, [q, k, v])
        got = compiled(q, k, v)
        g_got = torch.autograd.grad(got, [q, k, v])
    torch.testing.assert_close(got, expected)
    for a, b in zip(g_got, g_expected):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_real_sizes(dtype, D, causal):
    inputs = qkv(2, 1023, 1025, 8, 2, D, dtype=dtype)
    check("triton", lambda q, k, v: fastlm.flash_attn_func(q, k, v, causal=causal),
          _oracle_flash({"causal": causal}), inputs)
