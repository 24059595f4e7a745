"""The gradient of an additive attention mask (SDPA's float attn_mask that requires grad: T5's
relative position bias, ALiBi-like learned biases), against a float64 autograd oracle, with
torch's own path in the inputs' dtype as the yardstick (fastlm.testing's rule).

Under the interpreter the kernels use 16 x 16 tiles, so lengths 15, 16, 17 and 33 are block
edges there. The Triton kernel writes dS tiles into a poisoned (NaN) buffer, so a tile it
forgets to write fails here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops import attention as attn_ops
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE, ON_GPU

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def oracle(q, k, v, bias, scale=None, keep=None, dropout_p=0.0, softcap=0.0):
    """Attention with an additive bias as the formula reads, SDPA layout (B, H, L, E), by
    autograd-able torch ops; the bias is added after scaling and soft-capping."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s + bias, dim=-1)
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return p @ v


def inputs(B, H, Hk, L, S, E, bias_shape, dtype):
    q = torch.randn(B, H, L, E, device=DEVICE).to(dtype)
    k = torch.randn(B, Hk, S, E, device=DEVICE).to(dtype)
    v = torch.randn(B, Hk, S, E, device=DEVICE).to(dtype)
    bias = torch.randn(bias_shape, device=DEVICE).to(dtype)
    return q, k, v, bias


def check(backend, ours, ref, args):
    """ours(q, k, v, bias) against ref(...) in float64 and in the inputs' dtype: the output and
    the gradients of q, k, v and the bias. Returns fastlm's gradients."""
    q, k, v, bias = args
    leaves = [t.detach().requires_grad_(True) for t in args]
    with fastlm.use_backend(backend):
        out = ours(*leaves)
    dout = torch.randn(out.shape, device=out.device).to(out.dtype)
    with fastlm.use_backend(backend):
        got = torch.autograd.grad(out, leaves, dout)

    def run(cast):
        xs = [cast(t).detach().requires_grad_(True) for t in args]
        o = ref(*xs)
        return o, torch.autograd.grad(o, xs, cast(dout))

    r_out, r_grads = run(lambda t: t.double())
    e_out, e_grads = run(lambda t: t)
    dt = q.dtype
    S, E = k.shape[-2], v.shape[-1]
    assert_close(out, r_out, e_out, "out", atol=summation_floor(r_out, dt, S))
    # The backward's dp - delta cancels (FlashAttention's formulation, see test_attention):
    # eps |dO| |V| sqrt(E) on every dS, times |q| or |k| and the scale in dq and dk.
    eps = torch.finfo(dt).eps
    mag = {name: t.detach().abs().max().item() for name, t in zip("qkvo", (q, k, v, dout))}
    cancel = eps * mag["o"] * mag["v"] * E ** 0.5
    reduced = out.numel() // E // bias.numel() * bias.shape[-1]  # dS elements summed into one of the bias's
    for label, g, r, e, t in zip(["dq", "dk", "dv", "dbias"], got, r_grads, e_grads, args):
        assert g.shape == t.shape and g.dtype == t.dtype, (label, g.shape, g.dtype)
        if label == "dbias":
            atol = summation_floor(r, dt, max(reduced, S)) + cancel * reduced ** 0.5
        else:
            atol = summation_floor(r, dt, max(q.shape[-2], S)) + cancel * max(mag["q"], mag["k"]) * E ** -0.5
        assert_close(g, r, e, label, atol=atol)
    return got


def sdpa(**kw):
    return lambda q, k, v, bias: fastlm.scaled_dot_product_attention(q, k, v, attn_mask=bias, **kw)


def torch_sdpa(**kw):
    return lambda q, k, v, bias: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, **kw)


# ----------------------------------------------------------------------------- shapes, dtypes

BIAS_SHAPES = {"full": (2, 3, 17, 33), "t5": (1, 3, 17, 33), "padding": (2, 1, 1, 33), "2d": (17, 33)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(BIAS_SHAPES))
def test_bias_grad_matches_torch(backend, dtype, kind):
    """Each broadcast shape of the bias gets torch's gradient, summed over the broadcast dims."""
    check(backend, sdpa(), torch_sdpa(), inputs(2, 3, 3, 17, 33, 16, BIAS_SHAPES[kind], dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", [(15, 16), (16, 17), (33, 15), (1, 17)])
def test_bias_grad_tile_edges(backend, L, S):
    check(backend, sdpa(scale=0.4), torch_sdpa(scale=0.4), inputs(1, 2, 2, L, S, 16, (1, 2, L, S), torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_grad_gqa(backend):
    check(backend, sdpa(enable_gqa=True), torch_sdpa(enable_gqa=True),
          inputs(2, 4, 2, 17, 20, 16, (1, 4, 17, 20), torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_grad_3d_and_5d_inputs(backend):
    """No head dim (B, L, E) with an (L, S) bias; (N, G, H, L, E) with a (G, 1, L, S) bias."""
    three = [torch.randn(2, 14, 16, device=DEVICE)] + [torch.randn(2, 18, 16, device=DEVICE) for _ in range(2)] \
        + [torch.randn(14, 18, device=DEVICE)]
    check(backend, sdpa(), torch_sdpa(), three)
    five = [torch.randn(2, 2, 2, 11, 16, device=DEVICE) for _ in range(3)] + [torch.randn(2, 1, 11, 11, device=DEVICE)]
    check(backend, sdpa(), torch_sdpa(), five)


# ----------------------------------------------------------------------------- dropout, empty rows, softcap

@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_grad_with_dropout(backend):
    """The backward's dS uses the forward's dropout mask: compared with the oracle run on the
    mask the backend reports for the seed the call draws."""
    B, H, L, S, p = 2, 2, 17, 33, 0.25
    torch.manual_seed(7)
    seed = attn_ops.draw_dropout_seed(DEVICE)
    keep = attn_ops.dropout_mask(seed, B, H, L, S, p, backend, DEVICE)

    def ours(q, k, v, bias):
        torch.manual_seed(7)  # the call draws the same seed
        return fastlm.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)

    check(backend, ours, lambda q, k, v, bias: oracle(q, k, v, bias, keep=keep.to(q.dtype), dropout_p=p),
          inputs(B, H, H, L, S, 16, (1, H, L, S), torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_grad_rows_that_see_no_key(backend):
    """A bias of -inf on a whole row: that row's output and every gradient it sends are 0, and
    the bias's gradient is 0 there (torch gives NaN). The oracle: the same row with a finite
    bias, its output multiplied by 0 (so it sends no gradient either)."""
    q, k, v, bias = inputs(2, 2, 2, 17, 20, 16, (2, 2, 17, 20), torch.float32)
    bias[1, 0, 5] = float("-inf")
    bias[0, 1, 16, :7] = float("-inf")  # part of a row: only those keys get 0
    finite = bias.clone()
    finite[1, 0, 5] = 0.0
    seen = torch.ones(2, 2, 17, 1, device=DEVICE)
    seen[1, 0, 5] = 0.0

    def ref(q, k, v, b):
        return oracle(q, k, v, torch.where(torch.isneginf(bias), finite.to(b.dtype), b)) * seen.to(q.dtype)

    got = check(backend, sdpa(), ref, (q, k, v, bias))
    assert torch.equal(got[3][1, 0, 5], torch.zeros(20, device=DEVICE))
    assert torch.equal(got[3][0, 1, 16, :7], torch.zeros(7, device=DEVICE))
    assert torch.isfinite(got[3]).all() and all(torch.isfinite(g).all() for g in got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_grad_with_softcap(backend):
    """The custom op takes a mask and softcap together (the Hugging Face integration uses it):
    the bias is added after capping, so its gradient skips the cap's chain rule."""
    scale, cap = 0.3, 2.0

    def ours(q, k, v, bias):
        out, _ = torch.ops.fastlm.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, None,
                                            None, None, None, scale, False, -1, -1, cap, 0.0, 0, 0)
        return out.transpose(1, 2)

    check(backend, ours, lambda q, k, v, b: oracle(q, k, v, b, scale=scale, softcap=cap),
          inputs(2, 2, 2, 17, 19, 16, (1, 2, 17, 19), torch.float32))


# ----------------------------------------------------------------------------- the no-gradient path, op checks

@pytest.mark.parametrize("backend", BACKENDS)
def test_qkv_grads_unchanged_by_bias_grad(backend):
    """Asking for the bias's gradient changes nothing in q's, k's and v's. On the "torch"
    backend off CUDA the call is torch's own SDPA (issue 17), which runs its flash kernel
    without the bias's gradient and its math path with it: the same numbers up to float32
    rounding there, bit for bit on the kernels."""
    q, k, v, bias = inputs(2, 2, 2, 17, 20, 16, (1, 2, 17, 20), torch.float32)
    dout = torch.randn(2, 2, 17, 16, device=DEVICE)
    grads = []
    for bias_grad in (False, True):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        b = bias.detach().requires_grad_(bias_grad)
        with fastlm.use_backend(backend):
            out = fastlm.scaled_dot_product_attention(*leaves, attn_mask=b)
            grads.append(torch.autograd.grad(out, leaves + ([b] if bias_grad else []), dout))
    for a, b in zip(grads[0], grads[1][:3]):
        if backend == "torch" and not ON_GPU:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, b)
    assert grads[1][3].abs().sum() > 0


def test_boolean_masks_get_no_gradient():
    mask = torch.rand(17, 20, device=DEVICE) > 0.3
    q, k, v, _ = inputs(1, 2, 2, 17, 20, 16, (1,), torch.float32)
    q.requires_grad_(True)
    with fastlm.use_backend("torch"):
        out = fastlm.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (dq,) = torch.autograd.grad(out.sum(), [q])
    assert torch.isfinite(dq).all() and mask.grad is None


def test_cuda_backend_still_refuses_masks():
    reason = attn_ops._cuda_unsupported(*inputs(1, 2, 2, 8, 8, 64, (8, 8), torch.float16)[:3],
                                        torch.zeros(8, 8), None, None, 0.0, 0.0)
    assert reason is not None and "attn_mask" in reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_grad_opcheck(backend):
    q, k, v, bias = (t.requires_grad_(True) for t in inputs(1, 2, 1, 17, 19, 16, (1, 2, 17, 19), torch.float32))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    with fastlm.use_backend(backend):
        torch.library.opcheck(attn_ops._attention, (qt, kt, vt, bias, None, None, None, None, 0.25, False, -1, -1,
                                                    0.0, 0.0, 0, 0))
        t5 = bias.detach()[:, :, :1].clone().requires_grad_(True)  # (1, H, 1, S): broadcast over rows
        torch.library.opcheck(attn_ops._attention, (qt, kt, vt, t5, None, None, None, None, 0.25, False, -1, -1,
                                                    0.0, 0.0, 0, 0))
        out, lse = attn_ops._attention(qt, kt, vt, bias, None, None, None, None, 0.25, False, -1, -1, 0.0, 0.0, 0, 0)
        dout = torch.randn_like(out)
        torch.library.opcheck(attn_ops._attention_bwd, (dout, qt.detach(), kt.detach(), vt.detach(), out.detach(),
                                                        lse.detach(), t5.detach(), None, None, None, 0.25, False,
                                                        -1, -1, 0.0, 0.0, 0, 0, backend, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_grad_torch_compile_fullgraph(backend):
    import torch._dynamo

    torch._dynamo.reset()

    def block(q, k, v, bias):
        return fastlm.scaled_dot_product_attention(q, k, v, attn_mask=bias * 2.0).square().sum()

    args = [t.requires_grad_(True) for t in inputs(1, 2, 2, 17, 17, 16, (1, 2, 17, 17), torch.float32)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with fastlm.use_backend(backend):
        expected = block(*args)
        g_expected = torch.autograd.grad(expected, args)
        got = compiled(*args)
        g_got = torch.autograd.grad(got, args)
    torch.testing.assert_close(got, expected)
    for a, b in zip(g_got, g_expected):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- reduced inside the kernel

def _windowed(scale, window, cap=0.0):
    """The custom op with a window (and softcap), SDPA layout; the oracle adds -inf outside the
    window to the bias (constant there, so the bias's gradient is 0 on those positions)."""
    left, right = window

    def ours(q, k, v, bias):
        out, _ = torch.ops.fastlm.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, None,
                                            None, None, None, scale, False, left, right, cap, 0.0, 0, 0)
        return out.transpose(1, 2)

    def ref(q, k, v, bias):
        L, S = q.shape[-2], k.shape[-2]
        ok = torch.ones(L, S, dtype=torch.bool, device=q.device)
        i, j = torch.arange(L, device=q.device)[:, None], torch.arange(S, device=q.device)[None, :]
        if left >= 0:
            ok &= j >= i - left
        if right >= 0:
            ok &= j <= i + right
        return oracle(q, k, v, bias + torch.where(ok, 0.0, float("-inf")).to(bias.dtype), scale=scale, softcap=cap)

    return ours, ref


# Broadcast over the named dims of (B, H, L, S) = (2, 3, 17, 33): 17 and 33 cross the interpreter's
# 16 x 16 tiles, so several query blocks and batches/heads add into one element.
BROADCAST = {"B": (1, 3, 17, 33), "H": (2, 1, 17, 33), "L": (2, 3, 1, 33), "BH": (1, 1, 17, 33),
             "BHL": (1, 1, 1, 33), "S": (2, 3, 17, 1), "BS": (1, 3, 17, 1), "none": (2, 3, 17, 33)}


@pytest.mark.parametrize("dims", list(BROADCAST))
def test_bias_grad_buffer_has_the_masks_shape(monkeypatch, dims):
    """The Triton backward allocates the bias's gradient in the bias's own shape, never a dense
    (B, H, L, S) float32 buffer (17 GB at B=8, H=32, L=S=4096): the kernel reduces over the
    broadcast dims itself. Every allocation the launcher makes is recorded."""
    from fastlm.kernels import attention as kern

    B, H, L, S, E = 2, 3, 17, 33, 16
    shapes = []
    real = kern.empty

    def spy(shape, dtype, device):
        shapes.append((tuple(shape), dtype))
        return real(shape, dtype, device)

    monkeypatch.setattr(kern, "empty", spy)
    got = check("triton", sdpa(), torch_sdpa(), inputs(B, H, H, L, S, E, BROADCAST[dims], torch.float32))
    dense = [s for s in shapes if s[0] == (B, H, L, S)]
    assert not dense or dims == "none", f"a dense (B, H, L, S) buffer was allocated: {dense}"
    assert (BROADCAST[dims], torch.float32) in shapes, shapes
    assert max(math.prod(s) for s, _ in shapes) <= max(B * S * H * E, math.prod(BROADCAST[dims])), shapes
    assert got[3].shape == BROADCAST[dims]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [d for d in BROADCAST if d != "none"])
def test_bias_grad_broadcast_dims(backend, dims):
    check(backend, sdpa(), torch_sdpa(), inputs(2, 3, 3, 17, 33, 16, BROADCAST[dims], torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 4, 17, 20), (2, 1, 1, 20), (1, 1, 17, 20)], ids=str)
def test_bias_grad_broadcast_with_gqa(backend, shape):
    check(backend, sdpa(enable_gqa=True), torch_sdpa(enable_gqa=True), inputs(2, 4, 2, 17, 20, 16, shape,
                                                                               torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(-1, 0), (5, 3), (4, -1)], ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 35, 37), (1, 2, 35, 37), (2, 1, 1, 37)], ids=str)
def test_bias_grad_windows(backend, window, shape):
    """Sliding windows skip whole tiles (35 x 37 with 16 x 16 tiles): the bias's gradient is 0
    on every position no query sees, and the broadcast sums take only the visited ones."""
    ours, ref = _windowed(0.3, window)
    got = check(backend, ours, ref, inputs(2, 2, 2, 35, 37, 16, shape, torch.float32))
    if shape == (2, 2, 35, 37) and window == (5, 3):
        i, j = torch.arange(35, device=DEVICE)[:, None], torch.arange(37, device=DEVICE)[None, :]
        outside = (j < i - 5) | (j > i + 3)
        assert torch.equal(got[3][:, :, outside], torch.zeros_like(got[3][:, :, outside]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 1, 17, 33), (1, 1, 1, 33)], ids=str)
def test_bias_grad_broadcast_with_softcap(backend, shape):
    ours, ref = _windowed(0.3, (-1, -1), cap=2.0)
    check(backend, ours, ref, inputs(2, 2, 2, 17, 33, 16, shape, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 1, 1, 33), (1, 2, 17, 33)], ids=str)
def test_bias_grad_broadcast_with_dropout(backend, shape):
    B, H, L, S, p = 2, 2, 17, 33, 0.25
    torch.manual_seed(7)
    keep = attn_ops.dropout_mask(attn_ops.draw_dropout_seed(DEVICE), B, H, L, S, p, backend, DEVICE)

    def ours(q, k, v, bias):
        torch.manual_seed(7)  # the call draws the same seed
        return fastlm.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)

    check(backend, ours, lambda q, k, v, bias: oracle(q, k, v, bias, keep=keep.to(q.dtype), dropout_p=p),
          inputs(B, H, H, L, S, 16, shape, torch.float32))


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["t5", "padding"])
def test_gpu_bias_grad_real_sizes(dtype, kind):
    B, H, L, S = 2, 8, 1023, 1025
    shape = (1, H, L, S) if kind == "t5" else (B, 1, 1, S)
    check("triton", sdpa(), torch_sdpa(), inputs(B, H, H, L, S, 64, shape, dtype))
