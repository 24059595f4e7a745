"""Rotary inside attention (issue 23, item 3): flash_attn_func(..., rotary_cos=, rotary_sin=,
rotary_interleaved=) turns q and k as the kernels load them and turns dq, dk back before
they are stored. Checked against the float64 oracle (fastlm.reference.rotary, then the
attention formula) and against the unfused composition of fastlm's own ops (fastlm.rotary /
apply_rotary_emb, then flash_attn_func), forward and backward, on both backends: causal and
not, L != S (query i at position i + S - L), GQA, both pairings, partial rotary, head dims
64 and 128, lengths one below, at and above the interpreter's 16-row tiles; and the
arguments it refuses, by name.
"""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.reference import rotary as ref_rotary

from .conftest import DEVICE
from .test_attention import check, naive, qkv
from .test_gpu_tiles import launches  # noqa: F401 (a fixture)

BACKENDS = ["torch", "triton"]

# (B, L, S, H, Hk, D, rotary_dim): 16 is the interpreter's tile (BLOCK_M = BLOCK_N).
CASES = [
    (1, 15, 15, 2, 1, 64, 64),    # one below a tile, GQA
    (1, 16, 16, 1, 1, 128, 128),  # a whole tile, head dim 128
    (2, 9, 17, 2, 2, 64, 32),     # one above, L != S, partial rotary
    (1, 17, 33, 4, 2, 24, 16),    # odd head dim (padded tile), partial, GQA
]


def _tables(rows: int, rotary_dim: int, dtype=torch.float32):
    return fastlm.rotary_cos_sin(rows, rotary_dim, device=DEVICE, dtype=dtype)


def _oracle(cos, sin, interleaved, causal, **options):
    """Rotary then attention, as the formulas read (float64 in check()): q at i + S - L."""
    def fn(q, k, v):
        L, S = q.shape[1], k.shape[1]
        pos = torch.arange(L, device=q.device) + (S - L)
        c, s = cos.to(q.dtype), sin.to(q.dtype)
        qr = ref_rotary.rotary(q, c, s, pos, interleaved)
        kr = ref_rotary.rotary(k, c, s, None, interleaved)
        return naive(qr, kr, v, causal=causal, **options)
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}L{}S{}H{}Hk{}D{}R{}".format(*c))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_fused_matches_float64_oracle(backend, case, causal, interleaved):
    B, L, S, H, Hk, D, R = case
    cos, sin = _tables(S + 3, R)
    inputs = qkv(B, L, S, H, Hk, D)
    check(backend, lambda q, k, v: fastlm.flash_attn_func(q, k, v, causal=causal, rotary_cos=cos, rotary_sin=sin,
                                                          rotary_interleaved=interleaved),
          _oracle(cos, sin, interleaved, causal), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_with_window_softcap_and_scale(backend, interleaved):
    """Rotary with the options that keep the "torch" backend off torch's SDPA (a window, a
    soft-cap): the reference's composition, and the kernels, against the oracle."""
    cos, sin = _tables(21, 16)
    inputs = qkv(1, 13, 21, 2, 1, 32)
    check(backend, lambda q, k, v: fastlm.flash_attn_func(q, k, v, softmax_scale=0.3, window_size=(6, 2), softcap=3.0,
                                                          rotary_cos=cos, rotary_sin=sin,
                                                          rotary_interleaved=interleaved),
          _oracle(cos, sin, interleaved, False, scale=0.3, window=(6, 2), softcap=3.0), inputs)


def _fused_and_unfused(backend, inputs, cos, sin, interleaved, causal, via_apply_rotary_emb=False):
    """(out, dq, dk, dv) of the fused call and of fastlm's rotary then flash_attn_func."""
    results = []
    dout = None
    for fused in (True, False):
        q, k, v = (t.detach().requires_grad_() for t in inputs)
        L, S = q.shape[1], k.shape[1]
        with fastlm.use_backend(backend):
            if fused:
                out = fastlm.flash_attn_func(q, k, v, causal=causal, rotary_cos=cos, rotary_sin=sin,
                                             rotary_interleaved=interleaved)
            else:
                if via_apply_rotary_emb:
                    qr = fastlm.apply_rotary_emb(q, cos, sin, interleaved, seqlen_offsets=S - L)
                    kr = fastlm.apply_rotary_emb(k, cos, sin, interleaved)
                else:
                    qr = fastlm.rotary(q, cos, sin, torch.arange(L, device=q.device) + (S - L), interleaved)
                    kr = fastlm.rotary(k, cos, sin, None, interleaved)
                out = fastlm.flash_attn_func(qr, kr, v, causal=causal)
            if dout is None:
                dout = torch.randn_like(out)
            results.append((out,) + torch.autograd.grad(out, (q, k, v), dout))
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_equals_unfused_composition(backend, interleaved, dtype):
    """The same numbers as fastlm.rotary then flash_attn_func: q and k are turned in float32
    and rounded to their dtype in both; only the gradients' rounding differs (the fused
    path turns dq, dk back before rounding them once)."""
    cos, sin = _tables(20, 32)
    inputs = qkv(2, 11, 19, 4, 2, 48, dtype=dtype)
    fused, unfused = _fused_and_unfused(backend, inputs, cos, sin, interleaved, causal=True,
                                        via_apply_rotary_emb=interleaved)
    eps = torch.finfo(dtype).eps
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, unfused):
        assert a.dtype == dtype and a.shape == b.shape
        assert torch.isfinite(a).all(), name
        tol = 4 * eps * max(b.abs().max().item(), 1.0) * (1 if name in ("out", "dv") else 8)
        err = (a.float() - b.float()).abs().max().item()
        assert err <= tol, f"{name}: fused and unfused differ by {err} > {tol}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_in_q_dtype_and_strided_views(backend):
    """Tables in q's dtype, a sin laid out differently from cos (column-major), and q, k, v
    as views of a packed qkv tensor: bit for bit the call with contiguous tensors, and the
    oracle's numbers (float64 on the reference, float32 on the kernels)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    cos, sin = _tables(16, 16, dtype)
    qkv_packed = torch.randn(1, 16, 3, 2, 32, device=DEVICE, dtype=dtype)
    q, k, v = qkv_packed.unbind(2)
    sin_t = sin.t().contiguous().t()
    assert sin_t.stride() != cos.stride() and not q.is_contiguous()
    with fastlm.use_backend(backend):
        got = fastlm.flash_attn_func(q, k, v, causal=True, rotary_cos=cos, rotary_sin=sin_t)
        want = fastlm.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, rotary_cos=cos,
                                      rotary_sin=sin)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    oracle = _oracle(cos.double(), sin.double(), False, True)(q.double(), k.double(), v.double())
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), oracle, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_windowed_call_is_finite_everywhere(backend):
    """A sliding window with rotary: keys outside it are skipped whole by the kernels, and
    the turned-back gradients of every row and key stay finite."""
    cos, sin = _tables(17, 16)
    q, k, v = qkv(1, 17, 17, 2, 1, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with fastlm.use_backend(backend):
        out = fastlm.flash_attn_func(q, k, v, causal=True, window_size=(3, 0), rotary_cos=cos, rotary_sin=sin)
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()


def _args(L=8, S=8, D=16, R=16, rows=None, dtype=torch.float32):
    q, k, v = qkv(1, L, S, 2, 1, D, dtype=dtype)
    cos, sin = _tables(S if rows is None else rows, R)
    return q, k, v, cos, sin


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_name_the_argument(backend):
    q, k, v, cos, sin = _args()
    f = fastlm.flash_attn_func
    with fastlm.use_backend(backend):
        with pytest.raises(ValueError, match="rotary_cos and rotary_sin must be given together"):
            f(q, k, v, rotary_cos=cos)
        with pytest.raises(ValueError, match="rotary_sin has shape"):
            f(q, k, v, rotary_cos=cos, rotary_sin=sin[:, :4])
        with pytest.raises(ValueError, match="rotary_cos must be 2-D"):
            f(q, k, v, rotary_cos=cos[None], rotary_sin=sin[None])
        with pytest.raises(TypeError, match="rotary_sin has dtype torch.float16"):
            f(q, k, v, rotary_cos=cos, rotary_sin=sin.half())
        with pytest.raises(TypeError, match="rotary_cos must be a Tensor"):
            f(q, k, v, rotary_cos=[1.0], rotary_sin=sin)
        with pytest.raises(TypeError, match="rotary_interleaved must be a bool"):
            f(q, k, v, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=1)
        # the rotary dim is 2 * the tables' columns: more than the head dim, or none at all
        q2, k2, v2, cos2, sin2 = _args(D=16, R=32)
        with pytest.raises(ValueError, match="rotary dim is 32; it must be between 2 and the head dim 16"):
            f(q2, k2, v2, rotary_cos=cos2, rotary_sin=sin2)
        with pytest.raises(ValueError, match="rotary dim is 0"):
            f(q, k, v, rotary_cos=cos[:, :0], rotary_sin=sin[:, :0])
        q3, k3, v3, cos3, sin3 = _args(L=9, S=8)
        with pytest.raises(ValueError, match="q's length 9 must be at most k's 8"):
            f(q3, k3, v3, rotary_cos=cos3, rotary_sin=sin3)
        q4, k4, v4, cos4, sin4 = _args(S=8, rows=7)
        with pytest.raises(ValueError, match="rotary_cos has 7 rows .* seqlen_ro must be at least S"):
            f(q4, k4, v4, rotary_cos=cos4, rotary_sin=sin4)
        cu = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
        with pytest.raises(NotImplementedError, match="rotary_cos / rotary_sin .* packed sequences"):
            fastlm.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 8, 8, rotary_cos=cos, rotary_sin=sin)


def test_no_gradient_reaches_the_tables():
    q, k, v, cos, sin = _args()
    cos.requires_grad_()
    q.requires_grad_()
    out = fastlm.flash_attn_func(q, k, v, rotary_cos=cos, rotary_sin=sin)
    out.sum().backward()
    assert cos.grad is None and q.grad is not None


def test_opcheck_with_rotary():
    """The custom op's schema with the rotary arguments: fake, autograd registration and the
    backward op (the "torch" backend: opcheck runs the op several times)."""
    from fastlm.ops.attention import _attention
    q, k, v, cos, sin = _args(L=5, S=8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, None, None, None, None, None, 0.25, True, -1, 0, 0.0, 0.0, 0, 0, None, None, cos, sin, True)
    with fastlm.use_backend("torch"):
        torch.library.opcheck(_attention, args)


# ----------------------------------------------------------------------------- fastlm's GPT

@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt_rotary_in_attention_gives_the_unfused_loss(backend, monkeypatch):
    """GPTConfig(rotary_in_attention=True): the same loss and gradients as the separate
    rotary launch (same weights), and no rotary launch of its own in training."""
    from fastlm.models import GPT, GPTConfig
    from fastlm.ops import rotary as rotary_ops
    cfg = dict(vocab_size=97, max_seq_len=32, n_layer=2, n_head=4, n_kv_head=2, d_model=64, activation="swiglu",
               norm="rmsnorm", positions="rotary", bias=False)
    torch.manual_seed(0)
    unfused = GPT(GPTConfig(**cfg)).to(DEVICE)
    fused = GPT(GPTConfig(**cfg, rotary_in_attention=True)).to(DEVICE)
    fused.load_state_dict(unfused.state_dict())
    ids = torch.randint(0, 97, (2, 19), device=DEVICE)
    labels = torch.randint(0, 97, (2, 19), device=DEVICE)
    results = []
    for model in (unfused, fused):
        if model is fused:
            def refuse(*args, **kwargs):
                raise AssertionError("rotary_in_attention ran a rotary launch of its own")
            monkeypatch.setattr(rotary_ops, "rotary", refuse)
        with fastlm.use_backend(backend):
            out = model(ids, labels=labels)
            loss = out["loss"]
            grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gpt_rotary_in_attention_generates_as_the_unfused_model():
    """Generation with the KV cache keeps the separate rotary (the cache call's): the prompt's
    forward runs fused, the decode steps not, and greedy decoding gives the unfused tokens."""
    from fastlm.models import GPT, GPTConfig
    cfg = dict(vocab_size=53, max_seq_len=24, n_layer=1, n_head=2, d_model=32, positions="rotary")
    torch.manual_seed(1)
    a = GPT(GPTConfig(**cfg)).to(DEVICE).eval()
    b = GPT(GPTConfig(**cfg, rotary_in_attention=True)).to(DEVICE).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 53, (2, 5), device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(b(ids)["logits"], a(ids)["logits"], rtol=1e-5, atol=1e-5)
        assert torch.equal(b.generate(ids, 6, temperature=0.0), a.generate(ids, 6, temperature=0.0))


# ----------------------------------------------------------------------------- GPU tiles

# (L, S, H, Hk, D, rotary_dim, interleaved): crossing the GPU's 128 x 64 forward tiles and the
# rotary backward's (16 x 64 dK/dV, 64 x 32 dQ at head dim 128); the half-tile path (R = D)
# with both pairings, and the partner-load path (partial rotary).
GPU_TILE_CASES = [(130, 130, 2, 1, 128, 128, False), (70, 129, 2, 2, 64, 64, True), (65, 70, 2, 1, 64, 32, False)]


@pytest.mark.parametrize("case", GPU_TILE_CASES, ids=lambda c: "L{}S{}H{}Hk{}D{}R{}{}".format(
    *c[:6], "gptj" if c[6] else "neox"))
def test_gpu_tiles(launches, case):
    """The kernels at the tiles a GPU launches with rotary (float16 under the interpreter):
    the oracle's numbers, and the tiles _rotary_bwd_blocks picks (those compile_check
    compiles)."""
    from types import SimpleNamespace

    from fastlm.kernels import attention as attn_kernels

    from .test_gpu_tiles import launched
    L, S, H, Hk, D, R, interleaved = case
    cos, sin = _tables(S, R)
    inputs = qkv(1, L, S, H, Hk, D, dtype=torch.float16)
    check("triton", lambda q, k, v: fastlm.flash_attn_func(q, k, v, causal=True, rotary_cos=cos, rotary_sin=sin,
                                                           rotary_interleaved=interleaved),
          _oracle(cos, sin, interleaved, True), inputs)
    gpu = torch.device("cuda")  # a name only
    p = SimpleNamespace(D=D, DV=D)
    fwd = launched(launches, "_attn_fwd_kernel")[0]
    bm, bn, warps, stages = attn_kernels._blocks(p, gpu, torch.float16)
    assert (fwd["BLOCK_M"], fwd["BLOCK_N"], fwd["num_warps"]) == (bm, bn, warps) == (128, 64, 8)
    dkdv_gpu, dq_gpu = attn_kernels._rotary_bwd_blocks(p, gpu, torch.float16,
                                                       *attn_kernels._bwd_blocks(p, gpu, torch.float16))
    dkdv, dq = launched(launches, "_attn_bwd_dkdv_kernel")[0], launched(launches, "_attn_bwd_dq_kernel")[0]
    assert (dkdv["BLOCK_M"], dkdv["BLOCK_N"], dkdv["num_warps"]) == dkdv_gpu[:3]
    assert (dq["BLOCK_M"], dq["BLOCK_N"], dq["num_warps"]) == dq_gpu[:3]
    if D == 128:
        assert dkdv_gpu[:2] == (16, 64) and dq_gpu[:2] == (64, 32)


# ----------------------------------------------------------------------------- benchmark rows

def test_bench_rows_time_both_paths():
    """`fastlm bench rope`'s rotary_attention rows: the unfused chain (the eager row) and the
    fused call, in every mode, with the bytes the separate rotary launches move."""
    from fastlm.bench import rope as rope_bench
    from fastlm.bench import runner
    config = runner.Config(device=torch.device("cpu"), dtype=torch.float32, reps=2, warmup=1,
                           ops=["rotary_attention"])
    harness = runner.Harness(config, {"copy_gbps": 10.0, "matmul_tflops": 0.05, "matmul_dtype": "fp32"})
    rope_bench.run(config, harness)
    rows = harness.rows
    assert {(r["mode"], r["impl"]) for r in rows} == {(m, i) for m in rope_bench.MODES
                                                      for i in (runner.EAGER, "fastlm-torch-fused")}, harness.notes
    B, S, H, Hk, D = rope_bench.ATTN_CPU_SHAPES[0]
    for r in rows:
        assert r["op"] == "rotary_attention" and r["rotary_bytes"] == 2 * B * S * (H + Hk) * D * 4 * (
            2 if r["mode"] == "fwd+bwd" else 1)
    assert not harness.notes, harness.notes  # the check found the two paths in agreement
