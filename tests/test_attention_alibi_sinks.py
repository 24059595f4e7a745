"""ALiBi and attention sinks in the kernels (issue 20), against float64 oracles written here from
the definitions, and the reference against the originals where they exist (Hugging Face's
GPT-OSS eager attention for the sinks).

ALiBi (flash-attn's): the scores get -slope * |i + S - L - j| after scaling and soft-capping;
the slopes are constants. Sinks (GPT-OSS's s_aux): one logit per head joins every row's
softmax with no value; they get a gradient. Under the interpreter the kernels' tiles are
16 x 16, so lengths 15, 16, 17, 31, 33 are the block edges.
"""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.reference import attention as ref
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE, ON_GPU
from .test_attention import scores_and_mask

BACKENDS = ["torch", "triton"]


def oracle(q, k, v, sinks=None, slopes=None, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """(out, lse) by autograd-able ops in q's dtype, (B, L, H, D) layout, bottom-right aligned:
    the sink as one more column of the softmax (GPT-OSS's construction), ALiBi as its bias."""
    B, L, H, D = q.shape
    s, ok, vv = scores_and_mask(q, k, v, scale, softcap, None, window, causal, slopes)
    s = s.masked_fill(~ok, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype).reshape(1, H, 1, 1).expand(B, H, L, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
    if sinks is not None:
        p = p[..., :-1]
    out = torch.einsum("bhls,bshd->blhd", p, vv)
    return out, lse.masked_fill(torch.isneginf(lse), float("inf"))


def _inputs(B, L, S, H, Hk, D, dtype=torch.float32, sinks=True):
    q = torch.randn(B, L, H, D, device=DEVICE).to(dtype)
    k = torch.randn(B, S, Hk, D, device=DEVICE).to(dtype)
    v = torch.randn(B, S, Hk, D, device=DEVICE).to(dtype)
    a = torch.randn(H, device=DEVICE) * 2 if sinks else None
    return q, k, v, a


def _compare(backend, call, oracle_fn, inputs, grads=True):
    """fastlm's (out, lse) and the gradient of every input against oracle_fn in float64 (the
    inputs' dtype as the yardstick)."""
    leaves = [t.detach().requires_grad_(grads) for t in inputs]
    with fastlm.use_backend(backend):
        out, lse = call(*leaves)
    dout = torch.randn(out.shape, device=out.device).to(out.dtype)

    def run(cast):
        xs = [cast(t).detach().requires_grad_(grads) for t in inputs]
        o, l_ = oracle_fn(*xs)
        return o, l_, (torch.autograd.grad(o, xs, cast(dout)) if grads else ())

    r_out, r_lse, r_grads = run(lambda t: t.double())
    e_out, e_lse, e_grads = run(lambda t: t)
    keys = inputs[1].shape[1]
    assert_close(out, r_out, e_out, "out", atol=summation_floor(r_out, out.dtype, keys))
    assert_close(lse, r_lse, e_lse.float(), "lse", atol=1e-5 * max(1.0, r_lse[r_lse.isfinite()].abs().max().item()
                                                                   if r_lse.isfinite().any() else 1.0))
    if grads:
        got = torch.autograd.grad(out, leaves, dout)
        for label, g, r, e in zip(["dq", "dk", "dv", "dsinks"], got, r_grads, e_grads):
            assert g.shape == r.shape
            floor = summation_floor(r, g.dtype, max(keys, out.shape[1] * out.shape[0]))
            floor += 4 * torch.finfo(inputs[0].dtype).eps * r.abs().max().item()
            assert_close(g, r, e, label, atol=floor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", [(15, 31), (16, 16), (17, 33), (1, 17), (33, 17)])
@pytest.mark.parametrize("causal", [False, True])
def test_sinks_forward_backward(backend, L, S, causal):
    """Sinks with grouped-query heads: out, lse and the gradients of q, k, v and the sinks.
    With causal and L > S the first rows see no key: out 0 there, lse the sink."""
    inputs = _inputs(2, L, S, 4, 2, 16)
    _compare(backend, lambda q, k, v, a: fastlm.flash_attn_func(q, k, v, causal=causal, sinks=a, return_lse=True),
             lambda q, k, v, a: oracle(q, k, v, a, causal=causal), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_batch", [False, True], ids=["(H,)", "(B,H)"])
def test_alibi_sinks_softcap_window_together(backend, per_batch):
    B, H = 2, 4
    inputs = _inputs(B, 17, 33, H, 1, 16)
    slopes = (torch.rand(B, H) if per_batch else torch.rand(H)).to(DEVICE) * 0.5 + 0.05
    _compare(backend, lambda q, k, v, a: fastlm.flash_attn_func(q, k, v, causal=True, window_size=(9, -1),
                                                                softcap=3.0, alibi_slopes=slopes, sinks=a,
                                                                return_lse=True),
             lambda q, k, v, a: oracle(q, k, v, a, slopes, causal=True, window=(9, -1), softcap=3.0), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_non_causal_gradients(backend):
    """ALiBi alone (no sinks), both sides of the diagonal, S < L: forward, lse and dq, dk, dv."""
    q, k, v, _ = _inputs(2, 33, 15, 2, 2, 16, sinks=False)
    slopes = torch.rand(2, device=DEVICE) + 0.1
    _compare(backend, lambda q, k, v: fastlm.flash_attn_func(q, k, v, alibi_slopes=slopes, return_lse=True),
             lambda q, k, v: oracle(q, k, v, None, slopes), [q, k, v])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinks_16bit_triton(dtype):
    if dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("the interpreter's bfloat16 dot multiplies raw bits: checked on a GPU")
    inputs = _inputs(1, 17, 33, 4, 4, 32, dtype=dtype)
    _compare("triton", lambda q, k, v, a: fastlm.flash_attn_func(q, k, v, causal=True, sinks=a, return_lse=True),
             lambda q, k, v, a: oracle(q, k, v, a, causal=True), inputs)


def test_sinks_match_hugging_face_gpt_oss_eager():
    """The reference (fastlm's CPU path) against transformers' own GPT-OSS eager attention in
    float64, including the sinks' gradient."""
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    B, H, Hk, L, D = 2, 4, 2, 9, 16
    q = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hk, L, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hk, L, D, dtype=torch.float64, requires_grad=True)
    module = torch.nn.Module()
    module.sinks = torch.nn.Parameter(torch.randn(H, dtype=torch.float64))
    module.num_key_value_groups = H // Hk
    module.training = False
    causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    theirs, _ = gpt_oss.eager_attention_forward(module, q, k, v, causal[None, None], scaling=D ** -0.5)
    dout = torch.randn_like(theirs)
    want = torch.autograd.grad(theirs, [q, k, v, module.sinks], dout)
    with fastlm.use_backend("torch"):
        ours = fastlm.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                      sinks=module.sinks)
    got = torch.autograd.grad(ours, [q, k, v, module.sinks], dout)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_sinks_reference_with_neginf_and_nan_matches_hugging_face():
    """The reference with sinks against transformers' GPT-OSS eager attention where the inputs
    are not finite: a query row whose keys are all masked (-inf: head 0's sink alone takes the
    row, output 0 and lse the sink, as HF), a -inf sink (head 1: that row sees nothing at all,
    fastlm's 0 where HF's softmax gives NaN, the documented convention), and a NaN in one query
    (NaN in that row in both, the other rows untouched)."""
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    B, H, L, D = 1, 2, 5, 8
    q = torch.randn(B, H, L, D, dtype=torch.float64)
    k = torch.randn(B, H, L, D, dtype=torch.float64)
    v = torch.randn(B, H, L, D, dtype=torch.float64)
    q[0, 1, 3, 2] = float("nan")
    mask = torch.zeros(L, L, dtype=torch.float64)
    mask[2] = float("-inf")  # query 2 sees no key
    module = torch.nn.Module()
    module.sinks = torch.nn.Parameter(torch.tensor([0.7, float("-inf")], dtype=torch.float64))
    module.num_key_value_groups = 1
    module.training = False
    theirs, _ = gpt_oss.eager_attention_forward(module, q, k, v, mask[None, None], scaling=D ** -0.5)
    out, lse = ref.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), D ** -0.5,
                             mask=(mask == 0)[None, None], sinks=module.sinks.detach())
    assert torch.isnan(theirs[0, 2, 1]).all()  # HF: no key and no sink
    assert torch.equal(out[0, 2, 1], torch.zeros(D, dtype=torch.float64))  # fastlm: 0
    assert lse[0, 1, 2] == float("inf")
    theirs = theirs.clone()
    theirs[0, 2, 1] = 0.0
    torch.testing.assert_close(out, theirs, equal_nan=True)  # everything else equal, NaNs where HF's
    assert torch.equal(out[0, 2, 0], torch.zeros(D, dtype=torch.float64))  # the sink alone took the row
    torch.testing.assert_close(lse[0, 0, 2], module.sinks[0].detach())
    assert torch.isnan(out[0, 3, 1]).all() and torch.isfinite(out[0, :3]).all()


def test_sink_grad_formula_against_autograd():
    """ref.sink_grad (the op's formula for the sinks' gradient) against autograd through the
    oracle, dense and packed (lse (H, total))."""
    q, k, v, a = (t.double() for t in _inputs(2, 7, 9, 3, 3, 8))
    a.requires_grad_(True)
    out, lse = oracle(q, k, v, a, causal=True)
    dout = torch.randn_like(out)
    want, = torch.autograd.grad(out, a, dout)
    got = ref.sink_grad(dout, out.detach(), lse.detach(), a.detach())
    torch.testing.assert_close(got, want)
    packed = ref.sink_grad(dout.reshape(-1, 3, 8), out.detach().reshape(-1, 3, 8),
                           lse.detach().permute(1, 0, 2).reshape(3, -1), a.detach(), varlen=True)
    torch.testing.assert_close(packed, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_alibi_and_sinks(backend):
    """Packed sequences of 17, 1 and 33 queries (keys 33, 16, 15) with per-sequence slopes and
    sinks: each sequence equals the dense call on it alone, forward and backward."""
    H, Hk, D = 4, 2, 16
    lq, lk = [17, 1, 33], [33, 16, 15]
    q = torch.randn(sum(lq), H, D, device=DEVICE)
    k = torch.randn(sum(lk), Hk, D, device=DEVICE)
    v = torch.randn(sum(lk), Hk, D, device=DEVICE)
    a = torch.randn(H, device=DEVICE)
    slopes = torch.rand(3, H, device=DEVICE) * 0.3
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32, device=DEVICE)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, a)]
    with fastlm.use_backend(backend):
        out, lse = fastlm.flash_attn_varlen_func(*leaves[:3], cu_q, cu_k, max(lq), max(lk), causal=True,
                                                 alibi_slopes=slopes, sinks=leaves[3], return_lse=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v, a)]
    outs, lses = [], []
    for b in range(3):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        o, l_ = oracle(ref_leaves[0][None, rq], ref_leaves[1][None, rk], ref_leaves[2][None, rk], ref_leaves[3],
                       slopes[b].double(), causal=True)
        outs.append(o[0])
        lses.append(l_[0])
    r_out = torch.cat(outs)
    r_grads = torch.autograd.grad(r_out, ref_leaves, dout.double())
    torch.testing.assert_close(out.double(), r_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.cat(lses, dim=1), rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, r_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_alibi_and_sinks(backend):
    """The cache call with per-batch lengths: ALiBi measured from each batch's own last key,
    the sinks in the denominator; equal to the dense call on each batch's filled cache."""
    B, S_max, H, Hk, D, L = 3, 40, 4, 2, 16, 2
    k_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    v_cache = torch.randn(B, S_max, Hk, D, device=DEVICE)
    q = torch.randn(B, L, H, D, device=DEVICE)
    k_new, v_new = torch.randn(B, L, Hk, D, device=DEVICE), torch.randn(B, L, Hk, D, device=DEVICE)
    lens = torch.tensor([5, 17, 31], dtype=torch.int32, device=DEVICE)
    a = torch.randn(H, device=DEVICE)
    slopes = torch.rand(B, H, device=DEVICE) * 0.4
    kc, vc = k_cache.clone(), v_cache.clone()
    with fastlm.use_backend(backend):
        out, lse = fastlm.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens, causal=True,
                                                  alibi_slopes=slopes, sinks=a, return_softmax_lse=True)
    for b in range(B):
        n = int(lens[b]) + L
        kk = torch.cat([k_cache[b, :int(lens[b])], k_new[b]])[None].double()
        vv = torch.cat([v_cache[b, :int(lens[b])], v_new[b]])[None].double()
        o, l_ = oracle(q[b:b + 1].double(), kk, vv, a.double(), slopes[b].double(), causal=True)
        torch.testing.assert_close(out[b:b + 1].double(), o, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lse[b:b + 1].double(), l_, rtol=1e-4, atol=1e-5)
        assert n <= S_max


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_rows_that_see_no_key(backend):
    """A window that leaves some rows without keys: their output is 0 and their lse the sink
    (the sink alone takes the row's probability); no NaN anywhere, gradients included."""
    q, k, v, a = _inputs(1, 9, 4, 2, 2, 16)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, a)]
    with fastlm.use_backend(backend):
        out, lse = fastlm.flash_attn_func(*leaves[:3], causal=True, sinks=leaves[3], return_lse=True)
    blind = 9 - 4  # bottom-right causal: queries 0..4 see no key
    assert torch.equal(out[:, :blind], torch.zeros_like(out[:, :blind]))
    torch.testing.assert_close(lse[0, :, :blind], a[:, None].expand(2, blind))
    grads = torch.autograd.grad(out.sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("bad", ["shape", "int", "device_list"])
def test_sinks_bad_input_names_the_argument(bad):
    q, k, v, _ = _inputs(1, 4, 4, 4, 4, 16)
    sinks = {"shape": torch.randn(3), "int": torch.ones(4, dtype=torch.int64), "device_list": [0.0] * 4}[bad]
    with pytest.raises(ValueError, match="sinks"):
        fastlm.flash_attn_func(q, k, v, sinks=sinks)


def test_alibi_is_in_the_kernel_not_a_dense_bias(monkeypatch):
    """flash_attn_func passes the slopes to the op (nothing of size L x S is formed): the
    old materialised bias helper must not be called without return_attn_probs."""
    from fastlm.ops import attention as attn_ops
    monkeypatch.setattr(attn_ops, "_alibi_bias", lambda *a, **k: pytest.fail("dense ALiBi bias formed"))
    q, k, v, _ = _inputs(1, 17, 17, 2, 2, 16)
    slopes = torch.rand(2, device=DEVICE) + 0.5
    with fastlm.use_backend("triton"):
        out = fastlm.flash_attn_func(q, k, v, alibi_slopes=slopes)
    q, k, v = q.double(), k.double(), v.double()
    torch.testing.assert_close(out.double(), oracle(q, k, v, None, slopes.double())[0], rtol=1e-4, atol=1e-5)
    assert (out.double() - oracle(q, k, v)[0]).abs().max() > 0.1  # the bias changed the answer
