"""The CUDA C++ backend ("cuda") on a GPU: the ops it covers against the float64 oracles of
their own test files, with the checks reused from there. Runs in the GPU runbook after
``python -m fastlm.cuda_build`` (benchmarks/gpu_check.sh builds it); skipped on CPU.
The norms run the whole of tests/test_norm.py with "cuda" as a backend parameter.
"""

from __future__ import annotations

import pytest
import torch

import fastlm

from . import test_cross_entropy as ce_tests
from . import test_linear_cross_entropy as lce_tests  # noqa: F401  (its check is used below)
from .conftest import DEVICE

pytestmark = pytest.mark.gpu

CUDA_OPTIONS = [
    {},
    {"ignore_index": 3},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"reduction": "sum", "label_smoothing": 0.2, "z_loss": 1e-4, "softcap": 30.0},
    {"reduction": "none"},
]


def test_cuda_backend_is_built():
    info = fastlm.available_backends()["cuda"]
    assert info.available, info.reason


@pytest.mark.parametrize("options", CUDA_OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 17, 511, 512, 513, 50257, 128256])
def test_cross_entropy(options, dtype, vocab):
    rows = 64
    x = (torch.randn(rows, vocab, device=DEVICE) * 3).to(dtype)
    t = torch.randint(0, vocab, (rows,), device=DEVICE)
    t[::7] = options.get("ignore_index", -100)
    ce_tests.check("cuda", x, t, **options)


def test_cross_entropy_strided_and_int32_targets():
    x = torch.randn(40, 2 * 1000, device=DEVICE)[:, ::2]
    t = torch.randint(0, 1000, (40,), device=DEVICE, dtype=torch.int32)
    ce_tests.check("cuda", x, t, label_smoothing=0.1)


def test_cross_entropy_weights_and_soft_targets_name_the_triton_backend():
    x = torch.randn(8, 10, device=DEVICE)
    with fastlm.use_backend("cuda"), pytest.raises(fastlm.BackendUnavailableError, match="weights"):
        fastlm.cross_entropy(x, torch.randint(0, 10, (8,), device=DEVICE), weight=torch.rand(10, device=DEVICE))
    with fastlm.use_backend("cuda"), pytest.raises(fastlm.BackendUnavailableError, match="probability"):
        fastlm.cross_entropy(x, torch.softmax(torch.randn(8, 10, device=DEVICE), -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_in_place_gradient(dtype):
    """The fused lm-head writes the loss gradient over its chunk of logits (in place)."""
    tokens, hidden, vocab = 1000, 256, 5000
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=DEVICE) / hidden ** 0.5).to(dtype).requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,), device=DEVICE)
    with fastlm.use_backend("cuda"):
        loss = fastlm.linear_cross_entropy(x, w, t, label_smoothing=0.1, chunk_size=256)
        dx, dw = torch.autograd.grad(loss, [x, w])
    with fastlm.use_backend("torch"):
        ref = fastlm.linear_cross_entropy(x.double(), w.double(), t, label_smoothing=0.1)
        rdx, rdw = torch.autograd.grad(ref, [x, w])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), rdx.double(), rtol=tol, atol=tol * rdx.abs().max().item())
    torch.testing.assert_close(dw.double(), rdw.double(), rtol=tol, atol=tol * rdw.abs().max().item())


# ----------------------------------------------------------------------------- flash attention (csrc/attention.cu)
# The kernels' tiles are 64 rows (queries or keys) by 64: lengths 63, 64, 65, 127, 128, 129, 255,
# 257 sit at their edges. Every output starts as NaN (FASTLM_POISON, set by conftest), so a
# row the kernels fail to write fails the check. The oracle and the tolerance rule are
# tests/test_attention.py's.

from . import test_attention as attn_tests  # noqa: E402

ATTN_DTYPES = [torch.bfloat16, torch.float16]
ATTN_LENGTHS = [1, 63, 64, 65, 127, 128, 129, 255, 257]


def _flash(**options):
    return lambda q, k, v: fastlm.flash_attn_func(q, k, v, **options)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L", ATTN_LENGTHS)
def test_attention_lengths(dtype, D, causal, L):
    inputs = attn_tests.qkv(2, L, L, 2, 2, D, dtype=dtype)
    attn_tests.check("cuda", _flash(causal=causal), attn_tests._oracle_flash({"causal": causal}), inputs)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,S", [(1, 257), (257, 1), (63, 129), (129, 63), (65, 255), (255, 65), (128, 127),
                                 (1, 1)])
def test_attention_query_and_key_lengths_differ(dtype, D, causal, L, S):
    """Causal is aligned bottom-right here (FlashAttention): with L > S the first L - S
    queries see no key and must come out 0 with zero gradients."""
    inputs = attn_tests.qkv(1, L, S, 3, 3, D, dtype=dtype)
    attn_tests.check("cuda", _flash(causal=causal), attn_tests._oracle_flash({"causal": causal}), inputs)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("L,S", [(129, 63), (63, 129), (200, 200)])
def test_attention_causal_top_left_through_sdpa(dtype, L, S):
    """torch's SDPA aligns causal top-left (bottom_right=False in the op)."""
    inputs = attn_tests.qkv(2, L, S, 2, 2, 64, dtype=dtype)

    def ours(q, k, v):
        out = fastlm.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        return out.transpose(1, 2)

    def oracle(q, k, v):
        return attn_tests.naive(q, k, v, bottom_right=False, causal=True)

    attn_tests.check("cuda", ours, oracle, inputs)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,Hk", [(8, 2), (6, 3), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_grouped_query(dtype, D, H, Hk, causal):
    inputs = attn_tests.qkv(2, 129, 255, H, Hk, D, dtype=dtype)
    attn_tests.check("cuda", _flash(causal=causal), attn_tests._oracle_flash({"causal": causal}), inputs)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("window", [(5, 3), (7, -1), (-1, 2), (70, 0), (0, 0)], ids=str)
@pytest.mark.parametrize("L,S", [(200, 200), (130, 257), (257, 130)])
def test_attention_sliding_windows(dtype, window, L, S):
    options = {"window_size": window}
    inputs = attn_tests.qkv(1, L, S, 2, 1, 64, dtype=dtype)
    attn_tests.check("cuda", _flash(**options), attn_tests._oracle_flash(options), inputs)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("D", [32, 96])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,S", [(65, 65), (129, 63), (63, 129)])
def test_attention_other_head_dims(dtype, D, causal, L, S):
    inputs = attn_tests.qkv(2, L, S, 4, 2, D, dtype=dtype)
    attn_tests.check("cuda", _flash(causal=causal), attn_tests._oracle_flash({"causal": causal}), inputs)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("D", [96, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,S", [(65, 65), (129, 63), (63, 129), (31, 33)])
def test_attention_32_row_tiles_of_the_99_kib_parts(monkeypatch, dtype, D, causal, L, S):
    """sm_86 / sm_89 / sm_120 allow 99 KiB of shared memory per block: the launchers then walk
    32-row tiles (all three kernels at head dim 128, dK/dV at 96). FASTLM_CUDA_SMEM_LIMIT lowers
    this GPU's limit to theirs, so the variant runs here; the plan is fastlm's mirror's."""
    from fastlm.ops import attention as attn_ops
    monkeypatch.setenv("FASTLM_CUDA_SMEM_LIMIT", str(99 * 1024))
    assert attn_ops.cuda_attention_tile_cols("dkdv", D, 99 * 1024) == 32
    inputs = attn_tests.qkv(2, L, S, 4, 2, D, dtype=dtype)
    attn_tests.check("cuda", _flash(causal=causal), attn_tests._oracle_flash({"causal": causal}), inputs)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_attention_views_of_packed_qkv(dtype, D):
    B, L, H = 2, 129, 3
    packed = torch.randn(B, L, 3, H, D, device=DEVICE).to(dtype)
    inputs = [packed[:, :, i] for i in range(3)]
    assert not inputs[0].is_contiguous()
    attn_tests.check("cuda", _flash(causal=True), attn_tests._oracle_flash({"causal": True}), inputs)


def test_attention_misaligned_and_transposed_inputs_are_copied():
    """Strides that are not multiples of 16 bytes (an odd head-dim slice) and a non-unit
    stride on D: the op copies them, the answers stay right."""
    B, L, H, D = 2, 65, 2, 64
    q = torch.randn(B, L, H, D + 1, device=DEVICE).to(torch.bfloat16)[..., 1:]
    k = torch.randn(B, D, H, L, device=DEVICE).to(torch.bfloat16).permute(0, 3, 2, 1)
    v = torch.randn(B, L, H, D, device=DEVICE).to(torch.bfloat16)
    assert q.stride(1) % 8 != 0 and k.stride(-1) != 1
    attn_tests.check("cuda", _flash(), attn_tests._oracle_flash({}), [q, k, v])


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
def test_attention_scale(dtype):
    options = {"softmax_scale": 0.37, "causal": True}
    inputs = attn_tests.qkv(2, 100, 77, 4, 2, 128, dtype=dtype)
    attn_tests.check("cuda", _flash(**options), attn_tests._oracle_flash(options), inputs)


def test_attention_lse_and_rows_that_see_nothing():
    q, k, v = attn_tests.qkv(1, 150, 70, 2, 2, 64, dtype=torch.float16)
    with fastlm.use_backend("cuda"):
        out, lse = fastlm.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert lse.shape == (1, 2, 150) and lse.dtype == torch.float32
    s = torch.einsum("blhd,bshd->bhls", q.double(), k.double()) * 64 ** -0.5
    i, j = torch.arange(150, device=DEVICE)[:, None], torch.arange(70, device=DEVICE)[None, :]
    s = s.masked_fill(j > i - 80, float("-inf"))
    expected = torch.logsumexp(s, -1)
    blind = torch.isneginf(expected)
    assert blind[..., :80].all() and not blind[..., 80:].any()
    assert torch.isinf(lse[blind]).all() and (lse[blind] > 0).all()
    torch.testing.assert_close(lse[~blind].double(), expected[~blind], rtol=1e-4, atol=1e-4)
    assert torch.equal(out[:, :80], torch.zeros_like(out[:, :80]))


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_real_sizes(dtype, D, causal):
    inputs = attn_tests.qkv(2, 1023, 1025, 8, 2, D, dtype=dtype)
    attn_tests.check("cuda", _flash(causal=causal), attn_tests._oracle_flash({"causal": causal}), inputs)


def test_attention_backward_is_deterministic():
    q, k, v = (t.requires_grad_() for t in attn_tests.qkv(2, 300, 300, 8, 2, 128, dtype=torch.bfloat16))
    dout = torch.randn(q.shape, device=DEVICE).to(q.dtype)
    with fastlm.use_backend("cuda"):
        first = torch.autograd.grad(fastlm.flash_attn_func(q, k, v, causal=True), [q, k, v], dout)
        second = torch.autograd.grad(fastlm.flash_attn_func(q, k, v, causal=True), [q, k, v], dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_attention_matches_the_triton_backend():
    q, k, v = attn_tests.qkv(2, 333, 400, 4, 4, 128, dtype=torch.bfloat16)
    with fastlm.use_backend("cuda"):
        ours = fastlm.flash_attn_func(q, k, v, causal=True)
    with fastlm.use_backend("triton"):
        theirs = fastlm.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def _unsupported_attention_calls():
    q, k, v = attn_tests.qkv(1, 16, 16, 2, 2, 64, dtype=torch.bfloat16)
    cu = torch.tensor([0, 16], dtype=torch.int32, device=DEVICE)
    return [
        ("dropout", lambda: fastlm.flash_attn_func(q, k, v, dropout_p=0.1)),
        ("softcap", lambda: fastlm.flash_attn_func(q, k, v, softcap=2.0)),
        ("attention mask", lambda: fastlm.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=torch.ones(16, 16, dtype=torch.bool, device=DEVICE))),
        ("variable-length", lambda: fastlm.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 16, 16)),
        ("KV-cache", lambda: fastlm.flash_attn_with_kvcache(q, k, v, cache_seqlens=8)),
        ("float32", lambda: fastlm.flash_attn_func(q.float(), k.float(), v.float())),
        ("head dim 80", lambda: fastlm.flash_attn_func(*attn_tests.qkv(1, 8, 8, 1, 1, 80, dtype=torch.float16))),
        ("value head dim", lambda: fastlm.flash_attn_func(*attn_tests.qkv(1, 8, 8, 1, 1, 64, Dv=128,
                                                                          dtype=torch.float16))),
    ]


def test_attention_unsupported_options_name_themselves():
    for what, call in _unsupported_attention_calls():
        with fastlm.use_backend("cuda"), pytest.raises(fastlm.BackendUnavailableError, match=what):
            call()
