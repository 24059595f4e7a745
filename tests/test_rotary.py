"""Rotary position embedding: every backend against float64 oracles written from the definition.

Two oracles, independent of fastlm.reference: GPT-J's interleaved rotary as complex
multiplication (each feature pair (2j, 2j + 1) is a complex number times e^(i theta)), and
GPT-NeoX / Llama's as ``x * cos + rotate_half(x) * sin``. They are checked against each other
(the two pairings differ by a permutation of the rotary features) and against the reference.
The tolerance's yardstick is the reference run in the test dtype without upcasting
(fastlm.testing). Under the Triton interpreter bfloat16 casts truncate, so Triton's bfloat16
runs on a GPU only (marked gpu); the reference backend is checked in every dtype everywhere.
"""

from __future__ import annotations

import threading

import pytest
import torch

import fastlm
from fastlm.kernels import rotary as kernels
from fastlm.ops import rotary as rotary_ops
from fastlm.reference import rotary as ref
from fastlm.testing import assert_close

from .conftest import DEVICE, ON_GPU

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# head_dim -> a partial rotary dim (R/2 = 4, 10, 8, 16, 48: powers of two and not)
PARTIAL = {16: 8, 40: 20, 64: 16, 80: 32, 128: 96}


def _skip_unrunnable(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("bfloat16 casts truncate under the Triton interpreter: checked on a GPU")


def make(shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, dtype=torch.float32, device=device).to(dtype)


def tables(s_max, rotary_dim, dtype=torch.float32, base=10000.0):
    return fastlm.rotary_cos_sin(s_max, rotary_dim, base=base, device=DEVICE, dtype=dtype)


# ----------------------------------------------------------------------------- the oracles

def _angles(cos, sin, x, position_ids):
    """cos and sin at each token's position, float64, (B, S, 1, R/2)."""
    B, S = x.shape[:2]
    pos = torch.arange(S, device=x.device) if position_ids is None else position_ids
    pos = pos.long().expand(B, S)
    return cos.double()[pos][:, :, None, :], sin.double()[pos][:, :, None, :]


def rope_complex(x, cos, sin, position_ids=None):
    """GPT-J (interleaved): pair (2j, 2j+1) as a complex number, times e^(i theta_j)."""
    R = 2 * cos.shape[-1]
    c, s = _angles(cos, sin, x, position_ids)
    x64 = x.double()
    z = torch.view_as_complex(x64[..., :R].reshape(*x.shape[:-1], R // 2, 2).contiguous())
    rotated = torch.view_as_real(z * torch.complex(c, s)).flatten(-2)
    return torch.cat((rotated, x64[..., R:]), dim=-1)


def rope_rotate_half(x, cos, sin, position_ids=None):
    """GPT-NeoX / Llama: x * cos + rotate_half(x) * sin, the tables repeated to R."""
    R = 2 * cos.shape[-1]
    c, s = _angles(cos, sin, x, position_ids)
    c, s = torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)
    xr = x.double()[..., :R]
    half = torch.cat((-xr[..., R // 2:], xr[..., : R // 2]), dim=-1)
    return torch.cat((xr * c + half * s, x.double()[..., R:]), dim=-1)


def oracle(x, cos, sin, position_ids=None, interleaved=False):
    return (rope_complex if interleaved else rope_rotate_half)(x, cos, sin, position_ids)


def _to_halves(t, R):
    """Interleaved feature order (a0 b0 a1 b1 ...) -> halves (a0 a1 ... b0 b1 ...)."""
    return torch.cat((t[..., 0:R:2], t[..., 1:R:2], t[..., R:]), dim=-1)


def test_oracles_agree_with_each_other_and_the_reference():
    B, S, H, D, R = 2, 11, 3, 40, 24
    x = make((B, S, H, D), torch.float64)
    cos, sin = tables(20, R, torch.float64)
    pos = torch.randint(0, 20, (B, S), device=DEVICE)
    for p in (None, pos):
        inter = rope_complex(x, cos, sin, p)
        torch.testing.assert_close(_to_halves(inter, R), rope_rotate_half(_to_halves(x, R), cos, sin, p),
                                   rtol=0, atol=1e-13)
        for interleaved in (False, True):
            torch.testing.assert_close(ref.rotary(x, cos, sin, p, interleaved), oracle(x, cos, sin, p, interleaved),
                                       rtol=0, atol=1e-13)
    # position p turns feature pair j by p * base^(-2j/R): e_0 at position 3 -> (cos, sin) of 3 radians
    e0 = torch.zeros(1, 4, 1, 4, dtype=torch.float64, device=DEVICE)
    e0[..., 0] = 1.0
    cos, sin = tables(4, 4, torch.float64)
    out = rope_rotate_half(e0, cos, sin)
    torch.testing.assert_close(out[0, 3, 0], torch.tensor([torch.cos(torch.tensor(3.0)), 0.0,
                                                           torch.sin(torch.tensor(3.0)), 0.0],
                                                          dtype=torch.float64, device=DEVICE))


# ----------------------------------------------------------------------------- the check

def check(backend, x, cos, sin, position_ids=None, interleaved=False, dy=None):
    """fastlm forward and backward on ``backend`` against the float64 oracle, with the
    reference in x's dtype (no upcast) as the yardstick."""
    x = x.detach().requires_grad_(True)
    dy = make(x.shape, x.dtype) if dy is None else dy
    with fastlm.use_backend(backend):
        out = fastlm.rotary(x, cos, sin, position_ids, interleaved)
        (dx,) = torch.autograd.grad(out, [x], dy)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert dx.shape == x.shape and dx.dtype == x.dtype

    x64 = x.detach().double().requires_grad_(True)
    out64 = oracle(x64, cos, sin, position_ids, interleaved)
    (dx64,) = torch.autograd.grad(out64, [x64], dy.double())
    xe = x.detach().requires_grad_(True)
    ce, se = cos.to(x.dtype), sin.to(x.dtype)
    out_e = ref.rotary(xe, ce, se, position_ids, interleaved, upcast=False)
    (dx_e,) = torch.autograd.grad(out_e, [xe], dy)

    assert_close(out, out64, out_e, "output")
    assert_close(dx, dx64, dx_e, "grad of x")
    R = 2 * cos.shape[-1]
    assert torch.equal(out[..., R:], x[..., R:].detach()), "pass-through features changed"
    assert torch.equal(dx[..., R:], dy[..., R:]), "pass-through gradient changed"
    return out, dx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 40, 64, 80, 128])
@pytest.mark.parametrize("partial", [False, True], ids=["R=D", "R<D"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_head_dims(backend, dtype, D, partial, interleaved):
    _skip_unrunnable(backend, dtype)
    R = PARTIAL[D] if partial else D
    x = make((2, 19, 2, D), dtype)
    cos, sin = tables(23, R)
    check(backend, x, cos, sin, interleaved=interleaved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tables_in_the_input_dtype(backend, dtype):
    _skip_unrunnable(backend, dtype)
    x = make((1, 13, 3, 64), dtype)
    cos, sin = tables(13, 48, dtype)
    check(backend, x, cos, sin)
    check(backend, x, cos, sin, interleaved=True)


@pytest.mark.parametrize("D,R", [(128, 128), (64, 64), (80, 32), (41, 20)])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_seqlen_at_block_edges(D, R, interleaved):
    block_s = kernels.rotary_blocks(10**6, R, D)[0]
    for S in (1, 2, block_s - 1, block_s, block_s + 1):
        x = make((1, S, 1, D))
        cos, sin = tables(S + 3, R)
        check("triton", x, cos, sin, interleaved=interleaved)


# ----------------------------------------------------------------------------- positions

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["(B,S)", "(S,)", "(1,S)", "decode", "int32"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_position_ids(backend, kind, interleaved):
    B, S, H, D, R, s_max = 3, 9, 2, 40, 32, 50
    cos, sin = tables(s_max, R)
    if kind == "(B,S)":  # random, repeats, any order
        pos = torch.randint(0, s_max, (B, S), device=DEVICE)
    elif kind == "(S,)":  # a shared offset, as after a prefill
        pos = torch.arange(30, 30 + S, device=DEVICE)
    elif kind == "(1,S)":
        pos = torch.arange(41, 41 + S, device=DEVICE)[None]
    elif kind == "decode":  # one new token per sequence, each at its own cache length
        S = 1
        pos = torch.tensor([[0], [17], [s_max - 1]], device=DEVICE)
    else:
        pos = torch.randint(0, s_max, (B, S), device=DEVICE, dtype=torch.int32)
    x = make((B, S, H, D), torch.float16)
    check(backend, x, cos, sin, pos, interleaved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_position_ids_past_seqlen_and_model_usage(backend):
    """More tokens than table rows is fine when position_ids point inside the tables;
    positions 0..S-1 given explicitly equal positions None."""
    x = make((2, 12, 2, 16))
    cos, sin = tables(5, 16)
    pos = torch.randint(0, 5, (2, 12), device=DEVICE)
    check(backend, x, cos, sin, pos)
    cos, sin = tables(40, 16)
    with fastlm.use_backend(backend):
        a = fastlm.rotary(x, cos, sin)
        b = fastlm.rotary(x, cos, sin, torch.arange(12, device=DEVICE))
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [5, 7, -1])
def test_positions_outside_the_tables_raise(backend, bad):
    if ON_GPU:
        pytest.skip("checked on CPU tensors only (a check on CUDA would cost a host sync); see the gpu test")
    x = make((2, 4, 1, 16))
    cos, sin = tables(5, 16)
    pos = torch.tensor([[0, 1, 2, 3], [4, 0, bad, 1]], device=DEVICE)
    with fastlm.use_backend(backend), pytest.raises(ValueError, match="position_ids"):
        fastlm.rotary(x, cos, sin, pos)


# ----------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_views_of_packed_qkv(backend, interleaved):
    B, S, H, D, R = 2, 17, 3, 80, 32
    qkv = make((B, S, 3, H, D), torch.float16)  # one linear's output, unflattened
    for i in (0, 1):
        x = qkv[:, :, i]
        assert not x.is_contiguous()
        cos, sin = tables(S, R)
        dy = make((B, H, S, D), torch.float16).transpose(1, 2)  # a non-contiguous incoming gradient
        check(backend, x, cos, sin, interleaved=interleaved, dy=dy)
    # (B, H, S, D) storage read as (B, S, H, D); and Llama-style tables (S, R) whose first half is cos
    x = make((B, H, S, D)).transpose(1, 2)
    full = tables(S, R)
    cos, sin = (torch.cat((t, t), dim=-1)[:, : R // 2] for t in full)
    assert not cos.is_contiguous()
    check(backend, x, cos, sin, torch.arange(S, device=DEVICE).flip(0), interleaved)
    # every stride odd: features 2 apart, heads and tokens permuted; sin transposed, cos not
    x = make((D, H, S, B, 2)).permute(3, 2, 1, 0, 4)[..., 0]
    assert x.stride(-1) != 1
    cos, sin = tables(S, R)
    sin = sin.t().contiguous().t()
    assert cos.stride() != sin.stride()
    check(backend, x, cos, sin, interleaved=interleaved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    cos, sin = tables(8, 16)
    for shape in ((0, 4, 2, 16), (2, 0, 2, 16), (2, 4, 0, 16)):
        x = make(shape).requires_grad_(True)
        with fastlm.use_backend(backend):
            out = fastlm.rotary(x, cos, sin)
            (dx,) = torch.autograd.grad(out.sum(), [x])
        assert out.shape == x.shape and dx.shape == x.shape


# ----------------------------------------------------------------------------- gradients

def test_gradcheck_and_gradgradcheck_float64():
    x = make((2, 5, 2, 12), torch.float64).requires_grad_(True)
    cos, sin = tables(9, 8, torch.float64)
    pos = torch.randint(0, 9, (2, 5), device=DEVICE)
    for interleaved in (False, True):
        def fn(t):
            return fastlm.rotary(t, cos, sin, pos, interleaved)
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("pos_kind", [None, "(S,)", "(1,S)", "(B,S)"])
@pytest.mark.parametrize("D,R", [(16, 16), (40, 24)], ids=["R=D", "R<D"])
def test_cpu_path_matches_the_twin_and_the_oracles(interleaved, pos_kind, D, R):
    """The "torch" backend calls the reference formula with torch's autograd (issue 17): its
    output and gradient equal the oracles in float64 (every pairing, position_ids shape and a
    partial rotary dim), and the eager twin of the custom op (whose backward is the conjugate
    rotation) in float32, bit for bit forward."""
    B, S, H, s_max = 2, 7, 3, 12
    pos = {None: None, "(S,)": torch.randperm(s_max, device=DEVICE)[:S],
           "(1,S)": torch.randint(0, s_max, (1, S), device=DEVICE),
           "(B,S)": torch.randint(0, s_max, (B, S), device=DEVICE)}[pos_kind]
    for dtype in (torch.float64, torch.float32):
        cos, sin = tables(s_max, R, dtype)
        x = make((B, S, H, D), dtype).requires_grad_(True)
        dy = make((B, S, H, D), dtype)
        with fastlm.use_backend("torch"):
            out = fastlm.rotary(x, cos, sin, pos, interleaved)
            (dx,) = torch.autograd.grad(out, [x], dy)
            twin = rotary_ops._rotary_eager(x, cos, sin, pos, interleaved, False, None)
            (dx_twin,) = torch.autograd.grad(twin, [x], dy)
        assert out.is_contiguous() and out.grad_fn is not None and "eager" not in out.grad_fn.name()
        assert torch.equal(out, twin)
        if dtype == torch.float64:
            x64 = x.detach().requires_grad_(True)
            expected = oracle(x64, cos, sin, pos, interleaved)
            (dx64,) = torch.autograd.grad(expected, [x64], dy)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)
            torch.testing.assert_close(dx, dx64, rtol=0, atol=1e-13)
        torch.testing.assert_close(dx, dx_twin, rtol=1e-6, atol=1e-6)


def test_cpu_path_does_not_write_or_alias_its_input():
    x = make((1, 4, 2, 16))
    keep = x.clone()
    cos, sin = tables(4, 16)
    with fastlm.use_backend("torch"):
        for interleaved in (False, True):
            out = fastlm.rotary(x, cos, sin, None, interleaved)
            assert out.data_ptr() != x.data_ptr() and torch.equal(x, keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_to_the_tables(backend):
    x = make((1, 6, 2, 16)).requires_grad_(True)
    cos, sin = (t.requires_grad_(True) for t in tables(6, 16))
    with fastlm.use_backend(backend):
        fastlm.rotary(x, cos, sin).sum().backward()
    assert x.grad is not None
    assert cos.grad is None and sin.grad is None


def test_backward_uses_the_backend_of_the_forward(monkeypatch):
    calls = []
    real = kernels.rotary_fwd
    monkeypatch.setattr(kernels, "rotary_fwd", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    x = make((1, 6, 2, 16)).requires_grad_(True)
    cos, sin = tables(6, 16)
    with fastlm.use_backend("triton"):
        y = fastlm.rotary(x, cos, sin)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("g", torch.autograd.grad(y.sum(), [x])))
    t.start()
    t.join()
    assert calls == [False, True], "the backward did not run the kernel, conjugated, on the forward's backend"
    assert "g" in result


# ----------------------------------------------------------------------------- backends

def test_float64_runs_on_the_reference_and_explicit_triton_refuses():
    x = make((1, 4, 1, 16), torch.float64)
    cos, sin = tables(4, 16, torch.float64)
    torch.testing.assert_close(fastlm.rotary(x, cos, sin), oracle(x, cos, sin))
    with fastlm.use_backend("triton"), pytest.raises(fastlm.BackendUnavailableError, match="float64"):
        fastlm.rotary(x, cos, sin)
    with fastlm.use_backend("cuda"), pytest.raises(fastlm.BackendUnavailableError, match="cuda"):
        fastlm.rotary(x.float(), cos.float(), sin.float())


# ----------------------------------------------------------------------------- rotary_cos_sin

def test_rotary_cos_sin():
    cos, sin = fastlm.rotary_cos_sin(7, 10, base=500.0)
    assert cos.shape == sin.shape == (7, 5) and cos.dtype == torch.float32 and cos.device.type == "cpu"
    import math
    for p in range(7):
        for j in range(5):
            theta = p * 500.0 ** (-2 * j / 10)
            assert cos[p, j].item() == pytest.approx(math.cos(theta), abs=1e-7)
            assert sin[p, j].item() == pytest.approx(math.sin(theta), abs=1e-7)
    c64, s64 = fastlm.rotary_cos_sin(7, 10, base=500.0, dtype=torch.float64)
    assert torch.equal(c64.float(), cos) and torch.equal(s64.float(), sin)  # float64 first, then cast
    c16, _ = fastlm.rotary_cos_sin(7, 10, base=500.0, device=DEVICE, dtype=torch.float16)
    assert c16.dtype == torch.float16 and c16.device.type == DEVICE.type
    assert torch.equal(c16.cpu(), c64.half())
    # Llama's inv_freq: 1 / base ** (arange(0, dim, 2) / dim)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    c, s = fastlm.rotary_cos_sin(33, 64, dtype=torch.float64)
    torch.testing.assert_close(c, torch.outer(torch.arange(33.0, dtype=torch.float64), inv_freq).cos())
    torch.testing.assert_close(s, torch.outer(torch.arange(33.0, dtype=torch.float64), inv_freq).sin())


# ----------------------------------------------------------------------------- bad input

def _bad_cases():
    x = torch.randn(2, 4, 3, 16)
    cos, sin = fastlm.rotary_cos_sin(8, 16)
    return [
        ("x not a tensor", lambda: fastlm.rotary(x.tolist(), cos, sin), TypeError, "x"),
        ("integer x", lambda: fastlm.rotary(x.long(), cos, sin), TypeError, "x"),
        ("3-D x", lambda: fastlm.rotary(x[0], cos, sin), ValueError, "x must be 4-D"),
        ("cos not a tensor", lambda: fastlm.rotary(x, 1.0, sin), TypeError, "cos"),
        ("sin dtype", lambda: fastlm.rotary(x, cos, sin.double()), TypeError, "sin"),
        ("cos float16 with float32 x", lambda: fastlm.rotary(x, cos.half(), sin), TypeError, "cos"),
        ("cos device", lambda: fastlm.rotary(x, cos.to("meta"), sin), ValueError, "cos"),
        ("cos 1-D", lambda: fastlm.rotary(x, cos[0], sin[0]), ValueError, "cos"),
        ("cos sin mismatch", lambda: fastlm.rotary(x, cos, sin[:, :4]), ValueError, "sin"),
        ("rotary dim > head dim", lambda: fastlm.rotary(x, *fastlm.rotary_cos_sin(8, 18)), ValueError, "cos"),
        ("no rotary dim", lambda: fastlm.rotary(x, cos[:, :0], sin[:, :0]), ValueError, "cos"),
        ("seqlen > table", lambda: fastlm.rotary(x, cos[:3], sin[:3]), ValueError, "cos"),
        ("position_ids float", lambda: fastlm.rotary(x, cos, sin, torch.zeros(4)), TypeError, "position_ids"),
        ("position_ids bool", lambda: fastlm.rotary(x, cos, sin, torch.zeros(4, dtype=torch.bool)), TypeError,
         "position_ids"),
        ("position_ids list", lambda: fastlm.rotary(x, cos, sin, [0, 1, 2, 3]), TypeError, "position_ids"),
        ("position_ids shape", lambda: fastlm.rotary(x, cos, sin, torch.zeros(2, 5, dtype=torch.long)), ValueError,
         "position_ids"),
        ("position_ids batch", lambda: fastlm.rotary(x, cos, sin, torch.zeros(3, 4, dtype=torch.long)), ValueError,
         "position_ids"),
        ("position_ids device", lambda: fastlm.rotary(x, cos, sin, torch.zeros(4, dtype=torch.long, device="meta")),
         ValueError, "position_ids"),
        ("interleaved", lambda: fastlm.rotary(x, cos, sin, None, "yes"), TypeError, "interleaved"),
        ("odd rotary_dim", lambda: fastlm.rotary_cos_sin(8, 7), ValueError, "rotary_dim"),
        ("zero rotary_dim", lambda: fastlm.rotary_cos_sin(8, 0), ValueError, "rotary_dim"),
        ("negative seqlen", lambda: fastlm.rotary_cos_sin(-1, 8), ValueError, "seqlen"),
        ("float seqlen", lambda: fastlm.rotary_cos_sin(8.0, 8), ValueError, "seqlen"),
        ("base", lambda: fastlm.rotary_cos_sin(8, 8, base=0.0), ValueError, "base"),
        ("integer dtype", lambda: fastlm.rotary_cos_sin(8, 8, dtype=torch.int32), TypeError, "dtype"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, call, exc, word = case
    with pytest.raises(exc, match=word):
        call()


# ----------------------------------------------------------------------------- custom op contract

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = make((2, 5, 2, 24))[:, :, :, :20].requires_grad_(True)  # strided, partial rotary
    cos, sin = tables(9, 12)
    pos = torch.randint(0, 9, (2, 5), device=DEVICE)
    with fastlm.use_backend(backend):
        torch.library.opcheck(rotary_ops._rotary, (x, cos, sin, None, False, False, None))
        torch.library.opcheck(rotary_ops._rotary, (x, cos, sin, pos, True, False, None))
        torch.library.opcheck(rotary_ops._rotary, (x.detach(), cos, sin, pos[0], False, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    import torch._dynamo

    torch._dynamo.reset()

    def attention_inputs(qkv, cos, sin, pos):
        q, k = qkv[:, :, 0], qkv[:, :, 1]
        return fastlm.rotary(q, cos, sin, pos), fastlm.rotary(k, cos, sin, pos, interleaved=True)

    qkv = make((2, 7, 3, 2, 40)).requires_grad_(True)
    cos, sin = tables(16, 24)
    pos = torch.arange(5, 12, device=DEVICE)
    compiled = torch.compile(attention_inputs, fullgraph=True, backend="aot_eager")
    with fastlm.use_backend(backend):
        expected = attention_inputs(qkv, cos, sin, pos)
        g_expected = torch.autograd.grad(sum(t.square().sum() for t in expected), [qkv])
        got = compiled(qkv, cos, sin, pos)
        g_got = torch.autograd.grad(sum(t.square().sum() for t in got), [qkv])
    for a, b in zip(got + g_got, expected + g_expected):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- on a GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D,R", [(64, 64), (128, 128), (80, 32), (256, 64)])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_gpu_real_sizes(dtype, D, R, interleaved):
    B, S, H = 2, 4097, 32
    qkv = make((B, S, 3 * H, D), dtype)
    x = qkv[:, :, H:2 * H]  # k, a view of a packed projection
    cos, sin = tables(8192, R)
    check("triton", x, cos, sin, interleaved=interleaved)
    pos = torch.randint(0, 8192, (B, S), device=DEVICE)
    check("triton", x, cos, sin, pos, interleaved)


@pytest.mark.gpu
def test_gpu_positions_outside_the_tables_give_nan():
    """Not checked on CUDA (it would cost a host sync): the rotated features of such a token
    are NaN, never values read from past the tables; other tokens are right."""
    x = make((2, 4, 2, 32), torch.bfloat16)
    cos, sin = tables(5, 16)
    pos = torch.tensor([[0, 1, 2, 3], [4, 0, 5, -1]], device=DEVICE)
    with fastlm.use_backend("triton"):
        out = fastlm.rotary(x, cos, sin, pos)
    assert out[1, 2:, :, :16].isnan().all()
    assert torch.equal(out[1, 2:, :, 16:], x[1, 2:, :, 16:])
    ok = fastlm.rotary(x[:, :2], cos, sin, pos[:, :2])
    assert torch.equal(out[:, :2], ok)
