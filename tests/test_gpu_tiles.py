"""The kernels with the GPU's own launch settings, under the interpreter (FASTLM_GPU_TILES=1).

Off a GPU every tile picker chooses 16-wide tiles, so that small tests cross every block
edge; the shapes a GPU launches (attention's 128 x 64 tiles, the backward's 16-bit tiles of
128 keys x 32 or 16 queries and 128 queries x 32 keys, the half-height float32 dK/dV tiles,
BLOCK_M != BLOCK_N, the matmul's 128 x 128 x 64 tiles, a program count per SM) would then
run nowhere before a GPU. kernels/launch.py's switch makes every picker take the GPU branch;
here a representative subset of the kernel tests runs with it, at sizes that cross those
tiles (L = 113 and S = 130 against 128 x 64, K = 70 against BLOCK_K 64, ...), each against
its float64 oracle with the suite's own checks, and every test asserts the block sizes that
were really launched (a spy on the kernels' launcher). float16 and float32 only: bfloat16's
tl.dot is wrong under the interpreter (docs: shared DESIGN.md).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import fastlm
from fastlm.kernels import attention as attn_kernels
from fastlm.kernels import cross_entropy as ce_kernels
from fastlm.kernels import launch
from fastlm.kernels import matmul as mm_kernels
from fastlm.kernels import norm as norm_kernels
from fastlm.kernels import rotary as rope_kernels
from fastlm.ops import attention as attn_ops

from . import test_attention as T_attn
from . import test_attention_bias_grad as T_bias
from . import test_cross_entropy as T_ce
from . import test_ffn as T_ffn
from . import test_norm as T_norm
from . import test_rotary as T_rope
from .conftest import DEVICE


@pytest.fixture
def launches(monkeypatch):
    """Turns the switch on (the environment, read at every call) and records each kernel
    launch: (kernel name, grid, the block sizes and warps it was given)."""
    monkeypatch.setenv(launch.GPU_TILES_ENV, "1")
    seen = []
    kind = type(attn_kernels._attn_fwd_kernel)  # InterpretedFunction, or JITFunction on a GPU
    real = kind.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            name = getattr(self, "fn", self).__name__
            settings = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k in ("GROUP_M", "num_warps")}
            seen.append((name, grid, settings))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(kind, "run", run)
    return seen


def launched(seen, kernel: str) -> list[dict]:
    got = [s for name, _, s in seen if name == kernel]
    assert got, f"{kernel} was not launched (launched: {sorted({n for n, _, _ in seen})})"
    return got


# ----------------------------------------------------------------------------- the switch

def test_the_switch_is_read_at_call_time_and_scoped(monkeypatch):
    monkeypatch.delenv(launch.GPU_TILES_ENV, raising=False)
    cpu = torch.device("cpu")
    assert launch.gpu_tiles(torch.device("cuda")) and launch.gpu_tiles("cuda:1")
    assert not launch.gpu_tiles(cpu)
    assert mm_kernels._config(cpu, torch.float16, False) == (16, 16, 16, 3, 1, 1)
    assert launch.persistent_programs(cpu, 10_000) == 4
    with launch.use_gpu_tiles():
        assert launch.gpu_tiles(cpu)
        assert mm_kernels._config(cpu, torch.float16, False)[:3] == (128, 128, 64)
        assert mm_kernels._config(cpu, torch.float32, True)[:3] == (128, 32, 32)
        assert launch.persistent_programs(cpu, 10_000) == launch.NOMINAL_SM_COUNT * 4
        with launch.use_gpu_tiles(False):
            assert not launch.gpu_tiles(cpu)
        assert launch.gpu_tiles(cpu)
    assert not launch.gpu_tiles(cpu) and launch.GPU_TILES_ENV not in __import__("os").environ
    monkeypatch.setenv(launch.GPU_TILES_ENV, "1")
    assert launch.gpu_tiles(cpu)


# ----------------------------------------------------------------------------- attention

ATTN_CASES = [  # B, L, S, H, Hk, D, dtype, options
    (1, 113, 130, 4, 2, 64, torch.float16, {"causal": True}),
    (2, 130, 113, 2, 2, 64, torch.float16, {}),
    (1, 113, 130, 2, 1, 128, torch.float16, {"window_size": (70, 10)}),
    (1, 130, 113, 2, 2, 128, torch.float32, {"causal": True}),
    (1, 130, 140, 4, 2, 128, torch.float16, {"causal": True}),
    (1, 70, 40, 2, 1, 256, torch.float16, {"causal": True}),
    (1, 113, 130, 4, 2, 64, torch.float32, {"softcap": 3.0}),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"L{c[1]}S{c[2]}H{c[3]}Hk{c[4]}D{c[5]}"
                         f"{str(c[6])[6:]}{''.join(c[7])}")
def test_attention_with_gpu_tiles(launches, case):
    B, L, S, H, Hk, D, dtype, options = case
    q, k, v = T_attn.qkv(B, L, S, H, Hk, D, dtype=dtype)
    window = options.get("window_size", (-1, -1))
    T_attn.check("triton", lambda q, k, v: fastlm.flash_attn_func(q, k, v, **options),
                 lambda q, k, v: T_attn.naive(q, k, v, window=window, causal=options.get("causal", False),
                                              softcap=options.get("softcap", 0.0)),
                 [q, k, v])
    fwd = launched(launches, "_attn_fwd_kernel")[0]
    dkdv = launched(launches, "_attn_bwd_dkdv_kernel")[0]
    dq = launched(launches, "_attn_bwd_dq_kernel")[0]
    bm, bn = fwd["BLOCK_M"], fwd["BLOCK_N"]
    on_gpu = attn_kernels._blocks(SimpleNamespace(D=D, DV=D), torch.device("cuda"), dtype)  # what a GPU picks
    assert (bm, bn, fwd["num_warps"]) == on_gpu[:3] != (16, 16, 1), (fwd, on_gpu)
    if dtype == torch.float16 and D <= 128:
        assert (bm, bn, fwd["num_warps"]) == (128, 64, 8), fwd  # the tensor-core tiles: BLOCK_M != BLOCK_N
    dkdv_gpu, dq_gpu = attn_kernels._bwd_blocks(SimpleNamespace(D=D, DV=D), torch.device("cuda"), dtype)
    assert (dq["BLOCK_M"], dq["BLOCK_N"], dq["num_warps"]) == dq_gpu[:3], (dq, dq_gpu)
    assert (dkdv["BLOCK_M"], dkdv["BLOCK_N"], dkdv["num_warps"]) == dkdv_gpu[:3], (dkdv, dkdv_gpu)
    if dtype == torch.float16 and D > 128:  # dQ 64 x 32 over 8 warps (L = 70, S = 40 cross it)
        assert (dq["BLOCK_M"], dq["BLOCK_N"], dq["num_warps"]) == (64, 32, 8), dq
    elif dtype == torch.float16:
        # The backward's own spill-free tiles over 8 warps: dK/dV 128 keys x 32 queries (head
        # dim 64) or x 16 (128), dQ 128 queries x 32 keys (L = 130 and S = 130 / 140 cross them).
        assert (dkdv["BLOCK_M"], dkdv["BLOCK_N"], dkdv["num_warps"]) == ((32 if D <= 64 else 16), 128, 8), dkdv
        assert (dq["BLOCK_M"], dq["BLOCK_N"], dq["num_warps"]) == (128, 32, 8), dq
    else:
        assert (dq["BLOCK_M"], dq["BLOCK_N"]) == (bm, bn)
        assert (dkdv["BLOCK_M"], dkdv["BLOCK_N"]) == (bm // 2, bn)  # the half-height dK/dV tile
    delta = launched(launches, "_attn_bwd_delta_kernel")[0]
    assert (delta["num_warps"], delta["BLOCK_M"]) == (8, min(bm, 64)), delta  # the spill-free variant


@pytest.mark.parametrize("bias_shape", [(1, 2, 113, 130), (2, 1, 1, 130)], ids=["t5", "padding"])
def test_additive_mask_gradient_with_gpu_tiles(launches, bias_shape):
    """SDPA's float mask and its gradient, reduced over the mask's broadcast dims, with the
    GPU's tiles (float16: BLOCK_M != BLOCK_N)."""
    T_bias.check("triton", T_bias.sdpa(), T_bias.torch_sdpa(),
                 T_bias.inputs(2, 2, 2, 113, 130, 64, bias_shape, torch.float16))
    dq = launched(launches, "_attn_bwd_dq_kernel")[0]
    assert (dq["BLOCK_M"], dq["BLOCK_N"]) == (128, 32), dq
    assert launched(launches, "_attn_bwd_dkdv_kernel")[0]["BLOCK_M"] == 16  # a masked call's dK/dV tile


@pytest.mark.parametrize("bias_shape", [(1, 2, 130, 140), (1, 1, 1, 140)], ids=["t5", "padding"])
def test_additive_mask_gradient_with_masked_head_dim_128_tiles(launches, bias_shape):
    """A masked call at head dim 128 takes narrower tiles than an unmasked one (the mask's
    per-score addresses spilled the others): forward 128 x 32, dK/dV 16 queries x 128 keys
    in one stage, dQ 128 x 16. L = 130 and S = 140 cross all of them."""
    T_bias.check("triton", T_bias.sdpa(), T_bias.torch_sdpa(),
                 T_bias.inputs(1, 2, 2, 130, 140, 128, bias_shape, torch.float16))
    tiles = {name: launched(launches, name)[0] for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel",
                                                            "_attn_bwd_dq_kernel")}
    got = {name: (t["BLOCK_M"], t["BLOCK_N"], t["num_warps"]) for name, t in tiles.items()}
    assert got == {"_attn_fwd_kernel": (128, 32, 8), "_attn_bwd_dkdv_kernel": (16, 128, 8),
                   "_attn_bwd_dq_kernel": (128, 16, 8)}, got


def test_attention_dropout_with_gpu_tiles(launches):
    """The dropout mask is a function of the position, whatever the tiles: the forward's,
    dK/dV's half-height ones (float32's; 16-bit tiles: the tests above) and dropout_mask's
    64 x 64 draw the same mask."""
    T_attn.test_dropout_forward_and_backward_use_the_same_mask("triton", True)
    assert launched(launches, "_dropout_mask_kernel")[0]["BLOCK_M"] == 64
    fwd = launched(launches, "_attn_fwd_kernel")[0]
    assert fwd["num_warps"] > 1 and launched(launches, "_attn_bwd_dkdv_kernel")[0]["BLOCK_M"] == fwd["BLOCK_M"] // 2


@pytest.mark.parametrize("D", [64, 128])
def test_attention_every_feature_with_16bit_gpu_tiles(launches, D):
    """float16 at head dims 64 and 128 takes the backward's own tiles (dK/dV 32 or 16 queries x
    128 keys, the transposed tile; dQ 128 x 32): grouped-query heads, causal with a left
    window, soft-capping and dropout together, L = 130 and S = 140 crossing every tile edge."""
    B, L, S, H, Hk, p = 1, 130, 140, 4, 2, 0.15
    options = {"causal": True, "window_size": (100, -1), "softcap": 3.0, "softmax_scale": 0.3}
    torch.manual_seed(8)
    keep = attn_ops.dropout_mask(attn_ops.draw_dropout_seed(DEVICE), B, H, L, S, p, "triton", DEVICE)

    def ours(q, k, v):
        torch.manual_seed(8)  # the call draws the same seed
        return fastlm.flash_attn_func(q, k, v, dropout_p=p, **options)

    T_attn.check("triton", ours, lambda q, k, v: T_attn.naive(q, k, v, scale=0.3, window=(100, -1), causal=True,
                                                              softcap=3.0, keep=keep.to(q.dtype), dropout_p=p),
                 T_attn.qkv(B, L, S, H, Hk, D, dtype=torch.float16))
    dkdv, dq = launched(launches, "_attn_bwd_dkdv_kernel")[0], launched(launches, "_attn_bwd_dq_kernel")[0]
    assert (dkdv["BLOCK_M"], dkdv["BLOCK_N"], dq["BLOCK_M"], dq["BLOCK_N"]) == (32 if D == 64 else 16, 128, 128, 32)


def test_attention_varlen_dropout_with_16bit_gpu_tiles(launches):
    """Packed sequences (one empty, one of a single query) with dropout and grouped-query
    heads at head dim 128 in float16: the transposed dK/dV tile per sequence."""
    lq, lk, H, Hk, D, p = [7, 140, 1, 0, 60], [12, 133, 5, 3, 150], 4, 2, 128, 0.2
    q, k, v = (torch.randn(sum(n), h, D, device=DEVICE).half() for n, h in ((lq, H), (lk, Hk), (lk, Hk)))
    cu_q, cu_k = T_attn._cu(lq), T_attn._cu(lk)
    torch.manual_seed(3)
    keep = attn_ops.dropout_mask(attn_ops.draw_dropout_seed(DEVICE), len(lq), H, max(lq), max(lk), p, "triton", DEVICE)

    def ours(q, k, v):
        torch.manual_seed(3)
        return fastlm.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), dropout_p=p, causal=True)

    T_attn.check("triton", ours, T_attn.varlen_dropout_oracle(cu_q, cu_k, keep, p), [q, k, v])
    assert launched(launches, "_attn_bwd_dkdv_kernel")[0]["BLOCK_M"] == 16


# ----------------------------------------------------------------------------- matmul / feed-forward

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_feed_forward_with_gpu_tiles(launches, dtype, activation):
    M, D, H = 130, 70, 65  # cross BLOCK_M 128, BLOCK_K 32/64 and the gated tiles' BLOCK_N 32/64
    gated = activation in fastlm.ops.ffn.GATED
    x = T_ffn.rnd(M, D, dtype=dtype)
    w_in = T_ffn.rnd(2 * H if gated else H, D, dtype=dtype, scale=D ** -0.5)
    b_in = T_ffn.rnd(w_in.shape[0], dtype=dtype)
    w_out, b_out = T_ffn.rnd(D, H, dtype=dtype, scale=H ** -0.5), T_ffn.rnd(D, dtype=dtype)
    T_ffn.check("triton", lambda *a: fastlm.feed_forward(*a, activation=activation),
                lambda *a: T_ffn.eager_ffn(*a, activation), [x, w_in, b_in, w_out, b_out], max(M, D, H))
    tiles = {(s["BLOCK_M"], s["BLOCK_N"], s["BLOCK_K"], s["GROUP_M"]) for s in launched(launches, "_matmul_kernel")}
    expected = {mm_kernels._gpu_config(dtype, two)[:4] for two in (False, True)}
    assert tiles and tiles <= expected and (16, 16, 16, 3) not in tiles, (tiles, expected)
    if gated:
        assert mm_kernels._gpu_config(dtype, True)[:4] in tiles  # the two-accumulator tiles ran


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_linear_with_gpu_tiles(launches, dtype):
    M, K, N = 130, 70, 129
    x, w, b = T_ffn.rnd(M, K, dtype=dtype), T_ffn.rnd(N, K, dtype=dtype, scale=K ** -0.5), T_ffn.rnd(N, dtype=dtype)
    T_ffn.check("triton", lambda x, w, b: fastlm.linear(x, w, b, "gelu_tanh"),
                lambda x, w, b: T_ffn.TORCH_ACT["gelu_tanh"](torch.nn.functional.linear(x, w, b)), [x, w, b],
                max(M, K, N))
    tiles = {(s["BLOCK_M"], s["BLOCK_N"], s["BLOCK_K"]) for s in launched(launches, "_matmul_kernel")}
    assert mm_kernels._gpu_config(dtype, False)[:3] in tiles and (16, 16, 16) not in tiles, tiles


def test_dact_with_gpu_tiles(launches):
    dy, z = torch.randn(33, 130, device=DEVICE), torch.randn(33, 130, device=DEVICE)
    dz, dbias = mm_kernels.dact(dy, z, "silu")
    z64 = z.double().requires_grad_(True)
    (want,) = torch.autograd.grad(torch.nn.functional.silu(z64), [z64], dy.double())
    torch.testing.assert_close(dz.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dbias.double(), want.sum(0), rtol=1e-5, atol=1e-5)
    s = launched(launches, "_dact_kernel")[0]
    assert (s["BLOCK_M"], s["BLOCK_N"], s["num_warps"]) == (32, 128, 4)


# ----------------------------------------------------------------------------- norm, rotary, cross-entropy

@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_with_gpu_tiles(launches, kind):
    """A row wider than the GPU's fused block (the chunked path at its real width), and many
    rows shared out over the programs a GPU would launch (one per SM x 4)."""
    for m, n in [(2, launch.MAX_FUSED_BLOCK + 1), (530, 64)]:
        x, r = T_norm.make((m, n), torch.float32, shift=1.0), T_norm.make((m, n), torch.float32)
        T_norm.check(kind, "triton", x, residual=r, weight=T_norm.make(n, torch.float32),
                     bias=T_norm.make(n, torch.float32) if kind == "layer" else None)
    blocks = {s["BLOCK_N"] for s in launched(launches, "_norm_fwd_kernel")}
    assert blocks == {launch.MAX_FUSED_BLOCK, 64}, blocks
    grids = [g for name, g, _ in launches if name == "_norm_bwd_kernel"]
    per = -(-530 // launch.persistent_programs(DEVICE, 530, per_sm=norm_kernels.BWD_PROGRAMS_PER_SM))
    assert (-(-530 // per),) in grids and per > 1, grids  # 106 programs of 5 rows, not the interpreter's 4
    # The 64-wide rows go 8 a step (a program's 5 rows: a partial step), the wide ones 1 a step.
    steps = {(s["BLOCK_M"], s["BLOCK_N"], s["num_warps"]) for s in launched(launches, "_norm_bwd_kernel")}
    assert steps == {(8, 64, 2), (1, norm_kernels.BWD_CHUNK, 16)}, steps


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
@pytest.mark.parametrize("D,R", [(128, 128), (80, 32)])
def test_rotary_with_gpu_tiles(launches, dtype, D, R):
    block_s = rope_kernels.rotary_blocks(10**6, R, D)[0]
    x = T_rope.make((2, block_s + 1, 2, D), dtype)
    cos, sin = T_rope.tables(block_s + 3, R)
    T_rope.check("triton", x, cos, sin)
    assert launched(launches, "_rotary_kernel")[0]["BLOCK_S"] == block_s < x.shape[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_cross_entropy_with_gpu_tiles(launches, dtype):
    C = ce_kernels.MAX_BLOCK_C + 1  # two blocks of the vocabulary, the second of one class
    x = (torch.randn(3, C, device=DEVICE) * 2).to(dtype)
    t = torch.tensor([0, C - 1, 7], device=DEVICE)
    T_ce.check("triton", x, t)
    assert {s["BLOCK_C"] for s in launched(launches, "_cross_entropy_fwd_kernel")} == {ce_kernels.MAX_BLOCK_C}


@pytest.mark.parametrize("C,block", [(2 * 8192 + 8, 8192), (2 * 8192 + 1, 2048)], ids=["aligned", "misaligned"])
def test_cross_entropy_fwd_bwd_chunk_by_row_alignment(launches, C, block):
    """The fused linear cross-entropy's kernel takes 8192 classes a chunk over 16-byte aligned
    rows, 2048 over others (element loads: 72 registers at 8192 on sm_90, one CTA an SM), and
    both give what the two launches give."""
    x = (torch.randn(3, C, device=DEVICE) * 2).to(torch.bfloat16)
    t = torch.tensor([0, C - 1, 5], device=DEVICE)
    dloss = torch.rand(3, device=DEVICE) + 0.5
    loss, lse, coef = ce_kernels.cross_entropy_fwd(x, t, None, -100, 0.0, 0.0, 0.0)
    grad = ce_kernels.cross_entropy_bwd(dloss, x, t, None, lse, coef, -100, 0.0, 0.0)
    got = ce_kernels.cross_entropy_fwd_bwd(x.clone(), t, None, -100, 0.0, 0.0, 0.0, dloss)
    assert ce_kernels.MAX_BLOCK_C == 8192
    assert launched(launches, "_cross_entropy_fwd_bwd_kernel")[0]["BLOCK_C"] == block
    torch.testing.assert_close(got[0], loss, rtol=1e-6, atol=1e-5)  # other chunking: other rounding
    torch.testing.assert_close(got[1], lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got[3].float(), grad.float(), rtol=1e-2, atol=1e-6)
