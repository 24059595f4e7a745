"""Rotary position embedding (RoPE), forward and backward, in Triton.

One kernel does both directions: the backward of a rotation by theta is the rotation by
-theta, so it is the same kernel with sin negated (constexpr CONJUGATE).

One launch can rotate two tensors, q and k (HAS_K): Hugging Face's apply_rotary_pos_emb
turns both by the same angles, and they may differ in head count (GQA), head dim (past the
rotary dim) and strides. Grid axis 1 runs over q's heads, then k's, so q and k cost one
launch forward and one backward, not two each.

One program takes a block of BLOCK_S tokens of one sequence and one head: it reads the
tokens' positions (0..S-1, or position_ids), gathers their rows of the cos/sin tables
(S_max, R/2), and rotates the R/2 feature pairs of the head as two (BLOCK_S, BLOCK_R) tiles,
the pair's first and second members: (j, j + R/2) for GPT-NeoX / Llama, (2j, 2j + 1) for
GPT-J (interleaved; the two tiles are then strided loads that touch the same cache lines).
The tables may have a batch dimension (B, S_max, R/2) (stride_cb, stride_sb; 0 when shared),
as Hugging Face's rotary embedding makes them per sequence. The D - R features past the
rotary dim are copied through unchanged, bit for bit, in tiles no larger than the pair tile.
Every tensor is addressed by its strides, so x can be a view of a packed qkv tensor and
nothing is copied first; the output is written where the caller says (contiguous by
default). The math is float32.

Each head's program reads its rows of the tables again (L2 hits after the first). A program
looping over several heads with the tables held in registers was tried: the tables and masks
live across the loop cost about 40 registers (4 CTAs per SM down to 3) and made the GPT-J
shapes spill (sm_80/sm_90 compiles, `fastlm bench static`); whether the L2 traffic saved
pays for that needs a GPU measurement.

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


# The sequence length (and what follows from it: the block count, position_ids' row stride,
# a per-sequence table's batch stride) changes from call to call: not specialised, so a new
# length reuses the compiled kernel.
@triton.jit(do_not_specialize=["S", "n_sblocks", "stride_pb", "stride_cb", "stride_sb"])
def _rotary_kernel(
    X, K, COS, SIN, POS, OUT, OUT_K,
    S, S_max, R_half, D, D_k, n_pass, H, H_k, n_sblocks,
    stride_xb, stride_xs, stride_xh, stride_xd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_okb, stride_oks, stride_okh, stride_okd,
    stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd,
    stride_pb, stride_ps,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, HAS_POS: tl.constexpr, HAS_PASS: tl.constexpr,
    HAS_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_sblocks).to(tl.int64)
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
    cos = tl.load(COS + b * stride_cb + pos[:, None] * stride_cs + j[None, :] * stride_cd, mask=t_mask,
                  other=float("nan")).to(tl.float32)
    sin = tl.load(SIN + b * stride_sb + pos[:, None] * stride_ss + j[None, :] * stride_sd, mask=t_mask,
                  other=float("nan")).to(tl.float32)
    if CONJUGATE:
        sin = -sin

    if INTERLEAVED:
        ia = 2 * j
        ib = 2 * j + 1
    else:
        ia = j
        ib = j + R_half
    mask = s_mask[:, None] & j_mask[None, :]
    # Axis 1 walks q's heads 0..H-1, then k's H..H+H_k-1. The tensor a head belongs to is
    # chosen by selecting its base pointers and strides: one body of code, not one per tensor.
    h = tl.program_id(1)
    if HAS_K:
        in_k = h >= H
        hh = tl.where(in_k, h - H, h).to(tl.int64)
        x_head = tl.where(in_k, K + b * stride_kb + hh * stride_kh, X + b * stride_xb + hh * stride_xh)
        o_head = tl.where(in_k, OUT_K + b * stride_okb + hh * stride_okh, OUT + b * stride_ob + hh * stride_oh)
        sxs = tl.where(in_k, stride_ks, stride_xs).to(tl.int64)
        sxd = tl.where(in_k, stride_kd, stride_xd)
        sos = tl.where(in_k, stride_oks, stride_os).to(tl.int64)
        sod = tl.where(in_k, stride_okd, stride_od)
        d_h = tl.where(in_k, D_k, D)
    else:
        hh = h.to(tl.int64)
        x_head = X + b * stride_xb + hh * stride_xh
        o_head = OUT + b * stride_ob + hh * stride_oh
        sxs, sxd, sos, sod, d_h = stride_xs, stride_xd, stride_os, stride_od, D
    x_tok = x_head + s[:, None] * sxs  # (BLOCK_S, 1) pointers to the tokens' rows of this head
    o_tok = o_head + s[:, None] * sos
    xa = tl.load(x_tok + ia[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    xb = tl.load(x_tok + ib[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_tok + ia[None, :] * sod, (xa * cos - xb * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_tok + ib[None, :] * sod, (xb * cos + xa * sin).to(OUT.dtype.element_ty), mask=mask)
    if HAS_PASS:  # features R..D-1 are not rotated: copy them, BLOCK_P at a time
        # n_pass: the features past R of the wider of q's and k's heads; the narrower one's
        # are trimmed by the mask.
        for p0 in range(0, n_pass, BLOCK_P):
            p = 2 * R_half + p0 + tl.arange(0, BLOCK_P)
            p_mask = s_mask[:, None] & (p < d_h)[None, :]
            tl.store(o_tok + p[None, :] * sod, tl.load(x_tok + p[None, :] * sxd, mask=p_mask), mask=p_mask)


def rotary_blocks(seqlen: int, rotary_dim: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_R, BLOCK_P): tokens per program, and the widths of the pair tile and
    of the pass-through tile (1 when nothing passes through). head_dim: the widest of the
    rotated tensors' head dims."""
    block_r = next_power_of_2(rotary_dim // 2)
    block_s = max(1, min(next_power_of_2(seqlen), _TILE // block_r))
    # The pass-through tile holds no more elements than the pair tile: a loop of such tiles
    # copies the D - R features. (A (BLOCK_S, D - R) tile took about 250 registers at rotary
    # dim 32 of head dim 128; capped, 128.)
    block_p = min(next_power_of_2(head_dim - rotary_dim), max(1, _TILE // block_s)) if head_dim > rotary_dim else 1
    return block_s, block_r, block_p


def rotary_fwd(x, cos, sin, position_ids=None, interleaved: bool = False, conjugate: bool = False,
               k=None, out=None, out_k=None):
    """Launch: RoPE of x (B, S, H, D), any strides; position_ids None, (S,) or (B, S); cos
    and sin (S_max, R/2), or (B or 1, S_max, R/2) per sequence. With ``conjugate`` the
    rotation is inverted (that is the backward). ``k`` (B, S, H_k, D_k), any strides: rotated
    by the same angles in the same launch. ``out`` / ``out_k``: where to write (any strides,
    x's / k's shape); by default new contiguous tensors. Returns out, or (out, out_k) with k."""
    B, S, H, D = x.shape
    if out is None:
        out = empty(x.shape, x.dtype, x.device)
    H_k, D_k = (k.shape[2], k.shape[3]) if k is not None else (0, D)
    if k is not None and out_k is None:
        out_k = empty(k.shape, k.dtype, k.device)
    result = out if k is None else (out, out_k)
    r_half = cos.shape[-1]
    heads = H + H_k
    if B * S * heads == 0:
        return result
    block_s, block_r, block_p = rotary_blocks(S, 2 * r_half, max(D, D_k))
    n_sblocks = triton.cdiv(S, block_s)
    if position_ids is not None:
        pos = position_ids.expand(B, S)  # (S,) and (1, S) broadcast with stride 0, no copy
        stride_pb, stride_ps = pos.stride()
    else:
        pos, stride_pb, stride_ps = x, 0, 0  # not read
    # A table shared by the batch has batch stride 0.
    stride_cb = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0
    stride_sb = sin.stride(0) if sin.dim() == 3 and sin.shape[0] > 1 else 0
    k_args = (k, out_k) if k is not None else (x, out)  # not read without HAS_K
    k_strides = (*k.stride(), *out_k.stride()) if k is not None else (0,) * 8
    _rotary_kernel[(B * n_sblocks, heads)](
        x, k_args[0], cos, sin, pos, out, k_args[1],
        S, cos.shape[-2], r_half, D, D_k, max(D, D_k) - 2 * r_half, H, H_k, n_sblocks,
        *x.stride(), *k_strides[:4], *out.stride(), *k_strides[4:],
        stride_cb, *cos.stride()[-2:], stride_sb, *sin.stride()[-2:], stride_pb, stride_ps,
        INTERLEAVED=interleaved, CONJUGATE=conjugate, HAS_POS=position_ids is not None,
        HAS_PASS=max(D, D_k) > 2 * r_half, HAS_K=k is not None,
        BLOCK_S=block_s, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=_NUM_WARPS,
    )
    return result


def rotary_bwd(dy, cos, sin, position_ids=None, interleaved: bool = False, dy_k=None, out=None, out_k=None):
    """The gradient w.r.t. x (and k): dy (and dy_k) rotated back (the same kernel, sin negated)."""
    return rotary_fwd(dy, cos, sin, position_ids, interleaved, conjugate=True, k=dy_k, out=out, out_k=out_k)


def gpu_compile_variants():
    """(kernel, signature, constexprs, num_warps) for kernels/compile_check.py: x alone in
    every dtype, table dtype, pairing and position mode; q and k together (HAS_K) with
    per-sequence tables, as apply_rotary_pos_emb launches it."""
    variants = []
    for dt in ("fp32", "fp16", "bf16"):
        for table in sorted({"fp32", dt}):
            for interleaved in (False, True):
                for has_pos, has_pass, has_k in ((False, False, False), (True, True, False), (True, False, False),
                                                 (False, False, True), (False, True, True)):
                    if has_k and interleaved:
                        continue  # apply_rotary_pos_emb pairs (j, j + R/2) only
                    sig = {"X": f"*{dt}", "K": f"*{dt}", "COS": f"*{table}", "SIN": f"*{table}",
                           "POS": "*i32" if interleaved else "*i64", "OUT": f"*{dt}", "OUT_K": f"*{dt}",
                           "S": "i32", "S_max": "i32", "R_half": "i32", "D": "i32", "D_k": "i32", "n_pass": "i32",
                           "H": "i32", "H_k": "i32", "n_sblocks": "i32"}
                    for name in ("xb", "xs", "xh", "xd", "kb", "ks", "kh", "kd", "ob", "os", "oh", "od",
                                 "okb", "oks", "okh", "okd", "cb", "cs", "cd", "sb", "ss", "sd", "pb", "ps"):
                        sig[f"stride_{name}"] = "i64" if name in ("xb", "xs", "kb", "ks", "ob", "os", "okb", "oks") \
                            else "i32"
                    const = {"INTERLEAVED": interleaved, "CONJUGATE": has_pos or has_pass, "HAS_POS": has_pos,
                             "HAS_PASS": has_pass, "HAS_K": has_k, "BLOCK_S": 32, "BLOCK_R": 64,
                             "BLOCK_P": 64 if has_pass else 1}
                    variants.append((_rotary_kernel, sig, const, _NUM_WARPS))
    return variants
