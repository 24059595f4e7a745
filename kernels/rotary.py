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

The second kernel pair, _qk_norm_rotary_fwd_kernel / _qk_norm_rotary_bwd_kernel, fuses the
RMSNorm of q and k (Qwen3, OLMo-2, Gemma 3) with the rotation: see the section at the end.
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
    return variants + _qk_norm_rotary_variants()


def _qk_norm_rotary_variants():
    """The fused q/k norm + rotary, forward and backward: each dtype (weights in the input's
    dtype or float32), per head and ALL_HEADS, the whole head of 128 rotated (Qwen3, Gemma 3,
    OLMo-2) with HF's per-sequence tables, and GPT-J pairs with position_ids and half the head
    passed through, at the tiles a launch gets (qk_norm_rotary_blocks)."""
    variants = []
    for dt in ("fp32", "fp16", "bf16"):
        for wt in sorted({"fp32", dt}):
            for all_heads in (False, True):
                for interleaved, has_pos, rotary_dim in ((False, False, 128), (True, True, 64)):
                    block_s, block_r, block_p = qk_norm_rotary_blocks(4096, rotary_dim, 128, 32 if all_heads else 1)
                    const = {"INTERLEAVED": interleaved, "HAS_POS": has_pos, "ALL_HEADS": all_heads,
                             "CAST_XHAT": dt != "fp32" and not all_heads, "BLOCK_S": block_s, "BLOCK_R": block_r,
                             "BLOCK_P": block_p}
                    sizes = {"S": "i32", "S_max": "i32", "R_half": "i32", "D": "i32", "H": "i32", "H_k": "i32",
                             "n_sblocks": "i32", "eps": "fp32", "w_offset": "fp32"}
                    tables = {f"stride_{n}": "i32" for n in ("cb", "cs", "cd", "sb", "ss", "sd", "pb", "ps")}

                    def strides(*prefixes):
                        return {f"stride_{p}{a}": "i64" if a in ("b", "s") else "i32"
                                for p in prefixes for a in ("b", "s", "h", "d")}
                    common = {"Q": f"*{dt}", "K": f"*{dt}", "QW": f"*{wt}", "KW": f"*{wt}", "COS": "*fp32",
                              "SIN": "*fp32", "POS": "*i64"}
                    fwd = {**common, "OUT_Q": f"*{dt}", "OUT_K": f"*{dt}", **sizes,
                           **strides("q", "k", "oq", "ok"), **tables}
                    variants.append((_qk_norm_rotary_fwd_kernel, fwd, const, _NUM_WARPS))
                    bwd = {**common, "DY_Q": f"*{dt}", "DY_K": f"*{dt}", "DQ": f"*{dt}", "DK": f"*{dt}", "DW": "*fp32",
                           **sizes, "stride_dw": "i64", **strides("q", "k", "dyq", "dyk", "dq", "dk"), **tables}
                    variants.append((_qk_norm_rotary_bwd_kernel, bwd, const, _NUM_WARPS))
    return variants


# ============================================================================ q/k RMSNorm + rotary
#
# Qwen3, OLMo-2 and Gemma 3 normalise q and k (RMSNorm) and then rotate them: unfused that is
# two norm launches and a rotary launch, each reading and writing q and k. Here one launch
# reads q and k once and writes them once, normalised and rotated; the backward is one launch
# too (the rotation back, then RMSNorm's gradient, and per-program partial sums of the weight
# gradients, summed afterwards in a fixed order: deterministic).
#
# The grid is the rotary kernel's: axis 0 the blocks of BLOCK_S tokens of each sequence,
# axis 1 the heads of q then those of k (norm over each head's D features, Qwen3 / Gemma 3),
# or just two programs, q and k (ALL_HEADS: the norm spans the H * D features of a token,
# OLMo-2's q_norm / k_norm; the program then walks the token's heads twice, once for the sum
# of squares and once to write, the second reading L2-resident data). A head is read as three
# tiles: the pair members a and b of the R/2 rotated pairs, and the D - R pass-through
# features (BLOCK_P = 1 and fully masked when the whole head rotates); the weight of a feature
# is w + w_offset (Gemma's 1 + w). CAST_XHAT rounds x * rstd to the input dtype before the
# weight multiplies it (Llama's and Qwen3's order; Gemma's and OLMo-2's multiply in float32).
# q and k have the same head dim (every model with q/k norms).


@triton.jit
def _qkn_angles(COS, SIN, POS, b, s, s_mask, j, j_mask, S_max, stride_cb, stride_cs, stride_cd,
                stride_sb, stride_ss, stride_sd, stride_pb, stride_ps, HAS_POS: tl.constexpr):
    """The (BLOCK_S, BLOCK_R) cos and sin at the tokens' positions (NaN outside the tables)."""
    if HAS_POS:
        pos = tl.load(POS + b * stride_pb + s * stride_ps, mask=s_mask, other=0).to(tl.int64)
    else:
        pos = s
    t_mask = (s_mask & (pos >= 0) & (pos < S_max))[:, None] & j_mask[None, :]
    cos = tl.load(COS + b * stride_cb + pos[:, None] * stride_cs + j[None, :] * stride_cd, mask=t_mask,
                  other=float("nan")).to(tl.float32)
    sin = tl.load(SIN + b * stride_sb + pos[:, None] * stride_ss + j[None, :] * stride_sd, mask=t_mask,
                  other=float("nan")).to(tl.float32)
    return cos, sin


@triton.jit
def _qkn_pairs(j, s_mask, R_half, D, INTERLEAVED: tl.constexpr, BLOCK_P: tl.constexpr):
    """The feature indices of each rotated pair's members (ia, ib: GPT-J's 2j, 2j + 1 or
    NeoX's j, j + R/2), the pass-through features past the rotary dim (ip) and their masks."""
    if INTERLEAVED:
        ia = 2 * j
        ib = 2 * j + 1
    else:
        ia = j
        ib = j + R_half
    ip = 2 * R_half + tl.arange(0, BLOCK_P)
    pp_mask = ip < D
    return ia, ib, ip, pp_mask, s_mask[:, None] & pp_mask[None, :]


@triton.jit
def _qkn_program(t, H, H_k, ALL_HEADS: tl.constexpr):
    """(in_k, first head, head count) of the program on grid axis 1: q's heads then k's, one
    each; with ALL_HEADS (OLMo-2's norm over a token's heads) program 0 takes all of q's, 1 k's."""
    if ALL_HEADS:
        in_k = t == 1
        h0 = 0
        n_h = tl.where(in_k, H_k, H)
    else:
        in_k = t >= H
        h0 = tl.where(in_k, t - H, t)
        n_h = 1
    return in_k, h0, n_h


@triton.jit
def _qkn_load(row, ia, ib, ip, sd, mask, p_mask):
    """One head's three tiles (pair members a, b and the pass-through), float32, 0 outside."""
    xa = tl.load(row + ia[None, :] * sd, mask=mask, other=0.0).to(tl.float32)
    xb = tl.load(row + ib[None, :] * sd, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(row + ip[None, :] * sd, mask=p_mask, other=0.0).to(tl.float32)
    return xa, xb, xp


@triton.jit
def _qkn_weights(W, ia, ib, ip, j_mask, pp_mask, w_offset):
    wa = tl.load(W + ia, mask=j_mask, other=0.0).to(tl.float32) + w_offset
    wb = tl.load(W + ib, mask=j_mask, other=0.0).to(tl.float32) + w_offset
    wp = tl.load(W + ip, mask=pp_mask, other=0.0).to(tl.float32) + w_offset
    return wa[None, :], wb[None, :], wp[None, :]


@triton.jit
def _qkn_xhat(x, rstd, X_DTYPE: tl.constexpr, CAST_XHAT: tl.constexpr):
    xhat = x * rstd
    if CAST_XHAT:
        xhat = xhat.to(X_DTYPE).to(tl.float32)
    return xhat


@triton.jit
def _qkn_fwd_head(x_row, o_row, W, ia, ib, ip, sxd, sod, mask, p_mask, j_mask, pp_mask, cos, sin, rstd, w_offset,
                  CAST_XHAT: tl.constexpr):
    """Normalise (rstd given), weight and rotate one head's tiles; write them."""
    xa, xb, xp = _qkn_load(x_row, ia, ib, ip, sxd, mask, p_mask)
    wa, wb, wp = _qkn_weights(W, ia, ib, ip, j_mask, pp_mask, w_offset)
    dt = x_row.dtype.element_ty
    na = _qkn_xhat(xa, rstd, dt, CAST_XHAT) * wa
    nb = _qkn_xhat(xb, rstd, dt, CAST_XHAT) * wb
    np_ = _qkn_xhat(xp, rstd, dt, CAST_XHAT) * wp
    ot = o_row.dtype.element_ty
    tl.store(o_row + ia[None, :] * sod, (na * cos - nb * sin).to(ot), mask=mask)
    tl.store(o_row + ib[None, :] * sod, (nb * cos + na * sin).to(ot), mask=mask)
    tl.store(o_row + ip[None, :] * sod, np_.to(ot), mask=p_mask)


@triton.jit(do_not_specialize=["S", "n_sblocks", "stride_pb", "stride_cb", "stride_sb"])
def _qk_norm_rotary_fwd_kernel(
    Q, K, QW, KW, COS, SIN, POS, OUT_Q, OUT_K,
    S, S_max, R_half, D, H, H_k, n_sblocks, eps, w_offset,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_oqb, stride_oqs, stride_oqh, stride_oqd,
    stride_okb, stride_oks, stride_okh, stride_okd,
    stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd,
    stride_pb, stride_ps,
    INTERLEAVED: tl.constexpr, HAS_POS: tl.constexpr, ALL_HEADS: tl.constexpr, CAST_XHAT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_sblocks).to(tl.int64)
    s = (pid % n_sblocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < S
    s = s.to(tl.int64)
    j = tl.arange(0, BLOCK_R)
    j_mask = j < R_half
    cos, sin = _qkn_angles(COS, SIN, POS, b, s, s_mask, j, j_mask, S_max, stride_cb, stride_cs, stride_cd,
                           stride_sb, stride_ss, stride_sd, stride_pb, stride_ps, HAS_POS)
    mask = s_mask[:, None] & j_mask[None, :]
    ia, ib, ip, pp_mask, p_mask = _qkn_pairs(j, s_mask, R_half, D, INTERLEAVED, BLOCK_P)
    # Which tensor this program works on: its base pointers and strides are selected, one body
    # of code for both.
    in_k, h0, n_h = _qkn_program(tl.program_id(1), H, H_k, ALL_HEADS)
    x_tok = tl.where(in_k, K + b * stride_kb, Q + b * stride_qb) + s[:, None] * tl.where(in_k, stride_ks, stride_qs)
    o_tok = tl.where(in_k, OUT_K + b * stride_okb, OUT_Q + b * stride_oqb) \
        + s[:, None] * tl.where(in_k, stride_oks, stride_oqs)
    sxh = tl.where(in_k, stride_kh, stride_qh).to(tl.int64)
    sxd = tl.where(in_k, stride_kd, stride_qd)
    soh = tl.where(in_k, stride_okh, stride_oqh).to(tl.int64)
    sod = tl.where(in_k, stride_okd, stride_oqd)
    W = tl.where(in_k, KW, QW)
    if ALL_HEADS:
        # Pass 1: the sum of squares over the token's heads; pass 2 normalises and writes.
        acc = tl.zeros([BLOCK_S], dtype=tl.float32)
        for i in range(0, n_h):
            xa, xb, xp = _qkn_load(x_tok + i * sxh, ia, ib, ip, sxd, mask, p_mask)
            acc += tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1) + tl.sum(xp * xp, axis=1)
        rstd = (1.0 / tl.sqrt(acc / (n_h * D) + eps))[:, None]
        for i in range(0, n_h):
            _qkn_fwd_head(x_tok + i * sxh, o_tok + i * soh, W + i * D, ia, ib, ip, sxd, sod, mask, p_mask, j_mask,
                          pp_mask, cos, sin, rstd, w_offset, CAST_XHAT)
    else:
        xa, xb, xp = _qkn_load(x_tok + h0 * sxh, ia, ib, ip, sxd, mask, p_mask)
        ss = tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1) + tl.sum(xp * xp, axis=1)
        rstd = (1.0 / tl.sqrt(ss / D + eps))[:, None]
        wa, wb, wp = _qkn_weights(W, ia, ib, ip, j_mask, pp_mask, w_offset)
        dt = Q.dtype.element_ty
        na = _qkn_xhat(xa, rstd, dt, CAST_XHAT) * wa
        nb = _qkn_xhat(xb, rstd, dt, CAST_XHAT) * wb
        np_ = _qkn_xhat(xp, rstd, dt, CAST_XHAT) * wp
        o_row = o_tok + h0 * soh
        ot = OUT_Q.dtype.element_ty
        tl.store(o_row + ia[None, :] * sod, (na * cos - nb * sin).to(ot), mask=mask)
        tl.store(o_row + ib[None, :] * sod, (nb * cos + na * sin).to(ot), mask=mask)
        tl.store(o_row + ip[None, :] * sod, np_.to(ot), mask=p_mask)


@triton.jit
def _qkn_dn(dy_row, ia, ib, ip, sdd, mask, p_mask, cos, sin):
    """The gradient at the normalised (pre-rotation) features: dy rotated back."""
    dya, dyb, dyp = _qkn_load(dy_row, ia, ib, ip, sdd, mask, p_mask)
    return dya * cos + dyb * sin, dyb * cos - dya * sin, dyp


@triton.jit
def _qkn_bwd_head(x_row, dy_row, dx_row, dw_row, W, ia, ib, ip, sxd, sdd, sdxd, mask, p_mask, j_mask, pp_mask,
                  cos, sin, rstd, c1, w_offset, CAST_XHAT: tl.constexpr):
    """dx = rstd * (g - xhat * c1), g = dn * w (c1 = mean of g * xhat over the normalised row);
    this head's weight-gradient partial sum(dn * xhat) over the tokens, written to dw_row."""
    xa, xb, xp = _qkn_load(x_row, ia, ib, ip, sxd, mask, p_mask)
    dna, dnb, dnp = _qkn_dn(dy_row, ia, ib, ip, sdd, mask, p_mask, cos, sin)
    wa, wb, wp = _qkn_weights(W, ia, ib, ip, j_mask, pp_mask, w_offset)
    dt = x_row.dtype.element_ty
    dxt = dx_row.dtype.element_ty
    tl.store(dx_row + ia[None, :] * sdxd, (rstd * (dna * wa - xa * rstd * c1)).to(dxt), mask=mask)
    tl.store(dx_row + ib[None, :] * sdxd, (rstd * (dnb * wb - xb * rstd * c1)).to(dxt), mask=mask)
    tl.store(dx_row + ip[None, :] * sdxd, (rstd * (dnp * wp - xp * rstd * c1)).to(dxt), mask=p_mask)
    tl.store(dw_row + ia, tl.sum(dna * _qkn_xhat(xa, rstd, dt, CAST_XHAT), axis=0), mask=j_mask)
    tl.store(dw_row + ib, tl.sum(dnb * _qkn_xhat(xb, rstd, dt, CAST_XHAT), axis=0), mask=j_mask)
    tl.store(dw_row + ip, tl.sum(dnp * _qkn_xhat(xp, rstd, dt, CAST_XHAT), axis=0), mask=pp_mask)


@triton.jit(do_not_specialize=["S", "n_sblocks", "stride_pb", "stride_cb", "stride_sb"])
def _qk_norm_rotary_bwd_kernel(
    Q, K, QW, KW, COS, SIN, POS, DY_Q, DY_K, DQ, DK, DW,
    S, S_max, R_half, D, H, H_k, n_sblocks, eps, w_offset, stride_dw,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_dyqb, stride_dyqs, stride_dyqh, stride_dyqd,
    stride_dykb, stride_dyks, stride_dykh, stride_dykd,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd,
    stride_pb, stride_ps,
    INTERLEAVED: tl.constexpr, HAS_POS: tl.constexpr, ALL_HEADS: tl.constexpr, CAST_XHAT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_sblocks).to(tl.int64)
    s = (pid % n_sblocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < S
    s = s.to(tl.int64)
    j = tl.arange(0, BLOCK_R)
    j_mask = j < R_half
    cos, sin = _qkn_angles(COS, SIN, POS, b, s, s_mask, j, j_mask, S_max, stride_cb, stride_cs, stride_cd,
                           stride_sb, stride_ss, stride_sd, stride_pb, stride_ps, HAS_POS)
    mask = s_mask[:, None] & j_mask[None, :]
    # Masked-off lanes (tokens past S, pairs past R/2) read NaN tables; the row sums below run
    # over them (times x = dy = 0), so they must read 0 here. A real token at a position
    # outside the tables keeps its NaN (on a GPU, where that is not checked).
    cos = tl.where(mask, cos, 0.0)
    sin = tl.where(mask, sin, 0.0)
    ia, ib, ip, pp_mask, p_mask = _qkn_pairs(j, s_mask, R_half, D, INTERLEAVED, BLOCK_P)
    in_k, h0, n_h = _qkn_program(tl.program_id(1), H, H_k, ALL_HEADS)
    x_tok = tl.where(in_k, K + b * stride_kb, Q + b * stride_qb) + s[:, None] * tl.where(in_k, stride_ks, stride_qs)
    dy_tok = tl.where(in_k, DY_K + b * stride_dykb, DY_Q + b * stride_dyqb) \
        + s[:, None] * tl.where(in_k, stride_dyks, stride_dyqs)
    dx_tok = tl.where(in_k, DK + b * stride_dkb, DQ + b * stride_dqb) \
        + s[:, None] * tl.where(in_k, stride_dks, stride_dqs)
    sxh = tl.where(in_k, stride_kh, stride_qh).to(tl.int64)
    sxd = tl.where(in_k, stride_kd, stride_qd)
    sdh = tl.where(in_k, stride_dykh, stride_dyqh).to(tl.int64)
    sdd = tl.where(in_k, stride_dykd, stride_dyqd)
    sdxh = tl.where(in_k, stride_dkh, stride_dqh).to(tl.int64)
    sdxd = tl.where(in_k, stride_dkd, stride_dqd)
    W = tl.where(in_k, KW, QW)
    # This program's row of weight-gradient partials: columns [0, H * D) for q's weight (a head
    # at h * D), then k's; ALL_HEADS programs write all their tensor's heads.
    dw_row = DW + pid.to(tl.int64) * stride_dw + tl.where(in_k, H * D, 0)
    if ALL_HEADS:
        # Pass 1: the row sums (x^2 and g * x over every head); pass 2: dx and the partials.
        acc_xx = tl.zeros([BLOCK_S], dtype=tl.float32)
        acc_gx = tl.zeros([BLOCK_S], dtype=tl.float32)
        for i in range(0, n_h):
            xa, xb, xp = _qkn_load(x_tok + i * sxh, ia, ib, ip, sxd, mask, p_mask)
            dna, dnb, dnp = _qkn_dn(dy_tok + i * sdh, ia, ib, ip, sdd, mask, p_mask, cos, sin)
            wa, wb, wp = _qkn_weights(W + i * D, ia, ib, ip, j_mask, pp_mask, w_offset)
            acc_xx += tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1) + tl.sum(xp * xp, axis=1)
            acc_gx += tl.sum(dna * wa * xa, axis=1) + tl.sum(dnb * wb * xb, axis=1) + tl.sum(dnp * wp * xp, axis=1)
        n = n_h * D
        rstd = 1.0 / tl.sqrt(acc_xx / n + eps)
        c1 = (rstd * acc_gx / n)[:, None]
        rstd = rstd[:, None]
        for i in range(0, n_h):
            _qkn_bwd_head(x_tok + i * sxh, dy_tok + i * sdh, dx_tok + i * sdxh, dw_row + i * D, W + i * D,
                          ia, ib, ip, sxd, sdd, sdxd, mask, p_mask, j_mask, pp_mask, cos, sin, rstd, c1, w_offset,
                          CAST_XHAT)
    else:
        xa, xb, xp = _qkn_load(x_tok + h0 * sxh, ia, ib, ip, sxd, mask, p_mask)
        dna, dnb, dnp = _qkn_dn(dy_tok + h0 * sdh, ia, ib, ip, sdd, mask, p_mask, cos, sin)
        wa, wb, wp = _qkn_weights(W, ia, ib, ip, j_mask, pp_mask, w_offset)
        rstd = 1.0 / tl.sqrt((tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1) + tl.sum(xp * xp, axis=1)) / D + eps)
        gx = tl.sum(dna * wa * xa, axis=1) + tl.sum(dnb * wb * xb, axis=1) + tl.sum(dnp * wp * xp, axis=1)
        c1 = (rstd * gx / D)[:, None]
        rstd = rstd[:, None]
        dx_row = dx_tok + h0 * sdxh
        dxt = DQ.dtype.element_ty
        tl.store(dx_row + ia[None, :] * sdxd, (rstd * (dna * wa - xa * rstd * c1)).to(dxt), mask=mask)
        tl.store(dx_row + ib[None, :] * sdxd, (rstd * (dnb * wb - xb * rstd * c1)).to(dxt), mask=mask)
        tl.store(dx_row + ip[None, :] * sdxd, (rstd * (dnp * wp - xp * rstd * c1)).to(dxt), mask=p_mask)
        dt = Q.dtype.element_ty
        w_row = dw_row + h0 * D
        tl.store(w_row + ia, tl.sum(dna * _qkn_xhat(xa, rstd, dt, CAST_XHAT), axis=0), mask=j_mask)
        tl.store(w_row + ib, tl.sum(dnb * _qkn_xhat(xb, rstd, dt, CAST_XHAT), axis=0), mask=j_mask)
        tl.store(w_row + ip, tl.sum(dnp * _qkn_xhat(xp, rstd, dt, CAST_XHAT), axis=0), mask=pp_mask)


# Elements of one head's tiles (BLOCK_S tokens x (2 * BLOCK_R + BLOCK_P) features) for the fused
# norm: the backward holds x and dy (three tiles each), cos and sin at once. At 4096 (32 tokens
# of a head of 128) the per-head backward spilled 8-48 bytes a thread on sm_80 (none on sm_90);
# at 2048 nothing spills (kernels/compile_check.py --no-spills qk).
_QKN_TILE = 2048
# ALL_HEADS: a program's tokens times the features of all its heads, re-read by pass 2 (from L2).
_QKN_ROW_ELEMENTS = 1 << 15


def qk_norm_rotary_blocks(seqlen: int, rotary_dim: int, head_dim: int, heads: int = 1) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_R, BLOCK_P) of the fused q/k norm + rotary: the pass-through tile holds
    all D - R features (the norm needs the whole head at once). ``heads``: the heads a program
    normalises together (ALL_HEADS), which bounds its tokens."""
    block_r = next_power_of_2(rotary_dim // 2)
    block_p = next_power_of_2(head_dim - rotary_dim) if head_dim > rotary_dim else 1
    per_token = 2 * block_r + (block_p if head_dim > rotary_dim else 0)
    fit = min(_QKN_TILE // per_token, _QKN_ROW_ELEMENTS // (heads * head_dim))
    block_s = max(1, min(next_power_of_2(seqlen), 1 << max(0, fit.bit_length() - 1)))  # a power of 2
    return block_s, block_r, block_p


def _qkn_common(q, k, cos, sin, position_ids, all_heads):
    B, S, H, D = q.shape
    H_k = k.shape[2]
    r_half = cos.shape[-1]
    heads = max(H, H_k) if all_heads else 1
    block_s, block_r, block_p = qk_norm_rotary_blocks(S, 2 * r_half, D, heads)
    n_sblocks = triton.cdiv(S, block_s)
    if position_ids is not None:
        pos = position_ids.expand(B, S)
        stride_pb, stride_ps = pos.stride()
    else:
        pos, stride_pb, stride_ps = q, 0, 0  # not read
    stride_cb = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0
    stride_sb = sin.stride(0) if sin.dim() == 3 and sin.shape[0] > 1 else 0
    grid = (B * n_sblocks, 2 if all_heads else H + H_k)
    tables = (stride_cb, *cos.stride()[-2:], stride_sb, *sin.stride()[-2:], stride_pb, stride_ps)
    consts = dict(HAS_POS=position_ids is not None, ALL_HEADS=all_heads, BLOCK_S=block_s, BLOCK_R=block_r,
                  BLOCK_P=block_p)
    return grid, pos, (S, cos.shape[-2], r_half, D, H, H_k, n_sblocks), tables, consts


def qk_norm_rotary_fwd(q, k, q_weight, k_weight, cos, sin, position_ids, eps: float, interleaved: bool,
                       weight_offset: float, cast_xhat: bool, all_heads: bool, out_q, out_k):
    """Launch: q (B, S, H, D) and k (B, S, H_k, D), any strides, RMS-normalised (over each
    head, or over all of a token's heads with ``all_heads``), weighted by w + weight_offset and
    rotated, into out_q / out_k (any strides, q's and k's shapes). Weights: (D,) per head, or
    (H * D,) / (H_k * D,) with all_heads; contiguous. cos, sin: (S_max, R/2) or
    (B or 1, S_max, R/2)."""
    B, S, H, D = q.shape
    if B * S * (H + k.shape[2]) == 0:
        return out_q, out_k
    grid, pos, sizes, tables, consts = _qkn_common(q, k, cos, sin, position_ids, all_heads)
    _qk_norm_rotary_fwd_kernel[grid](
        q, k, q_weight, k_weight, cos, sin, pos, out_q, out_k,
        *sizes, eps, weight_offset,
        *q.stride(), *k.stride(), *out_q.stride(), *out_k.stride(), *tables,
        INTERLEAVED=interleaved, CAST_XHAT=cast_xhat, **consts, num_warps=_NUM_WARPS,
    )
    return out_q, out_k


def qk_norm_rotary_bwd(dy_q, dy_k, q, k, q_weight, k_weight, cos, sin, position_ids, eps: float, interleaved: bool,
                       weight_offset: float, cast_xhat: bool, all_heads: bool, dq, dk):
    """The backward launch: writes dq, dk (any strides); returns the weight gradients in
    float32, summed over the programs' partials in a fixed order."""
    B, S, H, D = q.shape
    H_k = k.shape[2]
    grid, pos, sizes, tables, consts = _qkn_common(q, k, cos, sin, position_ids, all_heads)
    width = (H + H_k) * D
    if B * S * (H + H_k) == 0:
        partials = torch.zeros((1, width), dtype=torch.float32, device=q.device)
    else:
        partials = empty((grid[0], width), torch.float32, q.device)
        _qk_norm_rotary_bwd_kernel[grid](
            q, k, q_weight, k_weight, cos, sin, pos, dy_q, dy_k, dq, dk, partials,
            *sizes, eps, weight_offset, partials.stride(0),
            *q.stride(), *k.stride(), *dy_q.stride(), *dy_k.stride(), *dq.stride(), *dk.stride(), *tables,
            INTERLEAVED=interleaved, CAST_XHAT=cast_xhat, **consts, num_warps=_NUM_WARPS,
        )
    total = partials.sum(0)
    dwq, dwk = total[:H * D], total[H * D:]
    if not all_heads:
        dwq, dwk = dwq.view(H, D).sum(0), dwk.view(H_k, D).sum(0)
    return dwq, dwk
