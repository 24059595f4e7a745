"""The feed-forward block's matmul kernels (kernels/matmul.py) against float64.

The oracle is fastlm/reference/ffn.py (checked here against torch.nn.functional and autograd)
in float64 on the same inputs; the yardstick for the tolerance is torch's own eager
computation in the test dtype (fastlm.testing), and since the kernels add up K products in
another order than torch does, the summation floor over K is allowed on top.

Under the interpreter the tiles are 16 x 16 x 16 in groups of 3 row-tiles, so sizes
1, 7, 15, 16, 17, 33 and 113 hit every block edge (and a last, partial group); bfloat16
runs on a GPU only (the interpreter truncates its casts and multiplies its raw bits).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastlm.kernels import matmul as mm
from fastlm.reference import ffn
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE, ON_GPU

# bfloat16 only on a GPU: under the interpreter tl.dot multiplies its raw bits.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
ACTS = [None, *ffn.ACTIVATIONS]
# (M, N, K): every size of {1, 7, 15, 16, 17, 33, 113} in every role, not all products.
SHAPES = [(1, 1, 1), (7, 15, 16), (15, 16, 17), (16, 17, 15), (17, 33, 7), (33, 7, 113), (113, 33, 17),
          (16, 16, 16), (33, 113, 33)]
# How the operands of A @ B^T are laid out: contiguous; A a column slice of a wider tensor
# and B the transpose of a (K, N) tensor (w as w_t.T); both transposed views.
LAYOUTS = ["contiguous", "slice", "transposed"]


def make(rows, cols, dtype, layout="contiguous", scale=1.0):
    """A fresh (rows, cols) random tensor laid out as asked: contiguous, a column slice of a
    wider tensor, or the transpose of a (cols, rows) one."""
    if layout == "slice":
        return (torch.randn(rows, cols + 9, device=DEVICE) * scale).to(dtype)[:, 3:3 + cols]
    if layout == "transposed":
        return (torch.randn(cols, rows, device=DEVICE) * scale).to(dtype).t()
    return (torch.randn(rows, cols, device=DEVICE) * scale).to(dtype)


def operands(M, N, K, dtype, layout):
    """(a (M, K), b (N, K)) in the layout: a as named, b transposed unless contiguous."""
    a = make(M, K, dtype, layout)
    b = make(N, K, dtype, "contiguous" if layout == "contiguous" else "transposed")
    if layout != "contiguous" and M > 1 and K > 1:
        assert not a.is_contiguous()
    return a, b


def bias_of(n, dtype, strided):
    b = torch.randn(2 * n if strided else n, device=DEVICE).to(dtype)
    return b[::2] if strided else b


def eager_act(z, name):
    """torch.nn.functional's activation, in z's dtype: the yardstick."""
    if name is None:
        return z
    return {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
            "silu": F.silu}[name](z)


def d64(*ts):
    return [t.double() if t is not None else None for t in ts]


def close(out, ref, eager, name, terms):
    return assert_close(out, ref, eager, name, atol=summation_floor(ref, out.dtype, terms))


def _cases(names, dtypes=tuple(DTYPES)):
    """(name, dtype, shape, layout, with bias, save): every name in every dtype and layout,
    each (name, dtype) with and without bias and saving, shapes rotating through SHAPES."""
    out = []
    for i, (name, dtype, layout) in enumerate(itertools.product(names, dtypes, LAYOUTS)):
        out.append((name, dtype, SHAPES[(4 * i + 1) % len(SHAPES)], layout, i % 2 == 0, (i // 2) % 2 == 0))
    return out


def _ids(case):
    name, dtype, (M, N, K), layout, bias, save = case
    return f"{name}-{str(dtype)[6:]}-{M}x{N}x{K}-{layout}-{'bias' if bias else 'nobias'}-{'save' if save else 'nosave'}"


# ----------------------------------------------------------------------------- the reference itself

@pytest.mark.parametrize("name", ffn.ACTIVATIONS)
def test_reference_activations_match_torch_and_autograd(name):
    z = torch.randn(4096, dtype=torch.float64) * 4
    torch.testing.assert_close(ffn.act(z, name), eager_act(z, name), rtol=1e-12, atol=1e-12)
    zg = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(eager_act(zg, name).sum(), zg)
    torch.testing.assert_close(ffn.act_grad(z, name), grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", [*ffn.ACTIVATIONS, *ffn.GATED])
def test_reference_feed_forward_is_the_composition(activation):
    x = torch.randn(5, 3, 12)
    hidden = 2 * 20 if activation in ffn.GATED else 20
    w_in, b_in = torch.randn(hidden, 12), torch.randn(hidden)
    w_out, b_out = torch.randn(12, 20), torch.randn(12)
    z = F.linear(x, w_in, b_in)
    if activation in ffn.GATED:
        g, u = z.chunk(2, dim=-1)
        h = eager_act(g, ffn.GATED[activation]) * u
    else:
        h = eager_act(z, activation)
    expected = F.linear(h, w_out, b_out)
    torch.testing.assert_close(ffn.feed_forward(x, w_in, b_in, w_out, b_out, activation), expected,
                               rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- plain matmul

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matmul(shape, dtype):
    M, N, K = shape
    layout = LAYOUTS[SHAPES.index(shape) % 3]
    a, b = operands(M, N, K, dtype, layout)
    c = mm.matmul(a, b)
    assert c.dtype == dtype and c.shape == (M, N)
    a64, b64 = d64(a, b)
    close(c, a64 @ b64.t(), a @ b.t(), f"matmul {layout}", K)


def test_matmul_backward_layouts():
    """The block's backward calls: dx = dz @ w is matmul(dz, w.T), dw = dz^T @ x is
    matmul(dz.T, x.T): both with an operand whose K stride is not 1."""
    M, H, D = 33, 17, 15
    dz, w, x = make(M, H, torch.float32), make(H, D, torch.float32), make(M, D, torch.float32)
    dx = mm.matmul(dz, w.t())
    dw = mm.matmul(dz.t(), x.t())
    close(dx, dz.double() @ w.double(), dz @ w, "dx", H)
    close(dw, dz.double().t() @ x.double(), dz.t() @ x, "dw", M)


# ----------------------------------------------------------------------------- linear_fwd

@pytest.mark.parametrize("case", _cases(ACTS), ids=_ids)
def test_linear_fwd(case):
    activation, dtype, (M, N, K), layout, with_bias, save = case
    x, w = operands(M, N, K, dtype, layout)
    b = bias_of(N, dtype, strided=layout == "transposed") if with_bias else None
    y, z = mm.linear_fwd(x, w, b, activation, save_preact=save)
    assert y.dtype == dtype and y.shape == (M, N)
    x64, w64, b64 = d64(x, w, b)
    close(y, ffn.linear(x64, w64, b64, activation), eager_act(F.linear(x, w, b), activation), "y", K)
    if save:
        assert z.dtype == dtype
        close(z, ffn.linear(x64, w64, b64, None), F.linear(x, w, b), "z", K)
    else:
        assert z is None


# ----------------------------------------------------------------------------- gated_fwd

@pytest.mark.parametrize("case", _cases(list(ffn.GATED)), ids=_ids)
def test_gated_fwd(case):
    gated, dtype, (M, H, K), layout, with_bias, save = case
    x, w = operands(M, 2 * H, K, dtype, layout)
    b = bias_of(2 * H, dtype, strided=layout == "transposed") if with_bias else None
    h, gu = mm.gated_fwd(x, w, b, gated, save_gu=save)
    assert h.dtype == dtype and h.shape == (M, H)
    x64, w64, b64 = d64(x, w, b)
    g_e, u_e = F.linear(x, w, b).chunk(2, dim=-1)
    close(h, ffn.gated(x64, w64, b64, gated), eager_act(g_e, ffn.GATED[gated]) * u_e, "h", K)
    if save:
        assert gu.shape == (M, 2 * H) and gu.dtype == dtype
        close(gu, ffn.linear(x64, w64, b64, None), F.linear(x, w, b), "gu", K)
    else:
        assert gu is None


# ----------------------------------------------------------------------------- matmul_dact, matmul_dgated

def _dbias_close(dbias, ref_dz, eager_dz, M, K):
    """dbias (float32) against the column sums of the float64 dz; its error is the sum of M
    rows' errors, each of a K-term dot product."""
    assert dbias.dtype == torch.float32 and dbias.shape == (ref_dz.shape[1],)
    ref = ref_dz.sum(0)
    return assert_close(dbias, ref, eager_dz.sum(0), "dbias", atol=summation_floor(ref, torch.float32, M * K))


@pytest.mark.parametrize("case", _cases(ACTS), ids=_ids)
def test_matmul_dact(case):
    activation, dtype, (M, N, K), layout, _, _ = case
    a, b = operands(M, N, K, dtype, layout)
    z = make(M, N, dtype, "slice" if layout == "slice" else "contiguous", scale=2.0)
    dz, dbias = mm.matmul_dact(a, b, z, activation)
    assert dz.dtype == dtype and dz.shape == (M, N)
    a64, b64, z64 = d64(a, b, z)
    ref = (a64 @ b64.t()) * ffn.act_grad(z64, activation)
    eager = (a @ b.t()) * ffn.act_grad(z, activation)
    close(dz, ref, eager, "dz", K)
    _dbias_close(dbias, ref, eager, M, K)


@pytest.mark.parametrize("case", _cases(list(ffn.GATED)), ids=_ids)
def test_matmul_dgated(case):
    gated, dtype, (M, H, K), layout, _, _ = case
    a, b = operands(M, H, K, dtype, layout)
    gu = make(M, 2 * H, dtype, "slice" if layout == "slice" else "contiguous", scale=2.0)
    dgu, dbias = mm.matmul_dgated(a, b, gu, gated)
    assert dgu.dtype == dtype and dgu.shape == (M, 2 * H)
    name = ffn.GATED[gated]

    def formula(a, b, gu):
        dh = a @ b.t()
        g, u = gu[:, :H], gu[:, H:]
        return torch.cat([dh * u * ffn.act_grad(g, name), dh * ffn.act(g, name)], dim=1)

    ref, eager = formula(*d64(a, b, gu)), formula(a, b, gu)
    close(dgu, ref, eager, "dgu", K)
    _dbias_close(dbias, ref, eager, M, K)


# ----------------------------------------------------------------------------- edges and errors

def test_empty_and_zero_k():
    x, w, b = make(5, 0, torch.float32), make(7, 0, torch.float32), torch.randn(7, device=DEVICE)
    y, z = mm.linear_fwd(x, w, b, "gelu", save_preact=True)  # K = 0: y = act(bias)
    torch.testing.assert_close(y, ffn.act(b, "gelu").expand(5, 7))
    torch.testing.assert_close(z, b.expand(5, 7))
    assert mm.matmul(make(0, 4, torch.float32), make(3, 4, torch.float32)).shape == (0, 3)
    h, gu = mm.gated_fwd(make(4, 3, torch.float32), make(0, 3, torch.float32), None, "swiglu", save_gu=True)
    assert h.shape == (4, 0) and gu.shape == (4, 0)
    dz, dbias = mm.matmul_dact(make(0, 4, torch.float32), make(3, 4, torch.float32), make(0, 3, torch.float32),
                               "silu")
    assert dz.shape == (0, 3) and torch.equal(dbias, torch.zeros(3, device=DEVICE))


@pytest.mark.parametrize("case", [
    ("K mismatch", lambda: mm.matmul(torch.randn(3, 4), torch.randn(5, 6)), "last dimension"),
    ("3-D", lambda: mm.linear_fwd(torch.randn(2, 3, 4), torch.randn(5, 4)), "2-D"),
    ("bias", lambda: mm.linear_fwd(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)), "bias"),
    ("activation", lambda: mm.linear_fwd(torch.randn(3, 4), torch.randn(5, 4), activation="tanh"), "activation"),
    ("odd gated rows", lambda: mm.gated_fwd(torch.randn(3, 4), torch.randn(5, 4), None, "swiglu"), "even"),
    ("gated name", lambda: mm.gated_fwd(torch.randn(3, 4), torch.randn(6, 4), None, "silu"), "gated"),
    ("z shape", lambda: mm.matmul_dact(torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 4), "gelu"), "z"),
    ("gu shape", lambda: mm.matmul_dgated(torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 5), "geglu"), "gu"),
    ("dtypes", lambda: mm.matmul(torch.randn(3, 4), torch.randn(5, 4).half()), "dtype"),
], ids=lambda c: c[0])
def test_shape_mismatch_raises_value_error(case):
    _, call, word = case
    with pytest.raises(ValueError, match=word):
        call()


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
def test_gpu_large_bf16():
    """4096 x 4096 x 4096 in bfloat16 on the GPU's own tiles, every epilogue, and a bias
    gradient that is the same bit for bit on a second run."""
    M = N = K = 4096
    dtype = torch.bfloat16
    x, w = make(M, K, dtype), make(N, K, dtype, scale=K ** -0.5)
    b = torch.randn(N, device=DEVICE).to(dtype)
    x64, w64, b64 = d64(x, w, b)

    c = mm.matmul(x, w)
    close(c, x64 @ w64.t(), x @ w.t(), "matmul", K)
    y, z = mm.linear_fwd(x, w, b, "gelu", save_preact=True)
    close(y, ffn.linear(x64, w64, b64, "gelu"), F.gelu(F.linear(x, w, b)), "y", K)
    close(z, ffn.linear(x64, w64, b64, None), F.linear(x, w, b), "z", K)
    h, gu = mm.gated_fwd(x, w, b, "swiglu", save_gu=True)
    g_e, u_e = F.linear(x, w, b).chunk(2, dim=-1)
    close(h, ffn.gated(x64, w64, b64, "swiglu"), F.silu(g_e) * u_e, "h", K)

    dz, dbias = mm.matmul_dact(x, w, z, "gelu")
    ref = (x64 @ w64.t()) * ffn.act_grad(z.double(), "gelu")
    eager = (x @ w.t()) * ffn.act_grad(z, "gelu")
    close(dz, ref, eager, "dz", K)
    _dbias_close(dbias, ref, eager, M, K)
    assert torch.equal(dbias, mm.matmul_dact(x, w, z, "gelu")[1])

    wh = w[: N // 2]
    dgu, dbias = mm.matmul_dgated(x, wh, gu, "swiglu")
    dh = x64 @ wh.double().t()
    g, u = gu.double().chunk(2, dim=1)
    ref = torch.cat([dh * u * ffn.act_grad(g, "silu"), dh * ffn.act(g, "silu")], dim=1)
    dh_e = x @ wh.t()
    g_e, u_e = gu.chunk(2, dim=1)
    eager = torch.cat([dh_e * u_e * ffn.act_grad(g_e, "silu"), dh_e * ffn.act(g_e, "silu")], dim=1)
    close(dgu, ref, eager, "dgu", K)
    _dbias_close(dbias, ref, eager, M, K)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True])
def test_gpu_float32_follows_allow_tf32(tf32):
    """float32 is IEEE unless torch.backends.cuda.matmul.allow_tf32, then tf32 as cuBLAS."""
    M, N, K = 1023, 1025, 1024
    x, w = make(M, K, torch.float32, "slice"), make(N, K, torch.float32, "transposed")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        y, _ = mm.linear_fwd(x, w, None, "silu")
        eager = F.silu(x @ w.t())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    close(y, ffn.linear(x.double(), w.double(), None, "silu"), eager, "y", K)
