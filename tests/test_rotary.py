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


# ----------------------------------------------------------------------------- HF's apply_rotary_pos_emb

def _hf():
    """transformers' own apply_rotary_pos_emb (Llama's), the oracle of this interface."""
    return pytest.importorskip("transformers.models.llama.modeling_llama").apply_rotary_pos_emb


def _hf_or_formula():
    """HF's function as the yardstick where transformers is installed (the GPU machine may
    not have it), else None: check_pos_emb then uses HF's formula in the test dtype."""
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except ImportError:
        return None
    return apply_rotary_pos_emb


def hf_tables(Bc, S, R, dtype=torch.float32, base=10000.0):
    """cos, sin (Bc, S, R) as HF's rotary embedding makes them: cat((freqs, freqs)) at random
    per-sequence positions, computed in float64 then cast."""
    inv = base ** (-torch.arange(0, R, 2, dtype=torch.float64, device=DEVICE) / R)
    freqs = torch.randint(0, 4096, (Bc, S), device=DEVICE).double()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def hf_oracle(q, k, cos, sin, unsqueeze_dim):
    """HF's formula in float64, on the first R = cos.shape[-1] features (the rest pass
    through: HF itself does not broadcast R < D); (S, R) tables shared by the batch."""
    c, s = (cos[None] if cos.dim() == 2 else cos), (sin[None] if sin.dim() == 2 else sin)
    c, s = c.double().unsqueeze(unsqueeze_dim), s.double().unsqueeze(unsqueeze_dim)
    R = c.shape[-1]

    def one(x):
        x = x.double()
        xr = x[..., :R]
        half = torch.cat((-xr[..., R // 2:], xr[..., : R // 2]), dim=-1)
        return torch.cat((xr * c + half * s, x[..., R:]), dim=-1)
    return one(q), one(k)


def qk_shape(B, S, H, D, unsqueeze_dim):
    return (B, H, S, D) if unsqueeze_dim == 1 else (B, S, H, D)


def check_pos_emb(backend, q, k, cos, sin, unsqueeze_dim, dq=None, dk=None, eager=None):
    """fastlm.apply_rotary_pos_emb forward and backward against the float64 oracle, with the
    oracle's formula in q's dtype (the tables cast to it, as HF runs in bfloat16) as the
    yardstick, or ``eager`` (a function like HF's) when given."""
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    dq = make(q.shape, q.dtype) if dq is None else dq
    dk = make(k.shape, k.dtype) if dk is None else dk
    with fastlm.use_backend(backend):
        qe, ke = fastlm.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        gq, gk = torch.autograd.grad((qe, ke), (q, k), (dq, dk))
    for got, x in ((qe, q), (ke, k), (gq, q), (gk, k)):
        assert got.shape == x.shape and got.dtype == x.dtype
    assert qe.is_contiguous() and ke.is_contiguous()

    q64, k64 = (t.detach().double().requires_grad_(True) for t in (q, k))
    wq, wk = hf_oracle(q64, k64, cos, sin, unsqueeze_dim)
    w_gq, w_gk = torch.autograd.grad((wq, wk), (q64, k64), (dq.double(), dk.double()))
    qy, ky = (t.detach().requires_grad_(True) for t in (q, k))
    run = eager or (lambda a, b, c, s, unsqueeze_dim: tuple(t.to(q.dtype) for t in hf_oracle(a, b, c, s,
                                                                                            unsqueeze_dim)))
    yq, yk = run(qy, ky, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim=unsqueeze_dim)
    y_gq, y_gk = torch.autograd.grad((yq, yk), (qy, ky), (dq, dk))

    assert_close(qe, wq, yq, "q_embed")
    assert_close(ke, wk, yk, "k_embed")
    assert_close(gq, w_gq, y_gq, "grad of q")
    assert_close(gk, w_gk, y_gk, "grad of k")
    R = cos.shape[-1]
    assert torch.equal(qe[..., R:], q[..., R:].detach()) and torch.equal(ke[..., R:], k[..., R:].detach())
    assert torch.equal(gq[..., R:], dq[..., R:]) and torch.equal(gk[..., R:], dk[..., R:])
    return (qe, ke), (gq, gk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("cos_batch", ["per-batch", "shared", "2-D"])
def test_pos_emb_is_hfs_function(backend, dtype, unsqueeze_dim, cos_batch):
    """Against transformers' own apply_rotary_pos_emb: q and k with GQA head counts (5 and
    2), an odd seqlen; the tables per sequence, shared (1, S, R), or (S, R) (a form HF's
    function no longer broadcasts: the float64 oracle only)."""
    _skip_unrunnable(backend, dtype)
    hf = _hf()
    B, S, H, Hk, D = 3, 19, 5, 2, 64
    cos, sin = hf_tables(B if cos_batch == "per-batch" else 1, S, D)
    if cos_batch == "2-D":
        cos, sin = cos[0], sin[0]
    q = make(qk_shape(B, S, H, D, unsqueeze_dim), dtype)
    k = make(qk_shape(B, S, Hk, D, unsqueeze_dim), dtype)
    check_pos_emb(backend, q, k, cos, sin, unsqueeze_dim, eager=None if cos_batch == "2-D" else hf)
    if cos_batch != "2-D":  # the float64 oracle above is HF's function itself
        want = hf(q.double(), k.double(), cos.double(), sin.double(), unsqueeze_dim=unsqueeze_dim)
        for a, b in zip(hf_oracle(q, k, cos, sin, unsqueeze_dim), want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pos_emb_tables_in_the_input_dtype(backend, dtype):
    """HF's rotary embedding returns cos and sin in the model's dtype."""
    _skip_unrunnable(backend, dtype)
    cos, sin = hf_tables(2, 13, 32, dtype)
    for ud in (1, 2):
        check_pos_emb(backend, make(qk_shape(2, 13, 4, 32, ud), dtype), make(qk_shape(2, 13, 4, 32, ud), dtype),
                      cos, sin, ud, eager=_hf_or_formula())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Dq,Dk,R", [(40, 40, 16), (80, 48, 32), (40, 24, 24), (41, 33, 20)],
                         ids=["R<D", "q and k head dims differ", "k fully rotated", "odd"])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_pos_emb_partial_rotary(backend, Dq, Dk, R, unsqueeze_dim):
    """Tables narrower than the heads (fastlm's extension: HF's formula would not broadcast)
    rotate the first R features and pass the rest through, bit for bit, in q and k alike."""
    B, S = 2, 11
    cos, sin = hf_tables(B, S, R)
    q = make(qk_shape(B, S, 3, Dq, unsqueeze_dim), torch.float16)
    k = make(qk_shape(B, S, 1, Dk, unsqueeze_dim), torch.float16)
    check_pos_emb(backend, q, k, cos, sin, unsqueeze_dim)


@pytest.mark.parametrize("D,Dk,R", [(128, 128, 128), (64, 64, 64), (80, 72, 32)])
def test_pos_emb_seqlen_at_block_edges(D, Dk, R):
    """Token blocks one short of, at and past BLOCK_S; with R < D the pass-through features
    take several BLOCK_P tiles (the last one partial)."""
    block_s, _, block_p = kernels.rotary_blocks(10**6, R, max(D, Dk))
    assert R == D or block_p < D - R
    for S in (1, 2, block_s - 1, block_s, block_s + 1):
        cos, sin = hf_tables(2, S, R)
        check_pos_emb("triton", make((2, 3, S, D)), make((2, 1, S, Dk)), cos, sin, 1)


def test_tiles_stay_within_the_register_budget():
    """The pass-through tile is never larger than the pair tile (before it was capped, a
    partial rotary of 32 over head dim 128 copied (256, 128) tiles at about 250 registers)."""
    for S in (1, 7, 64, 4097):
        for D, R in ((128, 128), (128, 32), (256, 64), (80, 32), (41, 20), (1024, 2)):
            block_s, block_r, block_p = kernels.rotary_blocks(S, R, D)
            assert block_s * block_r <= kernels._TILE and block_s * block_p <= kernels._TILE, (S, D, R)
            assert block_p == 1 if D == R else block_p >= 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_pos_emb_views_of_a_packed_projection(backend, unsqueeze_dim):
    """q and k as Llama splits one fused qkv projection (B, S, (H + 2 Hk) * D): views, never
    contiguous, read in place; the incoming gradients non-contiguous too; and a feature stride
    of 2."""
    B, S, H, Hk, D = 2, 17, 4, 2, 32
    qkv = make((B, S, (H + 2 * Hk) * D), torch.float16).unflatten(-1, (H + 2 * Hk, D))
    q, k = qkv[:, :, :H], qkv[:, :, H:H + Hk]
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = hf_tables(B, S, D)
    dq = make((H, B, S, D), torch.float16).permute(1, 0, 2, 3)
    dk = make((Hk, B, S, D), torch.float16).permute(1, 0, 2, 3)
    if unsqueeze_dim == 2:
        dq, dk = dq.transpose(1, 2), dk.transpose(1, 2)
    assert not dq.is_contiguous()
    check_pos_emb(backend, q, k, cos, sin, unsqueeze_dim, dq, dk)
    # every feature second, and tables that are views of wider ones (a column stride of 2)
    wide = make(qk_shape(B, S, H, 2 * D, unsqueeze_dim))
    q2, k2 = wide[..., ::2], make(qk_shape(B, S, Hk, 2 * D, unsqueeze_dim))[..., 1::2]
    c2, s2 = (torch.stack((t, t), dim=-1).flatten(-2)[..., ::2] for t in hf_tables(1, S, D))
    assert c2.stride(-1) == 2 and q2.stride(-1) == 2
    check_pos_emb(backend, q2, k2, c2, s2, unsqueeze_dim)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pos_emb_empty_inputs(backend):
    cos, sin = hf_tables(2, 4, 16)
    for qs, ks in (((2, 3, 4, 16), (2, 0, 4, 16)), ((2, 0, 4, 16), (2, 2, 4, 16)), ((2, 0, 4, 16), (2, 0, 4, 16))):
        q, k = make(qs).requires_grad_(True), make(ks).requires_grad_(True)
        with fastlm.use_backend(backend):
            qe, ke = fastlm.apply_rotary_pos_emb(q, k, cos, sin)
            gq, gk = torch.autograd.grad((qe.sum() + ke.sum()), (q, k))
        assert qe.shape == q.shape and ke.shape == k.shape and gq.shape == q.shape and gk.shape == k.shape
        if q.numel():
            torch.testing.assert_close(qe, hf_oracle(q, k, cos, sin, 1)[0].float())
        if k.numel():
            torch.testing.assert_close(ke, hf_oracle(q, k, cos, sin, 1)[1].float())
    q, k = make((0, 3, 4, 16)), make((0, 1, 4, 16))  # no sequence: the tables' batch is 1
    with fastlm.use_backend(backend):
        qe, ke = fastlm.apply_rotary_pos_emb(q, k, cos[:1], sin[:1])
    assert qe.shape == q.shape and ke.shape == k.shape


def test_pos_emb_position_ids_is_unused_as_in_transformers():
    q, k = make((1, 2, 5, 16)), make((1, 2, 5, 16))
    cos, sin = hf_tables(1, 5, 16)
    for backend in BACKENDS:
        with fastlm.use_backend(backend):
            a = fastlm.apply_rotary_pos_emb(q, k, cos, sin)
            b = fastlm.apply_rotary_pos_emb(q, k, cos, sin, torch.arange(5, 0, -1, device=DEVICE)[None])
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def kernel_runs(monkeypatch):
    """Every Triton launch while the test runs: (kernel name, HAS_K, CONJUGATE). The launch
    itself runs outside any torch dispatch mode (the interpreter's own host copies are not
    the op's)."""
    from torch.utils._python_dispatch import _disable_current_modes
    seen = []
    kind = type(kernels._rotary_kernel)  # InterpretedFunction, or JITFunction on a GPU
    real = kind.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            seen.append((getattr(self, "fn", self).__name__, kwargs.get("HAS_K"), kwargs.get("CONJUGATE")))
        with _disable_current_modes():
            return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(kind, "run", run)
    return seen


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_pos_emb_is_one_launch_forward_and_one_backward(kernel_runs, unsqueeze_dim):
    """Issue 20: q and k are rotated by one Triton launch, and their gradients by one more;
    nothing else runs on the device but the outputs' allocation (no copy of a strided input,
    no position arange, no slicing kernel)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    B, S, H, Hk, D = 2, 9, 4, 2, 32
    qkv = make((B, S, H + 2 * Hk, D)).requires_grad_(True)
    q, k = qkv[:, :, :H], qkv[:, :, H:H + Hk]
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = hf_tables(B, S, D)
    allowed = {"empty", "fill_", "transpose", "slice", "unsqueeze", "view", "alias", "detach", "as_strided",
               "select", "expand"}
    if not ON_GPU:
        allowed.add("equal")  # the check of the tables' halves, on CPU tensors only (no launch)
    with fastlm.use_backend("triton"):
        with Ops() as ops:
            qe, ke = fastlm.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        assert kernel_runs == [("_rotary_kernel", True, False)]
        assert set(ops.names) <= allowed, sorted(set(ops.names) - allowed)
        dq, dk = make(qe.shape), make(ke.shape)
        kernel_runs.clear()
        with Ops() as ops:
            gq, gk = torch.autograd.grad((qe, ke), (q, k), (dq, dk))
        assert kernel_runs == [("_rotary_kernel", True, True)]
        assert set(ops.names) <= allowed, sorted(set(ops.names) - allowed)
    want = hf_oracle(q, k, cos, sin, unsqueeze_dim)
    torch.testing.assert_close(qe, want[0].float())
    torch.testing.assert_close(ke, want[1].float())


def test_pos_emb_only_one_output_used(kernel_runs):
    """A gradient for q_embed alone (k_embed unused) still flows: zeros for k, one launch."""
    q, k = make((1, 2, 5, 16)).requires_grad_(True), make((1, 1, 5, 16)).requires_grad_(True)
    cos, sin = hf_tables(1, 5, 16)
    with fastlm.use_backend("triton"):
        qe, _ = fastlm.apply_rotary_pos_emb(q, k, cos, sin)
        gq, gk = torch.autograd.grad(qe.square().sum(), (q, k), allow_unused=True)
    assert len(kernel_runs) == 2
    q64 = q.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(hf_oracle(q64, k, cos, sin, 1)[0].square().sum(), (q64,))
    torch.testing.assert_close(gq.double(), want, rtol=1e-5, atol=1e-5)
    assert gk is None or torch.equal(gk, torch.zeros_like(k))


def test_pos_emb_backward_uses_the_backend_of_the_forward(monkeypatch):
    calls = []
    real = kernels.rotary_fwd
    monkeypatch.setattr(kernels, "rotary_fwd", lambda *a, **kw: calls.append((a[5], kw["k"] is not None))
                        or real(*a, **kw))
    q, k = make((1, 2, 6, 16)).requires_grad_(True), make((1, 1, 6, 16)).requires_grad_(True)
    cos, sin = hf_tables(1, 6, 16)
    with fastlm.use_backend("triton"):
        qe, ke = fastlm.apply_rotary_pos_emb(q, k, cos, sin)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("g", torch.autograd.grad(qe.sum() + ke.sum(), [q, k])))
    t.start()
    t.join()
    assert calls == [(False, True), (True, True)], "the backward did not run the kernel, conjugated, on q and k"
    assert "g" in result


def test_pos_emb_gradcheck_and_gradgradcheck_float64():
    cos, sin = hf_tables(2, 3, 4, torch.float64)
    q, k = make((2, 2, 3, 6), torch.float64), make((2, 1, 3, 8), torch.float64)
    for call in (lambda a, b: fastlm.apply_rotary_pos_emb(a, b, cos, sin),
                 lambda a, b: rotary_ops._rotary_pos_emb_eager(a, b, cos, sin, 1, False, "torch"),
                 lambda a, b: rotary_ops._rotary_pos_emb(a, b, cos, sin, 1, False, "torch")):
        args = (q.requires_grad_(True), k.requires_grad_(True))
        assert torch.autograd.gradcheck(call, args)
        assert torch.autograd.gradgradcheck(call, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pos_emb_no_gradient_to_the_tables(backend):
    q, k = make((1, 2, 6, 16)).requires_grad_(True), make((1, 1, 6, 16)).requires_grad_(True)
    cos, sin = (t.requires_grad_(True) for t in hf_tables(1, 6, 16))
    with fastlm.use_backend(backend):
        qe, ke = fastlm.apply_rotary_pos_emb(q, k, cos, sin)
        (qe.sum() + ke.sum()).backward()
    assert q.grad is not None and k.grad is not None
    assert cos.grad is None and sin.grad is None


def test_pos_emb_float64_runs_on_the_reference_and_explicit_triton_refuses():
    cos, sin = hf_tables(1, 4, 16, torch.float64)
    q, k = make((1, 2, 4, 16), torch.float64), make((1, 1, 4, 16), torch.float64)
    got = fastlm.apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(got, hf_oracle(q, k, cos, sin, 1)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    with fastlm.use_backend("triton"), pytest.raises(fastlm.BackendUnavailableError, match="float64"):
        fastlm.apply_rotary_pos_emb(q, k, cos, sin)


def _pos_emb_bad_cases():
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = (t.cpu() for t in hf_tables(2, 5, 16))
    f = fastlm.apply_rotary_pos_emb
    return [
        ("q not a tensor", lambda: f(q.tolist(), k, cos, sin), TypeError, "q must be a Tensor"),
        ("integer q", lambda: f(q.long(), k.long(), cos, sin), TypeError, "q must be a floating"),
        ("k dtype", lambda: f(q, k.half(), cos, sin), TypeError, "k has dtype"),
        ("k device", lambda: f(q, k.to("meta"), cos, sin), ValueError, "k is on"),
        ("cos dtype", lambda: f(q, k, cos.double(), sin.double()), TypeError, "cos has dtype"),
        ("sin shape", lambda: f(q, k, cos, sin[:, :, :8]), ValueError, "cos and sin"),
        ("odd rotary dim", lambda: f(q, k, cos[..., :7], sin[..., :7]), ValueError, "rotary_dim even"),
        ("3-D q", lambda: f(q[0], k, cos, sin), ValueError, "4-D"),
        ("k batch", lambda: f(q, k[:1], cos[:1], sin[:1]), ValueError, "k has batch"),
        ("k seqlen", lambda: f(q, k[:, :, :4], cos, sin), ValueError, "k .* does not match cos"),
        ("cos batch", lambda: f(q[:1], k[:1], cos, sin), ValueError, "q .* does not match cos"),
        ("rotary dim > head dim", lambda: f(q[..., :8], k[..., :8], cos, sin), ValueError, "at most the head dim"),
        ("halves differ", lambda: f(q, k, torch.rand(2, 5, 16), sin), ValueError, "halves"),
        ("unsqueeze_dim", lambda: f(q, k, cos, sin, unsqueeze_dim=0), ValueError, "unsqueeze_dim"),
        ("unsqueeze_dim bool", lambda: f(q, k, cos, sin, unsqueeze_dim=True), ValueError, "unsqueeze_dim"),
    ]


@pytest.mark.parametrize("case", _pos_emb_bad_cases(), ids=lambda c: c[0])
def test_pos_emb_bad_input_names_the_argument(case):
    _, call, exc, word = case
    with pytest.raises(exc, match=word):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pos_emb_opcheck(backend):
    B, S, H, Hk, D = 2, 5, 3, 1, 24
    qkv = make((B, S, H + 2 * Hk, D))
    q, k = qkv[:, :, :H].transpose(1, 2).requires_grad_(True), qkv[:, :, H:H + Hk].transpose(1, 2)
    q = q.detach().requires_grad_(True)
    k = k.detach().requires_grad_(True)
    cos, sin = hf_tables(B, S, 16)
    with fastlm.use_backend(backend):
        torch.library.opcheck(rotary_ops._rotary_pos_emb, (q, k, cos, sin, 1, False, None))
        torch.library.opcheck(rotary_ops._rotary_pos_emb, (q.transpose(1, 2), k.transpose(1, 2), cos[:1, :, :],
                                                           sin[:1], 2, True, backend))
        torch.library.opcheck(rotary_ops._rotary_pos_emb, (q.detach(), k.detach(), cos[0], sin[0], 1, False, None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pos_emb_torch_compile_fullgraph(backend):
    import torch._dynamo

    torch._dynamo.reset()

    def attention_inputs(qkv, cos, sin):
        q, k = qkv[:, :, :4].transpose(1, 2), qkv[:, :, 4:6].transpose(1, 2)
        return fastlm.apply_rotary_pos_emb(q, k, cos, sin)

    qkv = make((2, 7, 8, 32)).requires_grad_(True)
    cos, sin = hf_tables(2, 7, 32)
    compiled = torch.compile(attention_inputs, fullgraph=True, backend="aot_eager")
    with fastlm.use_backend(backend):
        expected = attention_inputs(qkv, cos, sin)
        g_expected = torch.autograd.grad(sum(t.square().sum() for t in expected), [qkv])
        got = compiled(qkv, cos, sin)
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_gpu_pos_emb_llama_sizes(dtype, unsqueeze_dim):
    """Llama 3 8B's attention inputs (32 query heads, 8 key heads, head dim 128) as views of
    the fused projection, per-sequence tables in the model's dtype, against HF's function."""
    B, S, H, Hk, D = 2, 4097, 32, 8, 128
    qkv = make((B, S, H + 2 * Hk, D), dtype)
    q, k = qkv[:, :, :H], qkv[:, :, H:H + Hk]
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = hf_tables(B, S, D, dtype)
    check_pos_emb("triton", q, k, cos, sin, unsqueeze_dim, eager=_hf_or_formula())
