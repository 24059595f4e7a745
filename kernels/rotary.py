"""Rotary position embedding (RoPE), forward and backward, in Triton.

One kernel does both directions: the backward of a rotation by theta is the rotation by
-theta, so it is the same kernel with sin negated (constexpr CONJUGATE).

One program takes a block of BLOCK_S tokens of one sequence and one head: it reads the
tokens' positions (0..S-1, or position_ids), gathers their rows of the cos/sin tables
(S_max, R/2) once, and rotates the R/2 feature pairs of the head as two (BLOCK_S, BLOCK_R)
tiles, the pair's first and second members: (j, j + R/2) for GPT-NeoX / Llama, (2j, 2j + 1)
for GPT-J (interleaved; the two tiles are then strided loads that touch the same cache
lines). The D - R features past the rotary dim are copied through unchanged, bit for bit.
Every tensor is addressed by its strides, so x can be a view of a packed qkv tensor and
nothing is copied first; the output is written contiguous. The math is float32.

Positions outside [0, S_max) are never read: the op checks them on CPU tensors, where that
costs no device sync; on a GPU the kernel gives NaN for the rotated features of such a token
instead of reading past the tables (a check would need a host sync on every call).

Token offsets are int64 (b * stride_b + s * stride_s can pass 2^31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import empty, next_power_of_2

# Elements of one (BLOCK_S, BLOCK_R) tile: 32 per thread at 4 warps, in registers.
_TILE = 4096
_NUM_WARPS = 4


# The sequence length (and what follows from it: the block count, position_ids' row stride)
# changes from call to call: not specialised, so a new length reuses the compiled kernel.
@triton.jit(do_not_specialize=["S", "n_sblocks", "stride_pb"])
def _rotary_kernel(
    X, COS, SIN, POS, OUT,
    S, S_max, R_half, D, n_sblocks,
    stride_xb, stride_xs, stride_xh, stride_xd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_cs, stride_cd, stride_ss, stride_sd,
    stride_pb, stride_ps,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, HAS_POS: tl.constexpr, HAS_PASS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_sblocks).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = (pid % n_sblocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < S
    s = s.to(tl.int64)
    if HAS_POS:
        pos = tl.load(POS + b * stride_pb + s * stride_ps, mask=s_mask, other=0).to(tl.int64)
    else:
        pos = s
    in_table = s_mask & (pos >= 0) & (pos < S_max)

    j = tl.arange(0, BLOCK_R)
    j_mask = j < R_half
    t_mask = in_table[:, None] & j_mask[None, :]
    # A position outside the table reads NaN: a visible result, never an out-of-bounds read.
    cos = tl.load(COS + pos[:, None] * stride_cs + j[None, :] * stride_cd, mask=t_mask,
                  other=float("nan")).to(tl.float32)
    sin = tl.load(SIN + pos[:, None] * stride_ss + j[None, :] * stride_sd, mask=t_mask,
                  other=float("nan")).to(tl.float32)
    if CONJUGATE:
        sin = -sin

    if INTERLEAVED:
        ia = 2 * j
        ib = 2 * j + 1
    else:
        ia = j
        ib = j + R_half
    x_tok = X + b * stride_xb + s[:, None] * stride_xs + h * stride_xh
    o_tok = OUT + b * stride_ob + s[:, None] * stride_os + h * stride_oh
    mask = s_mask[:, None] & j_mask[None, :]
    xa = tl.load(x_tok + ia[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    xb = tl.load(x_tok + ib[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_tok + ia[None, :] * stride_od, (xa * cos - xb * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_tok + ib[None, :] * stride_od, (xb * cos + xa * sin).to(OUT.dtype.element_ty), mask=mask)

    if HAS_PASS:  # features R..D-1 are not rotated: copy them
        p = 2 * R_half + tl.arange(0, BLOCK_P)
        p_mask = s_mask[:, None] & (p < D)[None, :]
        tl.store(o_tok + p[None, :] * stride_od, tl.load(x_tok + p[None, :] * stride_xd, mask=p_mask), mask=p_mask)


def rotary_blocks(seqlen: int, rotary_dim: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_R, BLOCK_P): tokens per program, and the widths of the pair tile and
    of the pass-through tile (1 when nothing passes through)."""
    block_r = next_power_of_2(rotary_dim // 2)
    block_p = next_power_of_2(head_dim - rotary_dim) if head_dim > rotary_dim else 1
    block_s = max(1, min(next_power_of_2(seqlen), _TILE // block_r))
    return block_s, block_r, block_p


def rotary_fwd(x, cos, sin, position_ids=None, interleaved: bool = False, conjugate: bool = False):
    """Launch: RoPE of x (B, S, H, D), any strides; position_ids None, (S,) or (B, S).
    With ``conjugate`` the rotation is inverted (that is the backward). Returns a new
    contiguous tensor."""
    B, S, H, D = x.shape
    out = empty(x.shape, x.dtype, x.device)
    r_half = cos.shape[1]
    if out.numel() == 0:
        return out
    block_s, block_r, block_p = rotary_blocks(S, 2 * r_half, D)
    n_sblocks = triton.cdiv(S, block_s)
    if position_ids is not None:
        pos = position_ids.expand(B, S)  # (S,) and (1, S) broadcast with stride 0, no copy
        stride_pb, stride_ps = pos.stride()
    else:
        pos, stride_pb, stride_ps = x, 0, 0  # not read
    _rotary_kernel[(B * n_sblocks, H)](
        x, cos, sin, pos, out,
        S, cos.shape[0], r_half, D, n_sblocks,
        *x.stride(), *out.stride(), *cos.stride(), *sin.stride(), stride_pb, stride_ps,
        INTERLEAVED=interleaved, CONJUGATE=conjugate, HAS_POS=position_ids is not None,
        HAS_PASS=D > 2 * r_half, BLOCK_S=block_s, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=_NUM_WARPS,
    )
    return out


def rotary_bwd(dy, cos, sin, position_ids=None, interleaved: bool = False):
    """The gradient w.r.t. x: dy rotated back (the same kernel, sin negated)."""
    return rotary_fwd(dy, cos, sin, position_ids, interleaved, conjugate=True)


def gpu_compile_variants():
    """(kernel, signature, constexprs, num_warps) for kernels/compile_check.py."""
    variants = []
    for dt in ("fp32", "fp16", "bf16"):
        for table in sorted({"fp32", dt}):
            for interleaved in (False, True):
                for has_pos, has_pass in ((False, False), (True, True), (True, False)):
                    sig = {"X": f"*{dt}", "COS": f"*{table}", "SIN": f"*{table}",
                           "POS": "*i32" if interleaved else "*i64", "OUT": f"*{dt}",
                           "S": "i32", "S_max": "i32", "R_half": "i32", "D": "i32", "n_sblocks": "i32"}
                    for name in ("xb", "xs", "xh", "xd", "ob", "os", "oh", "od", "cs", "cd", "ss", "sd", "pb", "ps"):
                        sig[f"stride_{name}"] = "i64" if name in ("xb", "xs", "ob", "os") else "i32"
                    const = {"INTERLEAVED": interleaved, "CONJUGATE": has_pos, "HAS_POS": has_pos,
                             "HAS_PASS": has_pass, "BLOCK_S": 32, "BLOCK_R": 64, "BLOCK_P": 64 if has_pass else 1}
                    variants.append((_rotary_kernel, sig, const, _NUM_WARPS))
    return variants
