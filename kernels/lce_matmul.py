"""The fused linear cross-entropy's three matmuls over the live rows only.

``linear_cross_entropy`` sorts the rows whose target is counted (not ``ignore_index``) to the
front, stably, on the device, and counts them there (fastlm/ops/linear_cross_entropy.py). The
count never reaches the host (no ``.item()``, no ``nonzero()``: a training step keeps the GPU
queue full), so the sizes of the launches cannot depend on it: each kernel reads the count
and does no work past it. For a chunk of rows starting at sorted row ``row0``, the live rows
are the first ``clamp(count - row0, 0, rows)``:

    MODE 0  logits = x @ W^T (+ bias)       rows of A (M) limited; a tile wholly past the
                                            live rows returns at once, writing nothing (the
                                            loss kernel's LIMIT skips those rows too)
    MODE 1  dx     = d @ W                  the same limit; dead tiles store zeros (an
                                            ignored row's input gradient is 0)
    MODE 2  dW    += d^T @ x  (dbias += d^T 1)
                                            rows are the K dim: the K loop stops at the live
                                            rows, and C (the float32 accumulator) is read,
                                            added to and stored; a program with no live row
                                            does nothing. With HAS_DB, the first column of
                                            programs also adds A's row sums over the live K
                                            into DB (the bias gradient, from tiles of d
                                            already in registers)

All take A (M, K) and B (N, K) of any strides (C = A @ B^T; transposed operands are views)
and accumulate in float32, tiles ordered in groups of GROUP_M row-tiles as in
kernels/matmul.py, whose tile sizes they use. A chunk made only of ignored rows costs three
launches that exit at once: with 85% of the targets ignored, the lm-head's three matmuls and
the loss run on 15% of the rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import empty
from .matmul import _config, _dot, _gpu_config, _ieee, grouped_tile

LOGITS, DX, DWEIGHT = 0, 1, 2
ROW_PAD = 64  # elements: a logits row starts on a 128-byte boundary (16-bit) whatever V is


@triton.jit
def _rows_matmul_kernel(
    A, B, C, BIAS, DB, Count,
    M, N, K, row0,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_bias,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DB: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # The live rows of this chunk (int64: the count is a torch int64 sum): A's rows (M), or
    # the K dim in MODE 2.
    live = tl.maximum(tl.load(Count) - row0, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    rk = offs_k.to(tl.int64)
    n_ok = offs_n < N
    c_ptrs = C + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if MODE == 2:
        m_ok = offs_m < M
        k_end = tl.minimum(live, K)
        dead = k_end == 0
    else:
        m_ok = offs_m < live  # (and < M: live is at most the chunk's rows... or more, for a full chunk)
        m_ok = m_ok & (offs_m < M)
        k_end = K
        dead = pid_m * BLOCK_M >= live
    if dead:
        if MODE == 1:  # an ignored row's input gradient is 0
            tl.store(c_ptrs, tl.zeros([BLOCK_M, BLOCK_N], C.dtype.element_ty),
                     mask=(offs_m < M)[:, None] & n_ok[None, :])
    else:
        step_a = tl.full([], BLOCK_K, tl.int64) * stride_ak
        step_b = tl.full([], BLOCK_K, tl.int64) * stride_bk
        a_ptrs = A + rm[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptrs = B + rk[:, None] * stride_bk + rn[None, :] * stride_bn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            k_ok = offs_k < k_end - k0
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE)
            if HAS_DB:
                row_sum += tl.sum(a.to(tl.float32), axis=1)
            a_ptrs += step_a
            b_ptrs += step_b
        if MODE == 2:
            mask = m_ok[:, None] & n_ok[None, :]
            acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)
            if HAS_DB:
                if pid_n == 0:  # one program per row-tile adds the bias gradient
                    db = DB + rm
                    tl.store(db, tl.load(db, mask=m_ok, other=0.0) + row_sum, mask=m_ok)
        else:
            if MODE == 0 and HAS_BIAS:
                acc += tl.load(BIAS + rn * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            # Rows past the live ones inside a live tile: zeros from the masked loads (MODE 0:
            # the bias; the loss kernel never reads them).
            tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


def _launch(mode: int, a, b, c, count, row0: int, bias=None, db=None) -> None:
    M, K = a.shape
    N = b.shape[0]
    if M == 0 or N == 0:
        return
    bm, bn, bk, group_m, warps, stages = _config(a.device, a.dtype, False)
    dummy = c
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _rows_matmul_kernel[grid](
        a, b, c, bias if bias is not None else dummy, db if db is not None else dummy, count,
        M, N, K, row0,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        bias.stride(0) if bias is not None else 0,
        MODE=mode, HAS_BIAS=bias is not None, HAS_DB=db is not None, IEEE=_ieee(a.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages,
    )


def logits_rows(x: torch.Tensor, weight: torch.Tensor, bias, count: torch.Tensor, row0: int) -> torch.Tensor:
    """x (R, H) @ weight (V, H)^T (+ bias) in x's dtype for the live rows of a chunk starting
    at sorted row ``row0``; the rows of wholly dead tiles are left unwritten.

    The rows are laid out ROW_PAD elements apart at least (a view of the first V columns):
    with a vocabulary that is not a multiple of 8 (GPT-2's 50257) unpadded 16-bit rows would
    start off 16-byte boundaries, and the two kernels that read this buffer back as the
    gradient d (dx: d @ W, dW: d^T @ x) would lose their asynchronous copies and spill
    (compiled for sm_80/sm_90); the loss kernel also takes its wide blocks on aligned rows."""
    vocab = weight.shape[0]
    padded = -(-vocab // ROW_PAD) * ROW_PAD
    out = empty((x.shape[0], padded), x.dtype, x.device)[:, :vocab]
    _launch(LOGITS, x, weight, out, count, row0, bias=bias)
    return out


def dx_rows(d: torch.Tensor, weight: torch.Tensor, count: torch.Tensor, row0: int, out: torch.Tensor) -> None:
    """out (R, H) = d (R, V) @ weight (V, H) for the live rows, zeros for the others."""
    _launch(DX, d, weight.t(), out, count, row0)


def dweight_rows(d: torch.Tensor, x: torch.Tensor, count: torch.Tensor, row0: int, dweight: torch.Tensor,
                 dbias=None) -> None:
    """dweight (V, H) += d (R, V)^T @ x (R, H) over the live rows (dweight float32 or any
    float dtype: read, added in float32, stored); dbias (V,) float32 += d's column sums
    over them."""
    _launch(DWEIGHT, d.t(), x.t(), dweight, count, row0, db=dbias)


def gpu_compile_variants():
    """Each mode at the tiles kernels/matmul.py picks, bf16 (contiguous operands: unit strides
    constant, as a launch specialises them) and fp32 (IEEE and TF32; every stride a variable,
    as kernels/matmul.py's fp32 variants). Without Triton's 16-byte divisibility hints, which
    a launch on aligned tensors adds, nothing is pipelined here: with them (sm_90, bf16) the
    modes take 128 KiB of shared memory (112 KiB for the dW + dbias mode) and do not spill."""
    pointers = {"A": None, "B": None, "C": None, "BIAS": None, "DB": "*fp32", "Count": "*i64"}
    # The unit strides of each mode's operands (the launchers' views of contiguous tensors):
    # logits x (R, H) and W (V, H); dx d (R, V) and W^T; dW d^T and x^T (unit along M and N).
    unit = {LOGITS: ("stride_ak", "stride_bk", "stride_cn", "stride_bias"), DX: ("stride_ak", "stride_bn", "stride_cn"),
            DWEIGHT: ("stride_am", "stride_bn", "stride_cn")}
    variants = []
    for dt, ieee in (("bf16", False), ("fp32", True), ("fp32", False)):
        bm, bn, bk, group_m, warps, stages = _gpu_config({"bf16": torch.bfloat16, "fp32": torch.float32}[dt], False)
        for mode, has_bias, has_db in ((LOGITS, False, False), (LOGITS, True, False), (DX, False, False),
                                       (DWEIGHT, False, False), (DWEIGHT, False, True)):
            sig = {}
            const = dict(MODE=mode, HAS_BIAS=has_bias, HAS_DB=has_db, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                         GROUP_M=group_m)
            for p in _rows_matmul_kernel.params:
                if p.is_constexpr:
                    continue
                if dt == "bf16" and p.name in unit[mode] and (p.name != "stride_bias" or has_bias):
                    sig[p.name] = "constexpr"
                    const[p.name] = 1
                elif p.name in pointers:
                    sig[p.name] = pointers[p.name] or ("*fp32" if (p.name == "C" and mode == DWEIGHT) else f"*{dt}")
                elif p.name == "row0":
                    sig[p.name] = "i64"
                else:
                    sig[p.name] = "i32"
            variants.append((_rows_matmul_kernel, sig, const, {"num_warps": warps, "num_stages": stages}))
    return variants
