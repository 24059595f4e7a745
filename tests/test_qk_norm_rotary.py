"""q/k RMSNorm + rotary in one launch (issue 23): every backend against a float64 oracle written
from the definition, and against the unfused chain of fastlm's own ops (rms_norm, then rotary).

The oracle normalises in float64 (over each head, or over all of a token's heads: OLMo-2), weights
by w + weight_offset, and rotates with test_rotary's float64 oracles (complex multiplication for
interleaved pairs, rotate_half for the others). Tolerances follow fastlm.testing: the yardstick
is the reference run in the test dtype without upcasting. bfloat16 runs on a GPU only (the
interpreter truncates bfloat16 casts).
"""

from __future__ import annotations

import dis
import importlib

import pytest
import torch

import fastlm
from fastlm.kernels import rotary as kernels
from fastlm.ops import rotary as rotary_ops
from fastlm.reference import rotary as ref
from fastlm.testing import assert_close

from .conftest import DEVICE, ON_GPU
from .test_rotary import kernel_runs, make, oracle, tables  # noqa: F401  (kernel_runs is a fixture)

BACKENDS = ["torch", "triton"]
EPS32 = torch.finfo(torch.float32).eps


def oracle_qkn(q, k, qw, kw, cos, sin, eps, position_ids=None, interleaved=False, weight_offset=0.0,
               norm_over="heads"):
    """float64: x / sqrt(mean(x^2) + eps) * (w + offset), then RoPE (test_rotary's oracle)."""
    def one(x, w):
        x = x.double()
        if norm_over == "all":
            flat = x.flatten(-2)
            n = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps) * (w.double() + weight_offset)
            n = n.view(x.shape)
        else:
            n = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * (w.double() + weight_offset)
        return oracle(n, cos, sin, position_ids, interleaved)
    return one(q, qw), one(k, kw)


def weights(H, Hk, D, norm_over, dtype=torch.float32):
    n_q, n_k = (D, D) if norm_over == "heads" else (H * D, Hk * D)
    return (1 + 0.5 * make((n_q,))).to(dtype), (1 + 0.5 * make((n_k,))).to(dtype)


def _skip_unrunnable(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("bfloat16 casts truncate under the Triton interpreter: checked on a GPU")


def check(backend, q, k, qw, kw, cos, sin, eps=None, position_ids=None, interleaved=False, weight_offset=0.0,
          norm_over="heads", leaves=None):
    """Forward and backward (q, k and both weights) against the float64 oracle, the yardstick the
    reference in the test dtype without upcast. ``leaves``: the tensors the gradients are taken
    for (q and k, or the packed tensor they are views of)."""
    leaves = leaves if leaves is not None else [q, k]
    e = EPS32 if eps is None else eps
    with fastlm.use_backend(backend):
        qo, ko = fastlm.qk_norm_rotary(q, k, qw, kw, cos, sin, eps, position_ids, interleaved,
                                       weight_offset=weight_offset, norm_over=norm_over)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == q.dtype and qo.is_contiguous()
    dq, dk = make(qo.shape, q.dtype), make(ko.shape, k.dtype)
    grads = torch.autograd.grad((qo, ko), leaves + [qw, kw], (dq, dk))

    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves + [qw, kw]]
    # q and k as the same views of the float64 leaves
    q64, k64 = _same_views(q, k, leaves, leaves64)
    wq, wk = oracle_qkn(q64, k64, leaves64[-2], leaves64[-1], cos, sin, e, position_ids, interleaved, weight_offset,
                        norm_over)
    g64 = torch.autograd.grad((wq, wk), leaves64, (dq.double(), dk.double()))

    leaves_y = [t.detach().clone().requires_grad_(True) for t in leaves + [qw, kw]]
    qy, ky = _same_views(q, k, leaves, leaves_y)
    yq, yk = ref.qk_norm_rotary(qy, ky, leaves_y[-2], leaves_y[-1], cos.to(q.dtype), sin.to(q.dtype), e,
                                position_ids, interleaved, weight_offset, False, norm_over, upcast=False)
    gy = torch.autograd.grad((yq, yk), leaves_y, (dq, dk))
    assert_close(qo, wq, yq, "q_out")
    assert_close(ko, wk, yk, "k_out")
    names = [f"grad of leaf {i}" for i in range(len(leaves))] + ["grad of q_weight", "grad of k_weight"]
    for got, want, yard, name in zip(grads, g64, gy, names):
        assert_close(got, want, yard, name)
    return (qo, ko), grads


def _same_views(q, k, leaves, new_leaves):
    """q and k rebuilt as the same views of ``new_leaves`` as they are of ``leaves``."""
    if leaves[0] is q:
        return new_leaves[0], new_leaves[1]
    base = new_leaves[0]
    return base.as_strided(q.shape, q.stride(), q.storage_offset()), base.as_strided(k.shape, k.stride(),
                                                                                     k.storage_offset())


# ----------------------------------------------------------------------------- against the oracle

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_over", ["heads", "all"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_against_the_oracle(backend, dtype, norm_over, interleaved):
    """GQA head counts (5 and 2), an odd seqlen, the whole head rotated."""
    _skip_unrunnable(backend, dtype)
    B, S, H, Hk, D = 2, 7, 5, 2, 32
    q, k = make((B, S, H, D), dtype).requires_grad_(True), make((B, S, Hk, D), dtype).requires_grad_(True)
    qw, kw = (w.requires_grad_(True) for w in weights(H, Hk, D, norm_over))
    cos, sin = tables(S, D)
    check(backend, q, k, qw, kw, cos, sin, norm_over=norm_over, interleaved=interleaved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D, R", [(64, 64), (128, 128), (96, 96), (128, 64), (80, 32), (17, 16), (33, 8)])
@pytest.mark.parametrize("norm_over", ["heads", "all"])
def test_head_dims_and_partial_rotary(backend, D, R, norm_over):
    """Head dims at and past the tile edges (96: a pair tile of 64 for 48 pairs), odd head dims,
    partial rotary (the pass-through features are normalised too)."""
    B, S, H, Hk = 1, 5, 3, 1
    q, k = make((B, S, H, D)).requires_grad_(True), make((B, S, Hk, D)).requires_grad_(True)
    qw, kw = (w.requires_grad_(True) for w in weights(H, Hk, D, norm_over))
    cos, sin = tables(S, R)
    check(backend, q, k, qw, kw, cos, sin, norm_over=norm_over, interleaved=D % 4 == 1)


@pytest.mark.parametrize("S", [1, 63, 64, 65])
@pytest.mark.parametrize("norm_over", ["heads", "all"])
def test_seqlen_at_block_edges(S, norm_over):
    """D = 64: BLOCK_S is 64 tokens per program; one below, at and above."""
    B, H, Hk, D = 1, 2, 1, 64
    assert kernels.qk_norm_rotary_blocks(S, D, D, 1)[0] <= 64
    q, k = make((B, S, H, D)).requires_grad_(True), make((B, S, Hk, D)).requires_grad_(True)
    qw, kw = (w.requires_grad_(True) for w in weights(H, Hk, D, norm_over))
    cos, sin = tables(S, D)
    check("triton", q, k, qw, kw, cos, sin, norm_over=norm_over)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["(B, S)", "(S,)", "per-sequence tables", "shared 3-D tables + (B, S)"])
def test_position_ids_and_table_forms(backend, kind):
    B, S, H, Hk, D, S_max = 2, 6, 2, 2, 16, 20
    q, k = make((B, S, H, D)).requires_grad_(True), make((B, S, Hk, D)).requires_grad_(True)
    qw, kw = (w.requires_grad_(True) for w in weights(H, Hk, D, "heads"))
    cos, sin = tables(S_max, D)
    pos = None
    if kind == "(B, S)":
        pos = torch.randint(0, S_max, (B, S), device=DEVICE)
    elif kind == "(S,)":
        pos = torch.arange(7, 7 + S, device=DEVICE)
    with fastlm.use_backend(backend):
        got = fastlm.qk_norm_rotary(q, k, qw, kw, cos, sin, position_ids=pos)
    if kind.endswith("tables") or kind.startswith("shared"):
        # per-sequence (B, S_max, R/2) tables: sequence b reads its own rows
        angles = torch.randint(0, S_max, (B, S_max), device=DEVICE)
        c3, s3 = cos[angles], sin[angles]  # (B, S_max, R/2)
        if kind.startswith("shared"):
            c3, s3 = c3[:1], s3[:1]
            pos = torch.randint(0, S_max, (B, S), device=DEVICE)
        with fastlm.use_backend(backend):
            got = fastlm.qk_norm_rotary(q, k, qw, kw, c3, s3, position_ids=pos)
        rows = torch.arange(S, device=DEVICE) if pos is None else pos
        bidx = torch.arange(B, device=DEVICE)[:, None]
        cb, sb = c3.expand(B, -1, -1)[bidx, rows.expand(B, S)], s3.expand(B, -1, -1)[bidx, rows.expand(B, S)]
        want = _oracle_with_rows(q, k, qw, kw, cb, sb)
    else:
        want = oracle_qkn(q, k, qw, kw, cos, sin, EPS32, pos)
    for a, b, name in zip(got, want, ("q_out", "k_out")):
        assert_close(a, b, None, name, atol=1e-5)
    gq, gk, gqw, gkw = torch.autograd.grad(got, (q, k, qw, kw), (torch.ones_like(got[0]), torch.ones_like(got[1])))
    wgq, wgk, wgqw, wgkw = torch.autograd.grad(want, (q, k, qw, kw), (torch.ones_like(want[0]),
                                                                      torch.ones_like(want[1])))
    for a, b, name in ((gq, wgq, "dq"), (gk, wgk, "dk"), (gqw, wgqw, "dq_weight"), (gkw, wgkw, "dk_weight")):
        assert_close(a, b, None, name, atol=1e-4)


def _oracle_with_rows(q, k, qw, kw, cb, sb):
    """The oracle with the tables already gathered per token: (B, S, R/2), float64."""
    def one(x, w):
        x = x.double()
        n = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS32) * w.double()
        c, s = cb.double()[:, :, None], sb.double()[:, :, None]
        half = c.shape[-1]
        a, b = n[..., :half], n[..., half:2 * half]
        return torch.cat((a * c - b * s, b * c + a * s, n[..., 2 * half:]), -1)
    return one(q, qw), one(k, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_over", ["heads", "all"])
@pytest.mark.parametrize("layout", ["(B, S, 3, H, D)", "(B, S, H, 3, D) sliced"])
def test_views_of_a_packed_projection(backend, norm_over, layout):
    """q and k as views of one fused qkv projection, read in place; the gradient lands in the
    packed tensor's q and k slices (v's slice gets none)."""
    B, S, H, D = 2, 5, 3, 24
    if layout.startswith("(B, S, 3"):
        qkv = make((B, S, 3, H, D)).requires_grad_(True)
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    else:
        qkv = make((B, S, H, 3, D + 8)).requires_grad_(True)
        q, k = qkv[:, :, :, 0, :D], qkv[:, :, :, 1, 4:4 + D]
    assert not q.is_contiguous()
    qw, kw = (w.requires_grad_(True) for w in weights(H, H, D, norm_over))
    cos, sin = tables(S, 16)
    _, grads = check(backend, q, k, qw, kw, cos, sin, norm_over=norm_over, leaves=[qkv])
    untouched = grads[0][:, :, 2] if layout.startswith("(B, S, 3") else grads[0][:, :, :, 2]
    assert torch.equal(untouched, torch.zeros_like(untouched))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma_offset_and_explicit_eps(backend):
    B, S, H, Hk, D = 1, 4, 2, 1, 16
    q, k = make((B, S, H, D)).requires_grad_(True), make((B, S, Hk, D)).requires_grad_(True)
    qw, kw = (0.1 * make((D,))).requires_grad_(True), (0.1 * make((D,))).requires_grad_(True)
    cos, sin = tables(S, D)
    check(backend, q, k, qw, kw, cos, sin, eps=1e-6, weight_offset=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_weights_over_half_inputs(backend):
    B, S, H, Hk, D = 1, 5, 2, 2, 32
    q = make((B, S, H, D), torch.float16).requires_grad_(True)
    k = make((B, S, Hk, D), torch.float16).requires_grad_(True)
    qw, kw = weights(H, Hk, D, "heads")
    qw, kw = qw.requires_grad_(True), kw.to(torch.float16).requires_grad_(True)  # one of each
    (qo, _), grads = check(backend, q, k, qw, kw, *tables(S, D))
    assert grads[2].dtype == torch.float32 and grads[3].dtype == torch.float16


# ----------------------------------------------------------------------------- against fastlm's unfused chain

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_equals_the_unfused_chain_of_fastlm_ops(backend, dtype, interleaved):
    """rms_norm then rotary, fastlm's own ops on the same backend: the same result up to the one
    rounding the fused op saves (the chain rounds the norm's output to the dtype)."""
    B, S, H, Hk, D, R = 2, 9, 4, 2, 64, 48
    q, k = make((B, S, H, D), dtype).requires_grad_(True), make((B, S, Hk, D), dtype).requires_grad_(True)
    qw, kw = (w.to(dtype).requires_grad_(True) for w in weights(H, Hk, D, "heads"))
    cos, sin = tables(S + 4, R)
    pos = torch.arange(3, 3 + S, device=DEVICE)
    with fastlm.use_backend(backend):
        fused = fastlm.qk_norm_rotary(q, k, qw, kw, cos, sin, None, pos, interleaved)
        chain = (fastlm.rotary(fastlm.rms_norm(q, (D,), qw), cos, sin, pos, interleaved),
                 fastlm.rotary(fastlm.rms_norm(k, (D,), kw), cos, sin, pos, interleaved))
    dq, dk = make(q.shape, dtype), make(k.shape, dtype)
    g_fused = torch.autograd.grad(fused, (q, k, qw, kw), (dq, dk))
    g_chain = torch.autograd.grad(chain, (q, k, qw, kw), (dq, dk))
    want = oracle_qkn(q, k, qw, kw, cos, sin, EPS32, pos, interleaved)
    for a, b, w, name in zip(fused, chain, want, ("q_out", "k_out")):
        assert_close(a, w, b, name)  # the fused op within twice the chain's error
    tol = {torch.float32: 1e-5, torch.float16: 2e-2}[dtype]
    for a, b in zip(g_fused, g_chain):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_all_heads_equals_norm_over_the_whole_projection():
    """norm_over='all' is OLMo-2's order: rms_norm over the (H * D) projection, then the split into
    heads, then rotary."""
    B, S, H, Hk, D = 2, 5, 3, 1, 16
    q, k = make((B, S, H * D)).requires_grad_(True), make((B, S, Hk * D)).requires_grad_(True)
    qw, kw = (w.requires_grad_(True) for w in weights(H, Hk, D, "all"))
    cos, sin = tables(S, D)
    with fastlm.use_backend("triton"):
        fused = fastlm.qk_norm_rotary(q.view(B, S, H, D), k.view(B, S, Hk, D), qw, kw, cos, sin, norm_over="all")
        chain = (fastlm.rotary(fastlm.rms_norm(q, (H * D,), qw).view(B, S, H, D), cos, sin),
                 fastlm.rotary(fastlm.rms_norm(k, (Hk * D,), kw).view(B, S, Hk, D), cos, sin))
    for a, b in zip(fused, chain):
        torch.testing.assert_close(a, b)
    g_fused = torch.autograd.grad(fused, (q, k, qw, kw), (torch.ones_like(fused[0]), torch.ones_like(fused[1])))
    g_chain = torch.autograd.grad(chain, (q, k, qw, kw), (torch.ones_like(chain[0]), torch.ones_like(chain[1])))
    for a, b in zip(g_fused, g_chain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- Hugging Face's norms

def _hf_norm(kind, D, dtype):
    mod = {"qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm"),
           "olmo2": ("transformers.models.olmo2.modeling_olmo2", "Olmo2RMSNorm"),
           "gemma3": ("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm")}[kind]
    cls = getattr(pytest.importorskip(mod[0]), mod[1])
    norm = cls(D, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(0.3 * make((D,)))
    return norm.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["qwen3", "olmo2", "gemma3"])
def test_rounding_order_matches_hfs_norms(backend, kind):
    """With no rotation (angle 0) the op is the norm alone, rounded once: in float16 it equals
    each family's own RMSNorm module, given that family's options (Qwen3: the normalised x rounded
    to float16 before the weight; OLMo-2, Gemma 3: the product in float32, Gemma's 1 + w). The
    other rounding order differs: the option is what makes the match."""
    B, S, H, D = 2, 16, 4, 64
    dtype = torch.float16
    norm = _hf_norm(kind, H * D if kind == "olmo2" else D, dtype)
    q = make((B, S, H, D), dtype)
    zero = torch.zeros(S, D // 2, device=DEVICE)
    cos, sin = zero + 1, zero
    w = norm.weight.detach()
    opts = dict(eps=1e-6, weight_offset=1.0 if kind == "gemma3" else 0.0,
                norm_over="all" if kind == "olmo2" else "heads")
    cast = kind == "qwen3"
    want = norm(q.flatten(-2)).view(q.shape) if kind == "olmo2" else norm(q)
    with fastlm.use_backend(backend):
        got, _ = fastlm.qk_norm_rotary(q, q, w, w, cos, sin, cast_before_weight=cast, **opts)
        other, _ = fastlm.qk_norm_rotary(q, q, w, w, cos, sin, cast_before_weight=not cast, **opts)
    assert want.dtype == dtype
    # one float16 ulp at most (1 / sqrt vs rsqrt in float32 can move a rounding); torch's path is exact
    if backend == "torch":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        assert (got != want).float().mean() < 0.01
    assert (other != want).float().mean() > 10 * (got != want).float().mean() + 0.01


# ----------------------------------------------------------------------------- launches, contract, errors

def test_one_launch_forward_and_one_backward(kernel_runs):
    """q and k (GQA, views of a packed projection) normalised and rotated by one Triton launch;
    their gradients and both weights' by one more."""
    B, S, H, Hk, D = 2, 9, 4, 2, 32
    for norm_over in ("heads", "all"):
        kernel_runs.clear()
        qkv = make((B, S, H + 2 * Hk, D)).requires_grad_(True)
        q, k = qkv[:, :, :H], qkv[:, :, H:H + Hk]
        qw, kw = (w.requires_grad_(True) for w in weights(H, Hk, D, norm_over))
        cos, sin = tables(S, D)
        with fastlm.use_backend("triton"):
            qo, ko = fastlm.qk_norm_rotary(q, k, qw, kw, cos, sin, norm_over=norm_over)
            assert [r[0] for r in kernel_runs] == ["_qk_norm_rotary_fwd_kernel"]
            kernel_runs.clear()
            torch.autograd.grad((qo, ko), (qkv, qw, kw), (make(qo.shape), make(ko.shape)))
            assert [r[0] for r in kernel_runs] == ["_qk_norm_rotary_bwd_kernel"]


def test_outputs_fully_written_under_poison(monkeypatch):
    """Outputs and gradient buffers start as NaN (FASTLM_POISON): every element is written."""
    monkeypatch.setenv("FASTLM_POISON", "1")
    B, S, H, Hk, D = 1, 7, 3, 2, 40
    q, k = make((B, S, H, D)).requires_grad_(True), make((B, S, Hk, D)).requires_grad_(True)
    for norm_over in ("heads", "all"):
        qw, kw = (w.requires_grad_(True) for w in weights(H, Hk, D, norm_over))
        cos, sin = tables(S, 24)
        with fastlm.use_backend("triton"):
            qo, ko = fastlm.qk_norm_rotary(q, k, qw, kw, cos, sin, norm_over=norm_over)
            grads = torch.autograd.grad((qo, ko), (q, k, qw, kw), (make(qo.shape), make(ko.shape)))
        for t in (qo, ko) + grads:
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_path_and_the_twin_agree(backend):
    """The native path (reference + torch autograd) and the op (the twin) give the same numbers."""
    B, S, H, Hk, D = 2, 5, 2, 1, 24
    q, k = make((B, S, H, D)).requires_grad_(True), make((B, S, Hk, D)).requires_grad_(True)
    qw, kw = (w.requires_grad_(True) for w in weights(H, Hk, D, "heads"))
    cos, sin = tables(S, 16)
    with fastlm.use_backend(backend):
        a = fastlm.qk_norm_rotary(q, k, qw, kw, cos, sin, interleaved=True)
    b = rotary_ops._qkn_eager(q, k, qw, kw, cos, sin, None, EPS32, True, 0.0, False, False, False, backend)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    ga = torch.autograd.grad(a, (q, k, qw, kw), (torch.ones_like(a[0]), torch.ones_like(a[1])))
    gb = torch.autograd.grad(b, (q, k, qw, kw), (torch.ones_like(b[0]), torch.ones_like(b[1])))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_gradcheck_float64():
    B, S, H, Hk, D = 1, 3, 2, 1, 8
    for norm_over, offset in (("heads", 0.0), ("all", 1.0)):
        q = make((B, S, H, D)).double().requires_grad_(True)
        k = make((B, S, Hk, D)).double().requires_grad_(True)
        qw, kw = (w.double().requires_grad_(True) for w in weights(H, Hk, D, norm_over))
        cos, sin = tables(S, 6, dtype=torch.float64)

        def f(q, k, qw, kw):
            return fastlm.qk_norm_rotary(q, k, qw, kw, cos, sin, 1e-6, weight_offset=offset, norm_over=norm_over)
        assert torch.autograd.gradcheck(f, (q, k, qw, kw))
        # and through the op's backward (the custom op's path, float64 on the reference)
        def g(q, k, qw, kw):
            return rotary_ops._qkn_eager(q, k, qw, kw, cos, sin, None, 1e-6, False, offset, False, norm_over == "all",
                                         False, "torch")
        assert torch.autograd.gradcheck(g, (q, k, qw, kw))


def test_float64_runs_on_the_reference_and_explicit_triton_refuses():
    q = make((1, 3, 2, 8)).double()
    w = torch.ones(8, dtype=torch.float64, device=DEVICE)
    cos, sin = tables(3, 8, dtype=torch.float64)
    with fastlm.use_backend("triton"), pytest.raises(fastlm.BackendUnavailableError, match="float64"):
        fastlm.qk_norm_rotary(q, q, w, w, cos, sin)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    B, S, H, Hk, D = 1, 5, 2, 1, 24
    q, k = make((B, S, H, D)).requires_grad_(True), make((B, S, Hk, D)).requires_grad_(True)
    qw, kw = (w.requires_grad_(True) for w in weights(H, Hk, D, "heads"))
    qa, ka = make((B, S, H * D)).view(B, S, H, D), make((B, S, Hk * D)).view(B, S, Hk, D)
    wa, wka = weights(H, Hk, D, "all")
    cos, sin = tables(8, 16)
    pos = torch.randint(0, 8, (B, S), device=DEVICE)
    with fastlm.use_backend(backend):
        torch.library.opcheck(rotary_ops._qkn, (q, k, qw, kw, cos, sin, None, 1e-6, False, 0.0, False, False, False,
                                                None))
        torch.library.opcheck(rotary_ops._qkn, (q, k, qw, kw, cos, sin, pos, 1e-6, True, 1.0, True, False, False,
                                                backend))
        torch.library.opcheck(rotary_ops._qkn, (qa.transpose(1, 2), ka.transpose(1, 2), wa, wka, cos[None, :S],
                                                sin[None, :S], None, 1e-6, False, 0.0, False, True, True, None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    import torch._dynamo

    torch._dynamo.reset()

    def attention_inputs(qkv, qw, kw, cos, sin):
        return fastlm.qk_norm_rotary(qkv[:, :, 0], qkv[:, :, 1], qw, kw, cos, sin)

    qkv = make((2, 7, 3, 2, 32)).requires_grad_(True)
    qw, kw = (w.requires_grad_(True) for w in weights(2, 2, 32, "heads"))
    cos, sin = tables(7, 32)
    compiled = torch.compile(attention_inputs, fullgraph=True, backend="aot_eager")
    with fastlm.use_backend(backend):
        expected = attention_inputs(qkv, qw, kw, cos, sin)
        g_expected = torch.autograd.grad(sum(t.square().sum() for t in expected), [qkv, qw, kw])
        got = compiled(qkv, qw, kw, cos, sin)
        g_got = torch.autograd.grad(sum(t.square().sum() for t in got), [qkv, qw, kw])
    for a, b in zip(got + g_got, expected + g_expected):
        torch.testing.assert_close(a, b)


def _bad_cases():
    q, k = make((1, 4, 2, 8)), make((1, 4, 1, 8))
    w = torch.ones(8, device=DEVICE)
    cos, sin = tables(4, 8)
    f = fastlm.qk_norm_rotary
    return [
        ("q type", lambda: f(q.numpy(), k, w, w, cos, sin), TypeError, "q must be a Tensor"),
        ("q int", lambda: f(q.long(), k.long(), w, w, cos, sin), TypeError, "q must be a floating"),
        ("k dtype", lambda: f(q, k.half(), w, w, cos, sin), TypeError, "k has dtype"),
        ("q 3-D", lambda: f(q[0], k, w, w, cos, sin), ValueError, "q must be 4-D"),
        ("k head dim", lambda: f(q, make((1, 4, 1, 6)), w, w, cos, sin), ValueError, "k has shape"),
        ("k seqlen", lambda: f(q, make((1, 3, 1, 8)), w, w, cos, sin), ValueError, "k has shape"),
        ("q_weight shape", lambda: f(q, k, torch.ones(7, device=DEVICE), w, cos, sin), ValueError, "q_weight"),
        ("k_weight all", lambda: f(q, k, torch.ones(16, device=DEVICE), torch.ones(16, device=DEVICE), cos, sin,
                                  norm_over="all"),
         ValueError, "k_weight"),
        ("q_weight dtype", lambda: f(q, k, w.double(), w, cos, sin), TypeError, "q_weight"),
        ("norm_over", lambda: f(q, k, w, w, cos, sin, norm_over="head"), ValueError, "norm_over"),
        ("cos dtype", lambda: f(q, k, w, w, cos.double(), sin), TypeError, "cos"),
        ("cos 1-D", lambda: f(q, k, w, w, cos[0], sin[0]), ValueError, "cos"),
        ("sin shape", lambda: f(q, k, w, w, cos, sin[:, :2]), ValueError, "sin"),
        ("rotary dim", lambda: f(q, k, w, w, *tables(4, 10)), ValueError, "rotary dim"),
        ("cos batch", lambda: f(q, k, w, w, cos[None].expand(3, -1, -1), sin[None].expand(3, -1, -1)), ValueError,
         "batch"),
        ("short tables", lambda: f(q, k, w, w, *tables(3, 8)), ValueError, "seqlen"),
        ("position_ids dtype", lambda: f(q, k, w, w, cos, sin, None, torch.zeros(4)), TypeError, "position_ids"),
        ("position_ids shape", lambda: f(q, k, w, w, cos, sin, None, torch.zeros(5, dtype=torch.long)), ValueError,
         "position_ids"),
        ("position outside", lambda: f(q.cpu(), k.cpu(), w.cpu(), w.cpu(), cos.cpu(), sin.cpu(), None,
                                       torch.full((4,), 9)), ValueError, "position_ids"),
        ("eps", lambda: f(q, k, w, w, cos, sin, -1.0), ValueError, "eps"),
        ("weight_offset", lambda: f(q, k, w, w, cos, sin, weight_offset=True), ValueError, "weight_offset"),
        ("interleaved", lambda: f(q, k, w, w, cos, sin, None, None, 1), TypeError, "interleaved"),
        ("cast_before_weight", lambda: f(q, k, w, w, cos, sin, cast_before_weight="yes"), TypeError,
         "cast_before_weight"),
        ("weight device", lambda: f(q, k, w.to("meta"), w, cos, sin), ValueError, "q_weight is on"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, call, exc, word = case
    with pytest.raises(exc, match=word):
        call()


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_over", ["heads", "all"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_real_sizes(dtype, norm_over, D):
    if not ON_GPU:
        pytest.skip("needs a GPU")
    B, S, H, Hk = 2, 1000, 16, 4
    q, k = make((B, S, H, D), dtype).requires_grad_(True), make((B, S, Hk, D), dtype).requires_grad_(True)
    qw, kw = (w.requires_grad_(True) for w in weights(H, Hk, D, norm_over))
    check("triton", q, k, qw, kw, *tables(S, D), norm_over=norm_over)


# ----------------------------------------------------------------------------- the Hugging Face swap

def _hf_family(kind):
    pytest.importorskip("transformers")
    from .test_hf_rotary import FAMILIES
    return FAMILIES[kind](small=True)


@pytest.mark.parametrize("kind", ["qwen3", "olmo2", "gemma3"])
def test_hf_swap_with_fastlm_norms_and_revert(kind):
    """ft.apply (fastlm's norm swap first, which class-swaps the q/k norm modules too): the
    attention still fuses, the forward's statements other than the norms and the rotary are
    HF's (the same file and line numbers), and revert restores HF's classes."""
    from fastlm.integrations import transformers as ft

    from .test_hf_rotary import inputs
    model = _hf_family(kind)
    ids, mask, _ = inputs(kind)
    expected = model(input_ids=ids, attention_mask=mask).logits
    classes = {n: type(m) for n, m in model.named_modules()}
    handle = ft.apply(model, attention=False, loss=False, mlp=False)
    fused = [n for n, w in handle if w.startswith("qk_norm_rotary: ")]
    assert len(fused) == model.config.num_hidden_layers
    attn = model.get_submodule(fused[0])
    original = classes[fused[0]].forward
    while hasattr(original, "__wrapped__"):
        original = original.__wrapped__
    inner = type(attn).forward
    while hasattr(inner, "__wrapped__"):
        inner = inner.__wrapped__
    assert inner.__code__.co_filename == original.__code__.co_filename
    lines = {line for _, line in dis.findlinestarts(inner.__code__) if line}
    def_line = inner.__code__.co_firstlineno  # the def (the decorators are not recompiled)
    assert lines - {def_line} and lines - {def_line} <= {line for _, line in dis.findlinestarts(original.__code__)}
    assert "q_norm" not in inner.__code__.co_names and "_fastlm_qk_norm_rotary" in inner.__code__.co_names
    with fastlm.use_backend("triton"):
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    handle.revert()
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_hf_calls_the_fused_op_cannot_take_run_hfs_norms(monkeypatch):
    """A forward hook on a q_norm module (the fused op would skip it), and float32 norm weights
    over float16 activations in Qwen3 (HF's promotion gives float32 q and k): those calls run
    HF's norm modules, then the rotary swap's function; the results are HF's."""
    from fastlm.integrations import hf_rotary as hr

    from .test_hf_rotary import inputs, swap
    model = _hf_family("qwen3")
    ids, mask, _ = inputs("qwen3")
    seen = []
    model.model.layers[0].self_attn.q_norm.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    expected = model(input_ids=ids, attention_mask=mask).logits
    fused = {"n": 0}
    real = hr.qk_norm_rotary_heads_first

    def counted(*args):
        fused["n"] += 1
        return real(*args)
    monkeypatch.setattr(hr, "qk_norm_rotary_heads_first", counted)
    handle = swap(model)
    seen.clear()
    got = model(input_ids=ids, attention_mask=mask).logits
    assert len(seen) == 1 and fused["n"] == model.config.num_hidden_layers - 1  # layer 0 ran HF's norms
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    handle.revert()

    # float32 tables with float16 q and k: HF's rotary promotes to float32 (the fused op would
    # return float16), so the swapped forward's call runs HF's norms and the rotary swap.
    attn = model.model.layers[1].self_attn
    handle = swap(model)
    call = _inner(type(attn).forward).__globals__["_fastlm_qk_norm_rotary"]
    q, k = make((2, 4, 5, 16), torch.float16), make((2, 2, 5, 16), torch.float16)
    cos, sin = (t.repeat(1, 2)[None] for t in tables(5, 16))
    fused["n"] = 0
    got = call(attn, q, k, cos, sin)
    hf = importlib.import_module(type(model).__module__).apply_rotary_pos_emb
    want = hf(attn.q_norm(q), attn.k_norm(k), cos, sin)
    assert fused["n"] == 0 and got[0].dtype == want[0].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    handle.revert()


def _inner(fn):
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def test_hf_unrecognised_norm_modules_keep_the_rotary_swap():
    """Norm modules that are not the family's (here torch.nn.RMSNorm: its own rounding) keep
    them called: the attention gets the plain rotary swap, with a one-time warning."""
    from fastlm.integrations import hf_rotary as hr

    from .test_hf_rotary import inputs, swap
    model = _hf_family("qwen3")
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.q_norm = torch.nn.RMSNorm(attn.head_dim, eps=1e-6, device=DEVICE)
        attn.k_norm = torch.nn.RMSNorm(attn.head_dim, eps=1e-6, device=DEVICE)
    ids, mask, _ = inputs("qwen3")
    expected = model(input_ids=ids, attention_mask=mask).logits
    hr._warned.discard("qk-norm:transformers.models.qwen3.modeling_qwen3.Qwen3Attention")
    with pytest.warns(UserWarning, match="not Qwen3RMSNorm"):
        handle = swap(model)
    assert [w for _, w in handle] == ["rotary: Qwen3Attention"] * model.config.num_hidden_layers
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
    handle.revert()


def test_hf_swapped_model_traces_without_graph_breaks():
    from .test_hf_rotary import inputs, swap
    model = _hf_family("qwen3")
    ids, mask, labels = inputs("qwen3")
    handle = swap(model)
    explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels)
    handle.revert()
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    ops = [str(node.target) for graph in explained.graphs for node in graph.graph.nodes]
    assert sum("fastlm.qk_norm_rotary" in op for op in ops) == model.config.num_hidden_layers, ops


# ----------------------------------------------------------------------------- fastlm's GPT with qk_norm

GPT_TINY = dict(vocab_size=61, max_seq_len=40, n_layer=2, n_head=4, n_kv_head=2, d_model=64, norm="rmsnorm",
                positions="rotary", activation="swiglu", bias=False)


def _gpt(**overrides):
    from fastlm.models import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**GPT_TINY, **overrides})).to(DEVICE)
    with torch.no_grad():  # give every parameter a real effect (the q/k norm weights too)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.normal_(0.0, 1.0 if "wte" in name else p.shape[1] ** -0.5)
    return model


def _unfused(q, k, q_weight, k_weight, cos, sin, eps=None, position_ids=None, interleaved=False, **kw):
    """The chain qk_norm_rotary replaces: fastlm.rms_norm of q and of k, then fastlm.rotary."""
    D = q.shape[-1]
    return (fastlm.rotary(fastlm.rms_norm(q, (D,), q_weight, eps), cos, sin, position_ids, interleaved),
            fastlm.rotary(fastlm.rms_norm(k, (D,), k_weight, eps), cos, sin, position_ids, interleaved))


def test_gpt_qk_norm_is_off_by_default_and_keeps_checkpoints():
    """Default GPTConfig: no q/k norm parameters (state_dicts of existing checkpoints load
    strictly), and the forward never calls the fused op; with qk_norm=True the weights are in
    the state_dict, ones at init, and a checkpoint without them does not load strictly."""
    from fastlm.models import GPT, GPTConfig
    cfg = {**GPT_TINY}
    plain = GPT(GPTConfig(**cfg))
    assert GPTConfig().qk_norm is False
    assert not [k for k in plain.state_dict() if "q_norm" in k or "k_norm" in k]
    GPT(GPTConfig(**cfg)).load_state_dict(plain.state_dict(), strict=True)
    normed = GPT(GPTConfig(**cfg, qk_norm=True))
    keys = [k for k in normed.state_dict() if "q_norm" in k or "k_norm" in k]
    assert sorted(keys) == sorted(f"blocks.{i}.attn.{n}.weight" for i in range(2) for n in ("q_norm", "k_norm"))
    assert all(torch.equal(normed.state_dict()[k], torch.ones(16)) for k in keys)
    with pytest.raises(RuntimeError, match="q_norm"):
        normed.load_state_dict(plain.state_dict(), strict=True)
    with pytest.raises(ValueError, match="qk_norm"):
        GPTConfig(**cfg, qk_norm=1)


def test_gpt_default_loss_does_not_touch_the_fused_op(monkeypatch):
    model = _gpt()
    ids = torch.randint(0, 61, (2, 9), device=DEVICE)
    before = model(ids, labels=ids)["loss"]

    def refuse(*a, **k):
        raise AssertionError("qk_norm_rotary called with qk_norm off")
    monkeypatch.setattr(rotary_ops, "qk_norm_rotary", refuse)
    assert torch.equal(model(ids, labels=ids)["loss"], before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt_qk_norm_equals_the_unfused_chain(backend, monkeypatch):
    """qk_norm=True: the loss and every gradient (the q/k norm weights too) equal the same model
    with the fused call replaced by fastlm's unfused chain (rms_norm of q and k, then rotary)."""
    small = dict(n_layer=1, d_model=32, n_head=2, n_kv_head=1) if backend == "triton" else {}  # the interpreter
    model = _gpt(qk_norm=True, **small)
    ids = torch.randint(0, 61, (2, 7 if small else 13), device=DEVICE)
    params = [p for _, p in model.named_parameters()]
    with fastlm.use_backend(backend):
        loss = model(ids, labels=ids)["loss"]
        grads = torch.autograd.grad(loss, params)
        monkeypatch.setattr(rotary_ops, "qk_norm_rotary", _unfused)
        want = model(ids, labels=ids)["loss"]
        want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    names = [n for n, _ in model.named_parameters()]
    assert any("q_norm" in n for n in names)
    for name, g, w in zip(names, grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)
        if "q_norm" in name or "k_norm" in name:
            assert g.abs().max() > 0, name
    monkeypatch.undo()
    # and the norm matters: the same weights without it give another loss
    off = _gpt(qk_norm=False, **small)
    off.load_state_dict({k: v for k, v in model.state_dict().items() if "_norm." not in k or "attn" not in k})
    assert not torch.allclose(off(ids, labels=ids)["loss"], loss.detach())


@pytest.mark.parametrize("backend, positions", [("torch", "rotary"), ("triton", "rotary"), ("torch", "learned")])
def test_gpt_qk_norm_generation_with_the_cache_equals_recomputing(backend, positions):
    """The cache's keys are normalised and rotated at their positions (position_ids past 0)."""
    small = dict(n_layer=1, d_model=32, n_head=2, n_kv_head=1) if backend == "triton" else {}  # the interpreter
    model = _gpt(qk_norm=True, positions=positions, **small).eval()
    prompt = torch.randint(0, 61, (2, 5), device=DEVICE)
    steps = 3 if small else 6
    with fastlm.use_backend(backend):
        fast = model.generate(prompt, max_new_tokens=steps, temperature=0)
        slow = prompt
        for _ in range(steps):
            slow = torch.cat([slow, model(slow)["logits"][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, slow)


def _torch_qk_norm_rope(x, w, cos, sin, eps, weight_offset, all_heads):
    """torch's own F.rms_norm, then the NeoX rotation written out with torch ops (float64)."""
    B, S, H, D = x.shape
    ww = w + weight_offset
    if all_heads:
        n = torch.nn.functional.rms_norm(x.reshape(B, S, H * D), (H * D,), ww, eps).reshape(B, S, H, D)
    else:
        n = torch.nn.functional.rms_norm(x, (D,), ww, eps)
    half = cos.shape[-1]
    c, s = cos[:S, None, :], sin[:S, None, :]
    a, b, rest = n[..., :half], n[..., half:2 * half], n[..., 2 * half:]
    return torch.cat([a * c - b * s, b * c + a * s, rest], dim=-1)


@pytest.mark.parametrize("all_heads", [False, True])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_reference_matches_torch_rms_norm_with_inf_and_nan(all_heads, weight_offset):
    """The float64 reference (the CPU path and the kernels' oracle) against torch's own
    F.rms_norm and the rotation by torch ops, with +inf, -inf and NaN in some rows, and
    partial rotary; and its closed-form backward against autograd through the same formula."""
    g = torch.Generator().manual_seed(7)
    B, S, H, Hk, D, R = 2, 5, 3, 2, 16, 12
    q = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, Hk, D, generator=g, dtype=torch.float64)
    q[0, 1, 0, 3], q[1, 2, 2, 0], k[0, 3, 1, 5], k[1, 0, 0, 7] = float("inf"), float("-inf"), float("nan"), 1e300
    qw = torch.randn(H * D if all_heads else D, generator=g, dtype=torch.float64)
    kw = torch.randn(Hk * D if all_heads else D, generator=g, dtype=torch.float64)
    cos, sin = fastlm.rotary_cos_sin(8, R, dtype=torch.float64)
    norm_over = "all" if all_heads else "heads"
    got_q, got_k = ref.qk_norm_rotary(q, k, qw, kw, cos, sin, 1e-6, weight_offset=weight_offset,
                                      norm_over=norm_over)
    for got, x, w in ((got_q, q, qw), (got_k, k, kw)):
        want = _torch_qk_norm_rope(x, w, cos, sin, 1e-6, weight_offset, all_heads)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert got_q.isnan().any() and got_k.isnan().any()  # (the special values reached the output)
    # the closed-form backward equals autograd through the formula (finite inputs)
    qf, kf = torch.randn_like(q).requires_grad_(), torch.randn_like(k).requires_grad_()
    qwf, kwf = qw.clone().requires_grad_(), kw.clone().requires_grad_()
    oq, ok = ref.qk_norm_rotary(qf, kf, qwf, kwf, cos, sin, 1e-6, weight_offset=weight_offset, norm_over=norm_over)
    dq_out, dk_out = torch.randn_like(oq), torch.randn_like(ok)
    want = torch.autograd.grad((oq, ok), (qf, kf, qwf, kwf), (dq_out, dk_out))
    got = ref.qk_norm_rotary_bwd(dq_out, dk_out, qf.detach(), kf.detach(), qw, kw, cos, sin, 1e-6,
                                 weight_offset=weight_offset, norm_over=norm_over)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
