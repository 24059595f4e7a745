"""Flash attention, forward and backward, in Triton (formulas: fastlm/reference/attention.py).

Forward (FlashAttention-2's order): one program per (block of queries, batch, query head)
walks the keys in blocks with an online softmax in base 2 (scores pre-multiplied by
log2(e), so each exponential is one exp2), keeping the output accumulator, the running max
and the running sum in registers. Nothing of size L x S is stored: the program writes the
normalised output and the row's logsumexp, all the backward needs besides q, k, v.

Which key blocks a query block visits is bounded by the causal / sliding-window rule, so a
causal pass costs half; inside a block, positions past a sequence's end, outside the window
or masked out score -inf. A row that sees no key at all ends with sum 0: its output is 0
and its lse +inf, so the backward's exp2(s - lse) is 0 there and no NaN can appear.

Backward, deterministic and without atomics (but for a broadcast mask's gradient, below), in
three kernels: delta = rowsum(dO * O);
dK, dV with one program per (block of keys, batch, key head), looping over the query heads
of its group (GQA) and the query blocks that see it; dQ with one program per (block of
queries, batch, query head), looping over key blocks as the forward does. Probabilities are
recomputed from q, k and the saved lse. dK/dV works on the transposed tile (keys x queries,
S^T = K Q^T): P^T and dS^T are then the left operands of dV += P^T dO and dK += dS^T Q as
they come out of the MMA, in registers, instead of being transposed through shared memory.

An additive mask that needs a gradient (T5's relative position bias, ALiBi-like learned
biases): its gradient is dS itself, the gradient of the final scores before the soft-cap's
chain rule. The dQ kernel, which visits every (query block, key block) tile of a head exactly
once, adds its dS tiles into a float32 buffer of the mask's own shape (the constexpr BIAS_GRAD;
without it nothing changes): stored where the mask is full-size, added with atomics where it
is broadcast (over batch, heads, queries: the sum over the broadcast dims happens in the
kernel, first over the tile's rows for a mask broadcast along queries). The atomics make that
one gradient not bit-deterministic; everything else in the backward is.

Dropout draws tl.rand(seed, offset) from the position (batch, head, query, key): the backward
regenerates exactly the forward's mask, and ``dropout_mask`` exposes it for tests. The seed
is a one-element int64 tensor on the inputs' device (drawn there by the op, from that
device's generator) that each kernel loads: no host value, so a CUDA graph replays the draw.

Rotary inside attention (constexpr ROTARY, flash_attn_func's rotary_cos): q and k are turned
as their tiles are loaded, and dQ, dK (gradients of the turned tiles) turned back in
registers before they are stored; nothing else changes (docs/rotary_in_attention.md).

Layouts: q (B, L, H, D), k and v (B, S, Hk, D), any strides; packed sequences (varlen) are
(total, H, D) with cu_seqlens, and the KV cache passes the used length per batch.

Launches: every grid is one axis of (batch x head, block) pairs, decoded by ``_tile``: CUDA
allows 2^31 - 1 programs on axis 0 but 65535 on axes 1 and 2, which B * H passes in varlen
batches of short sequences and large decode batches. Index data is clamped where it is read
(``_seq_bounds``): the op checks cu_seqlens and the cache lengths on CPU tensors, but on a
GPU that would cost a host sync per call, so a bad value must not reach memory outside q,
k, v or the outputs. Lengths and the strides sized by them are not specialised
(``do_not_specialize``): a new sequence length reuses the compiled kernels.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from . import launch
from .launch import empty, gpu_tiles, next_power_of_2, tf32_allowed

LOG2E = 1.4426950408889634


@triton.jit
def _tanh(x):
    # libdevice is not in the interpreter; this form saturates cleanly to +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _tile(extent, H, BLOCK: tl.constexpr):
    """(block, batch, head) of this program. Axis 0 enumerates every (batch x head, block)
    pair, blocks of one head next to each other: CUDA caps axes 1 and 2 at 65535, which
    B * H passes in varlen batches of short sequences and large decode batches."""
    pid = tl.program_id(0)
    n_blocks = (extent + BLOCK - 1) // BLOCK
    bh = pid // n_blocks
    return pid % n_blocks, bh // H, bh % H


@triton.jit
def _seq_bounds(b, CU_Q, CU_K, SEQUSED_K, L, S, TOTAL_Q, TOTAL_K, VARLEN: tl.constexpr, SEQUSED: tl.constexpr):
    """(first row of the sequence in q, its query length, first row in k, its key length).

    Clamped, so no offset or length can address memory past q, k or the cache: a start in
    [0, total rows], an end in [start, total rows], a length at most the longest length (L,
    S: max_seqlen or the cache's length), a used cache length in [0, S]. The op checks these
    on CPU tensors and raises; on a GPU checking would cost a host sync on every call."""
    q_start = b * 0
    k_start = b * 0
    len_q = L
    len_k = S
    if VARLEN:
        q_start = tl.minimum(tl.maximum(tl.load(CU_Q + b), 0), TOTAL_Q)
        len_q = tl.minimum(tl.minimum(tl.maximum(tl.load(CU_Q + b + 1), q_start), TOTAL_Q) - q_start, L)
        k_start = tl.minimum(tl.maximum(tl.load(CU_K + b), 0), TOTAL_K)
        len_k = tl.minimum(tl.minimum(tl.maximum(tl.load(CU_K + b + 1), k_start), TOTAL_K) - k_start, S)
    if SEQUSED:
        len_k = tl.minimum(tl.maximum(tl.load(SEQUSED_K + b), 0), S)
    return q_start.to(tl.int64), len_q, k_start.to(tl.int64), len_k


@triton.jit
def _scores(q, k, om, on, len_q, len_k, shift, window_left, window_right, scale, softcap, slope,
            M, stride_mm, stride_mn,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, MASK: tl.constexpr,
            IEEE: tl.constexpr, ALIBI: tl.constexpr, TRANS: tl.constexpr = False):
    """Scores of a (BLOCK_M, BLOCK_N) tile in base 2 with invisible positions at -inf, and
    the tanh of the soft-capped scores (for the backward's chain rule; 0 without softcap).
    om, on: the query and key index of each row or column (offs_m[:, None], offs_n[None, :]);
    TRANS: the (BLOCK_N, BLOCK_M) tile k q^T instead (om = offs_m[None, :], on = offs_n[:, None]).
    M points at this (batch, head)'s mask; MASK: 0 none, 1 boolean, 2 additive. ALIBI: the
    bias -slope * |i + shift - j| on the (soft-capped) scores, flash-attn's, slope this
    (batch, head)'s; a constant, so the backward's chain rule is unchanged."""
    if TRANS:
        if IEEE:
            s = tl.dot(k, tl.trans(q), input_precision="ieee")
        else:
            s = tl.dot(k, tl.trans(q))
    elif IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    th = s * 0.0
    if SOFTCAP:
        th = _tanh(s * (scale / softcap))
        s = th * (softcap * 1.4426950408889634)
    else:
        s = s * (scale * 1.4426950408889634)
    if ALIBI:
        s = s - (slope * 1.4426950408889634) * tl.abs(om + shift - on).to(tl.float32)
    ok = (om < len_q) & (on < len_k)
    if HAS_LEFT:
        ok = ok & (on >= om + shift - window_left)
    if HAS_RIGHT:
        ok = ok & (on <= om + shift + window_right)
    if MASK != 0:
        mv = tl.load(M + om.to(tl.int64) * stride_mm + on * stride_mn, mask=ok, other=0)
        if MASK == 1:
            ok = ok & (mv != 0)
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    s = tl.where(ok, s, -float("inf"))
    if SOFTCAP:
        # The backward multiplies dS by 1 - th^2; at an invisible position (a padded key: 0 * inf
        # = NaN with an infinite q) th must not carry a NaN into dQ through p = 0.
        th = tl.where(ok, th, 0.0)
    return s, th


@triton.jit
def _keep(seed, b, h, om, on, H, L_MAX, S_MAX, dropout_p):
    """The dropout mask of a tile: a counter-based draw per (batch, head, query, key); om, on
    as in _scores (either orientation draws the same mask)."""
    base = ((b * H + h).to(tl.int64) * L_MAX) * S_MAX
    offsets = base + om.to(tl.int64) * S_MAX + on
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _key_range(m_lo, m_hi, len_k, shift, window_left, window_right,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) that queries [m_lo, m_hi] may see; lo a multiple of BLOCK_N."""
    lo = 0
    hi = len_k
    if HAS_RIGHT:
        hi = tl.minimum(hi, m_hi + shift + window_right + 1)
    if HAS_LEFT:
        lo = tl.maximum(0, m_lo + shift - window_left)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _rope_pairs(offs_d, R_half, INTERLEAVED: tl.constexpr):
    """Rotary's pairing of the head dim's features: (partner feature, frequency index j,
    whether d is its pair's first member, whether d rotates at all (d < R = 2 * R_half)).
    GPT-NeoX / Llama pair (j, j + R/2), GPT-J (2j, 2j + 1); features past R pass through
    (their partner is themselves)."""
    if INTERLEAVED:
        first = (offs_d % 2) == 0
        partner = tl.where(first, offs_d + 1, offs_d - 1)
        j = offs_d // 2
    else:
        first = offs_d < R_half
        partner = tl.where(first, offs_d + R_half, offs_d - R_half)
        j = tl.where(first, offs_d, offs_d - R_half)
    rot = offs_d < 2 * R_half
    return tl.where(rot, partner, offs_d), j, first, rot


@triton.jit
def _rope_angles(COS, SIN, pos, row_ok, j, first, rot, stride_rs, stride_rd, S_ROT):
    """(cos, signed sin) of a (rows, BLOCK_D) tile in float32, rows at positions ``pos``: the
    sin is negated on a pair's first member, so a turn is x * c + partner * s for every
    feature alike. Rows that are masked off or outside the table [0, S_ROT) turn by 0 (the
    op refuses positions outside the table; a padded row is 0 anyway)."""
    ok = (row_ok & (pos >= 0) & (pos < S_ROT))[:, None] & rot[None, :]
    off = pos[:, None].to(tl.int64) * stride_rs + j[None, :] * stride_rd
    c = tl.load(COS + off, mask=ok, other=1.0).to(tl.float32)
    s = tl.load(SIN + off, mask=ok, other=0.0).to(tl.float32)
    return c, tl.where(first[None, :], -s, s)


@triton.jit
def _rope_load(rows, stride_d, row_ok, D, offs_d, partner, rot, c, s):
    """A (rows, BLOCK_D) tile of q or k turned by rotary as it is loaded (rows: (rows, 1)
    pointers to each row's feature 0): the tile, and a second strided load of each feature's
    partner (the same cache lines), turned in float32 and rounded to the input's dtype, as
    the separate rotary launch would have stored it."""
    x = tl.load(rows + offs_d[None, :] * stride_d, mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    xp = tl.load(rows + partner[None, :] * stride_d, mask=row_ok[:, None] & rot[None, :], other=0.0)
    y = x.to(tl.float32) * c + xp.to(tl.float32) * s
    return tl.where(rot[None, :], y.to(x.dtype), x)


@triton.jit
def _rope_back(g, partner, rot, c, s):
    """The gradient of a rotated tile turned back (the inverse rotation, float32, in
    registers): each feature's partner gathered from the accumulator itself."""
    gp = tl.gather(g, partner[None, :] + tl.zeros(g.shape, tl.int32), 1)
    return tl.where(rot[None, :], g * c - gp * s, g)


@triton.jit
def _rope_half_angles(COS, SIN, pos, row_ok, j, stride_rs, stride_rd, S_ROT):
    """(cos, sin) (rows, R/2) in float32 at positions ``pos`` (0 turn outside the table)."""
    ok = (row_ok & (pos >= 0) & (pos < S_ROT))[:, None]
    off = pos[:, None].to(tl.int64) * stride_rs + j[None, :] * stride_rd
    return (tl.load(COS + off, mask=ok, other=1.0).to(tl.float32),
            tl.load(SIN + off, mask=ok, other=0.0).to(tl.float32))


@triton.jit
def _rope_merge(a, b, INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (rows, BLOCK_D) tile whose pairs' first members are a and second members b."""
    y = tl.join(a, b)  # (rows, BLOCK_D / 2, 2): y[r, j, 0] = a[r, j]
    if not INTERLEAVED:
        y = tl.permute(y, (0, 2, 1))  # feature t * R/2 + j
    return tl.reshape(y, (a.shape[0], BLOCK_D))


@triton.jit
def _rope_split(g, INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr):
    """_rope_merge's inverse: (first members, second members) of a (rows, BLOCK_D) tile."""
    if INTERLEAVED:
        g3 = tl.reshape(g, (g.shape[0], BLOCK_D // 2, 2))
    else:
        g3 = tl.permute(tl.reshape(g, (g.shape[0], 2, BLOCK_D // 2)), (0, 2, 1))
    return tl.split(g3)


@triton.jit
def _rope_tile(rows, stride_d, row_ok, pos, D, COS, SIN, stride_rs, stride_rd, R_half, S_ROT,
               INTERLEAVED: tl.constexpr, HALVES: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (rows, BLOCK_D) tile of q or k turned by rotary as it is loaded (rows: (rows, 1)
    pointers to each row's feature 0; ``pos`` the rows' positions), in the input's dtype.

    HALVES (the whole head rotates and fills the tile: R = D = BLOCK_D): the pairs' first and
    second members are loaded as two (rows, BLOCK_D / 2) tiles, each element once, turned
    against one (rows, R/2) cos and sin tile, and interleaved back into the head's order
    (tl.join, and for GPT-NeoX's pairing a permute). Otherwise (partial rotary, a padded
    head dim): the tile, a second strided load of each feature's partner (the same cache
    lines) and (rows, BLOCK_D) cos and sin tiles (_rope_load)."""
    if HALVES:
        j = tl.arange(0, BLOCK_D // 2)
        if INTERLEAVED:
            ia = 2 * j
        else:
            ia = j
        ib = ia + (1 if INTERLEAVED else BLOCK_D // 2)
        xa = tl.load(rows + ia[None, :] * stride_d, mask=row_ok[:, None], other=0.0)
        xb = tl.load(rows + ib[None, :] * stride_d, mask=row_ok[:, None], other=0.0)
        c, s = _rope_half_angles(COS, SIN, pos, row_ok, j, stride_rs, stride_rd, S_ROT)
        fa, fb = xa.to(tl.float32), xb.to(tl.float32)
        return _rope_merge((fa * c - fb * s).to(xa.dtype), (fb * c + fa * s).to(xa.dtype), INTERLEAVED, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    partner, j, first, rot = _rope_pairs(offs_d, R_half, INTERLEAVED)
    c, s = _rope_angles(COS, SIN, pos, row_ok, j, first, rot, stride_rs, stride_rd, S_ROT)
    return _rope_load(rows, stride_d, row_ok, D, offs_d, partner, rot, c, s)


@triton.jit
def _rope_back_tile(g, pos, row_ok, COS, SIN, stride_rs, stride_rd, R_half, S_ROT,
                    INTERLEAVED: tl.constexpr, HALVES: tl.constexpr, BLOCK_D: tl.constexpr):
    """The float32 gradient g (rows, BLOCK_D) of a turned tile, turned back (the inverse
    rotation, in registers): split into the pairs' members (HALVES) or each feature's
    partner gathered from g itself (_rope_back)."""
    if HALVES:
        ga, gb = _rope_split(g, INTERLEAVED, BLOCK_D)
        c, s = _rope_half_angles(COS, SIN, pos, row_ok, tl.arange(0, BLOCK_D // 2), stride_rs, stride_rd, S_ROT)
        return _rope_merge(ga * c + gb * s, gb * c - ga * s, INTERLEAVED, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    partner, j, first, rot = _rope_pairs(offs_d, R_half, INTERLEAVED)
    c, s = _rope_angles(COS, SIN, pos, row_ok, j, first, rot, stride_rs, stride_rd, S_ROT)
    return _rope_back(g, partner, rot, c, s)


# Lengths change from call to call (and the lse's strides with them): not specialised, so a
# new length reuses the compiled kernel (Triton specialises ints equal to 1 or divisible by 16).
_VARYING = ["L", "S", "TOTAL_Q", "TOTAL_K", "stride_lb", "stride_lh",
            # a (B, 1, 1, S) or (B, 1, L, S) mask's strides are multiples of S or L * S
            "stride_mb", "stride_mh", "stride_mm"]


@triton.jit
def _kv_rows(BT, keys, ok, PAGE, MAX_PAGES, NUM_PAGES, k_ptr, v_ptr, stride_kb, stride_kn, stride_vb, stride_vn,
             PAGED: tl.constexpr):
    """Addresses of the rows of keys ``keys`` (a vector of key rows: the sequence's first row
    plus the key's index; ``ok`` where they exist) in K and V. Plain: row ``keys`` (k_ptr,
    v_ptr point at this batch's row 0). Paged (flash-attn's block_table): key j lives in page
    BT[j // PAGE], row j % PAGE; the table index and the page are clamped to the table and the
    cache (a bad table gives wrong keys, never an access outside them)."""
    if PAGED:
        keys = keys.to(tl.int32)  # below 2^31 (the lengths are int32): 32-bit division, not 64-bit
        slot = tl.minimum(keys // PAGE, MAX_PAGES - 1)
        page = tl.load(BT + slot, mask=ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), NUM_PAGES - 1).to(tl.int64)
        row = (keys % PAGE).to(tl.int64)
        return k_ptr + page * stride_kb + row * stride_kn, v_ptr + page * stride_vb + row * stride_vn
    return k_ptr + keys.to(tl.int64) * stride_kn, v_ptr + keys.to(tl.int64) * stride_vn


@triton.jit(do_not_specialize=_VARYING + ["PAGE", "MAX_PAGES", "NUM_PAGES", "N_SPLITS", "stride_btb",
                                          "stride_os", "stride_ls"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, M, CU_Q, CU_K, SEQUSED_K, SEED, SLOPES, SINKS, BLOCK_TABLE, LEFTPAD_K, COS, SIN,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh, stride_mb, stride_mh, stride_mm, stride_mn, stride_ab, stride_ah,
    stride_btb, stride_os, stride_ls, stride_rs, stride_rd,
    H, GROUP, L, S, TOTAL_Q, TOTAL_K, D, DV, scale, softcap, window_left, window_right, dropout_p,
    PAGE, MAX_PAGES, NUM_PAGES, N_SPLITS, R_half, S_ROT,
    VARLEN: tl.constexpr, SEQUSED: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, MASK: tl.constexpr,
    DROPOUT: tl.constexpr, IEEE: tl.constexpr, ALIBI: tl.constexpr, SINK: tl.constexpr,
    PAGED: tl.constexpr, LEFTPAD: tl.constexpr, SPLIT: tl.constexpr,
    ROTARY: tl.constexpr, ROT_INTERLEAVED: tl.constexpr, ROT_HALVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The forward; for inference also (flash_attn_with_kvcache, paged varlen) a paged cache
    (PAGED: keys through BLOCK_TABLE, see _kv_rows), keys starting at LEFTPAD_K[b] (LEFTPAD:
    the length is then SEQUSED_K[b] - LEFTPAD_K[b], key 0 the first one after the padding) and
    split-KV (SPLIT: program_id(1) of N_SPLITS takes its share of the key blocks and writes a
    float32 partial output and its lse, -inf where it saw no key, into slice program_id(1) of
    O and LSE; _attn_combine_kernel merges them). ROTARY: q and k turned by rotary as their
    tiles are loaded (_rope_tile; query i at position i + shift, key j at j; tables COS, SIN
    (S_ROT, R_half), strides stride_rs, stride_rd; ROT_INTERLEAVED: GPT-J's pairs;
    ROT_HALVES: the whole head turns, loaded as two half tiles). The backward kernels take
    the same flags and turn dQ, dK back before storing them (_rope_back_tile)."""
    pid_m, b, h = _tile(L, H, BLOCK_M)
    q_start, len_q, k_start, len_k = _seq_bounds(b, CU_Q, CU_K, SEQUSED_K, L, S, TOTAL_Q, TOTAL_K, VARLEN, SEQUSED)
    if PAGED:
        k_start = k_start * 0  # cu_seqlens_k only gives lengths: every sequence has its own pages
    if LEFTPAD:
        pad = tl.minimum(tl.maximum(tl.load(LEFTPAD_K + b), 0), len_k)
        k_start = k_start + pad
        len_k = len_k - pad
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    shift = len_k - len_q if BOTTOM_RIGHT else len_k * 0
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptr = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qm
    # Keys are addressed from the start of this batch's rows (k_start + j: _kv_rows), or of
    # the cache's pages.
    k_ptr = K + hk.to(tl.int64) * stride_kh
    v_ptr = V + hk.to(tl.int64) * stride_vh
    if not PAGED:
        k_ptr += b.to(tl.int64) * stride_kb
        v_ptr += b.to(tl.int64) * stride_vb
    bt_ptr = BLOCK_TABLE + b.to(tl.int64) * stride_btb
    m_ptr = M + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    if ROTARY:
        q = _rope_tile(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm, stride_qd, offs_m < len_q, offs_m + shift, D,
                       COS, SIN, stride_rs, stride_rd, R_half, S_ROT, ROT_INTERLEAVED, ROT_HALVES, BLOCK_D)
    else:
        q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                    mask=(offs_m[:, None] < len_q) & (offs_d[None, :] < D), other=0.0)
    seed = tl.load(SEED) if DROPOUT else 0
    slope = tl.load(SLOPES + b.to(tl.int64) * stride_ab + h * stride_ah) if ALIBI else 0.0

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, hi = _key_range(m0, m0 + BLOCK_M - 1, len_k, shift, window_left, window_right, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    o_base = O
    lse_base = LSE
    if SPLIT:
        # This split's share: whole key blocks, so every block boundary stays a BLOCK_N multiple.
        split = tl.program_id(1)
        per = tl.cdiv(tl.cdiv(len_k, BLOCK_N), N_SPLITS) * BLOCK_N
        lo = tl.maximum(lo, split * per)
        hi = tl.minimum(hi, (split + 1) * per)
        o_base = O + split.to(tl.int64) * stride_os
        lse_base = LSE + split.to(tl.int64) * stride_ls
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        k_rows, v_rows = _kv_rows(bt_ptr, k_start + offs_n, offs_n < len_k, PAGE, MAX_PAGES, NUM_PAGES, k_ptr, v_ptr,
                                  stride_kb, stride_kn, stride_vb, stride_vn, PAGED)
        if ROTARY:
            k = _rope_tile(k_rows[:, None], stride_kd, offs_n < len_k, offs_n, D, COS, SIN, stride_rs, stride_rd, R_half, S_ROT, ROT_INTERLEAVED, ROT_HALVES, BLOCK_D)
        else:
            k = tl.load(k_rows[:, None] + offs_d[None, :] * stride_kd,
                        mask=(offs_n[:, None] < len_k) & (offs_d[None, :] < D), other=0.0)
        s, _ = _scores(q, k, offs_m[:, None], offs_n[None, :], len_q, len_k, shift, window_left, window_right,
                       scale, softcap, slope, m_ptr, stride_mm, stride_mn, HAS_LEFT, HAS_RIGHT, SOFTCAP, MASK, IEEE,
                       ALIBI)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen nothing yet has max -inf: subtract 0 instead, so every
        # exponential of -inf is a clean 0 (never inf - inf).
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _keep(seed, b, h, offs_m[:, None], offs_n[None, :], H, L, S, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = tl.load(v_rows[:, None] + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < len_k) & (offs_dv[None, :] < DV), other=0.0)
        if IEEE:
            acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if SINK:
        # The sink: one more logit (this head's, in natural units) in the denominator with no
        # value (GPT-OSS's s_aux). Taken into the running max and sum like a last key, so the
        # lse includes it and the backward (p = exp(s - lse), delta = rowsum(dO * O)) needs
        # nothing more; a row that sees no key gets out 0 and lse = the sink.
        a = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, a)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.exp2(a - m_safe)
        acc = acc * alpha[:, None]
        m_i = m_new

    # l_i = 0: the row saw no key (lse +inf, out 0). A NaN score leaves NaN in out and lse; a
    # +inf score (l_i NaN from inf - inf) has torch's logsumexp +inf and a NaN output.
    seen = l_i != 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # Unseen rows: lse +inf (the backward's exp(s - lse) is 0), or -inf in a split's partial
    # (the combine weighs it exp(-inf) = 0).
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   -float("inf") if SPLIT else float("inf"))
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    o_ptr = o_base + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_start * stride_om
    tl.store(o_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < len_q) & (offs_dv[None, :] < DV))
    tl.store(lse_base + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m, lse,
             mask=offs_m < len_q)


@triton.jit(do_not_specialize=["L", "TOTAL_Q", "N_SPLITS", "stride_lb", "stride_lh", "stride_os", "stride_ls",
                               "stride_clb", "stride_clh"])
def _attn_combine_kernel(
    OP, LSEP, O, LSE, SINKS, CU_Q,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_pb, stride_pm, stride_ph, stride_pd,
    stride_lb, stride_lh, stride_clb, stride_clh, stride_os, stride_ls,
    H, L, TOTAL_Q, DV, N_SPLITS,
    VARLEN: tl.constexpr, SINK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Split-KV's merge: lse = log sum_s exp(lse_s) (and the sink), out = sum_s exp(lse_s - lse)
    out_s, from the float32 partials OP (N_SPLITS, like the output) and LSEP (N_SPLITS, like
    the lse; strides stride_lb/lh there, stride_clb/clh in LSE). A row no split saw: out 0,
    lse +inf (the sink's logit with sinks), as the one-pass kernel."""
    pid_m, b, h = _tile(L, H, BLOCK_M)
    q_start, len_q, _, _ = _seq_bounds(b, CU_Q, CU_Q, CU_Q, L, L, TOTAL_Q, TOTAL_Q, VARLEN, False)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < len_q
    lp = LSEP + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    m = tl.full([BLOCK_M], -float("inf"), tl.float32)
    lps = lp
    for sp in range(0, N_SPLITS):
        m = tl.maximum(m, tl.load(lps, mask=row_ok, other=-float("inf")))
        lps += stride_ls
    if SINK:
        m = tl.maximum(m, tl.load(SINKS + h).to(tl.float32))
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    op = OP + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph + q_start * stride_pm
    mask = row_ok[:, None] & (offs_dv[None, :] < DV)
    lps = lp
    ops = op
    for sp in range(0, N_SPLITS):
        w = tl.exp(tl.load(lps, mask=row_ok, other=-float("inf")) - m_safe)
        part = tl.load(ops + offs_m[:, None].to(tl.int64) * stride_pm + offs_dv[None, :] * stride_pd,
                       mask=mask, other=0.0)
        lps += stride_ls
        ops += stride_os
        total += w
        acc += w[:, None] * part
    if SINK:
        total += tl.exp(tl.load(SINKS + h).to(tl.float32) - m_safe)
    seen = total != 0.0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m_safe + tl.log(tl.where(seen, total, 1.0)), float("inf"))
    lse = tl.where(m == float("inf"), float("inf"), lse)
    o_ptr = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_start * stride_om
    tl.store(o_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + b.to(tl.int64) * stride_clb + h.to(tl.int64) * stride_clh + q_start + offs_m, lse, mask=row_ok)


@triton.jit(do_not_specialize=["L", "TOTAL_Q", "stride_lb", "stride_lh"])
def _attn_bwd_delta_kernel(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_lb, stride_lh,
    H, L, TOTAL_Q, DV,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta = rowsum(dO * O): sum_j p_ij dp_ij of every query row, in float32."""
    pid_m, b, h = _tile(L, H, BLOCK_M)
    q_start, len_q, _, _ = _seq_bounds(b, CU_Q, CU_Q, CU_Q, L, L, TOTAL_Q, TOTAL_Q, VARLEN, False)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < len_q) & (offs_dv[None, :] < DV)
    rows = q_start + offs_m[:, None]
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows * stride_om
                + offs_dv[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + rows * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m,
             tl.sum(o * do, axis=1), mask=offs_m < len_q)


@triton.jit(do_not_specialize=_VARYING)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_, M, CU_Q, CU_K, SEED, SLOPES, COS, SIN,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_lb, stride_lh, stride_mb, stride_mh, stride_mm, stride_mn, stride_ab, stride_ah, stride_rs, stride_rd,
    H, HK, GROUP, L, S, TOTAL_Q, TOTAL_K, D, DV, scale, softcap, window_left, window_right, dropout_p,
    R_half, S_ROT,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, MASK: tl.constexpr,
    DROPOUT: tl.constexpr, IEEE: tl.constexpr, ALIBI: tl.constexpr,
    ROTARY: tl.constexpr, ROT_INTERLEAVED: tl.constexpr, ROT_HALVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n, b, hk = _tile(S, HK, BLOCK_N)
    q_start, len_q, k_start, len_k = _seq_bounds(b, CU_Q, CU_K, CU_K, L, S, TOTAL_Q, TOTAL_K, VARLEN, False)
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    shift = len_k - len_q if BOTTOM_RIGHT else len_k * 0
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptr = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_kn
    v_ptr = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vn
    if ROTARY:
        # dK is the gradient of the turned keys: turned back at the end (_rope_back_tile).
        k = _rope_tile(k_ptr + offs_n[:, None].to(tl.int64) * stride_kn, stride_kd, offs_n < len_k, offs_n, D,
                       COS, SIN, stride_rs, stride_rd, R_half, S_ROT, ROT_INTERLEAVED, ROT_HALVES, BLOCK_D)
    else:
        k = tl.load(k_ptr + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(offs_n[:, None] < len_k) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(v_ptr + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(offs_n[:, None] < len_k) & (offs_dv[None, :] < DV), other=0.0)
    seed = tl.load(SEED) if DROPOUT else 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    # Queries that may see keys [n0, n0 + BLOCK_N): the key rule solved for i.
    m_lo = 0
    m_hi = len_q
    if HAS_RIGHT:
        m_lo = tl.maximum(0, n0 - shift - window_right)
        m_lo = (m_lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        m_hi = tl.minimum(m_hi, n0 + BLOCK_N - 1 - shift + window_left + 1)
    # One loop over (query head of the group, query block) pairs rather than a loop per head:
    # the software pipeline runs on across heads, and a GQA launch (GROUP > 1, a runtime value)
    # has no inner loop's prologue to hold registers for (it spilled 32-64 B on sm_80 / sm_90).
    n_m = tl.cdiv(tl.maximum(m_hi - m_lo, 0), BLOCK_M)
    for it in range(0, GROUP * n_m):
        g = it // n_m
        m0 = m_lo + (it - g * n_m) * BLOCK_M
        h = hk * GROUP + g
        q_ptr = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qm
        do_ptr = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + q_start * stride_dom
        l_ptr = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
        m_ptr = M + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        offs_m = m0 + offs_m0
        row_ok = offs_m < len_q
        if ROTARY:
            q = _rope_tile(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm, stride_qd, row_ok, offs_m + shift, D,
                           COS, SIN, stride_rs, stride_rd, R_half, S_ROT, ROT_INTERLEAVED, ROT_HALVES, BLOCK_D)
        else:
            q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_ptr + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod,
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(LSE + l_ptr + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + l_ptr + offs_m, mask=row_ok, other=0.0)
        slope = tl.load(SLOPES + b.to(tl.int64) * stride_ab + h * stride_ah) if ALIBI else 0.0
        # The transposed tile, keys x queries: every dot below then has the keys as its rows
        # (the MMA's M), so P^T and dS^T feed dV and dK from registers as they are, with no
        # transpose through shared memory; q and dO serve both as they are and transposed.
        st, tht = _scores(q, k, offs_m[None, :], offs_n[:, None], len_q, len_k, shift, window_left, window_right,
                          scale, softcap, slope, m_ptr, stride_mm, stride_mn, HAS_LEFT, HAS_RIGHT, SOFTCAP, MASK,
                          IEEE, ALIBI, TRANS=True)
        pt = tl.exp2(st - lse[None, :] * 1.4426950408889634)
        # dV's product first (FlashAttention-2's order): P^T in 16 bits is dead before dP^T.
        pdt = pt
        if DROPOUT:
            keep = _keep(seed, b, h, offs_m[None, :], offs_n[:, None], H, L, S, dropout_p)
            pdt = tl.where(keep, pt / (1.0 - dropout_p), 0.0)
        if IEEE:
            dv += tl.dot(pdt.to(do.dtype), do, input_precision="ieee")
            dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            dv += tl.dot(pdt.to(do.dtype), do)
            dpt = tl.dot(v, tl.trans(do))
        if DROPOUT:
            dpt = tl.where(keep, dpt / (1.0 - dropout_p), 0.0)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - tht * tht)
        if IEEE:
            dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee")
        else:
            dk += tl.dot(dst.to(q.dtype), q)

    if ROTARY:  # the angles again rather than two tiles kept live through the loop
        dk = _rope_back_tile(dk, offs_n, offs_n < len_k, COS, SIN, stride_rs, stride_rd, R_half, S_ROT, ROT_INTERLEAVED, ROT_HALVES, BLOCK_D)
    dk_ptr = DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + k_start * stride_dkn
    dv_ptr = DV_ + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + k_start * stride_dvn
    tl.store(dk_ptr + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=(offs_n[:, None] < len_k) & (offs_d[None, :] < D))
    tl.store(dv_ptr + offs_n[:, None].to(tl.int64) * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV_.dtype.element_ty), mask=(offs_n[:, None] < len_k) & (offs_dv[None, :] < DV))


@triton.jit
def _bias_grad(G, ds, offs_m, offs_n, row_ok, col_ok, stride_gm, stride_gn,
               MODE: tl.constexpr, SUM_M: tl.constexpr, SUM_N: tl.constexpr):
    """Adds a (BLOCK_M, BLOCK_N) tile of dS into the mask's gradient G (this batch's and
    head's corner; stride 0 along a broadcast dim). Broadcast along queries (SUM_M: a (B, 1,
    1, S) padding bias) or keys (SUM_N), the tile is summed over that axis first, so one
    atomic per column (row) instead of one per element. MODE 1: plain stores (a full-size
    mask, one writer per element); 2: atomics."""
    g = tl.where(row_ok[:, None] & col_ok[None, :], ds, 0.0)
    if SUM_M and SUM_N:
        tl.atomic_add(G, tl.sum(tl.sum(g, axis=1), axis=0), sem="relaxed")
    elif SUM_M:
        tl.atomic_add(G + offs_n.to(tl.int64) * stride_gn, tl.sum(g, axis=0), mask=col_ok, sem="relaxed")
    elif SUM_N:
        tl.atomic_add(G + offs_m.to(tl.int64) * stride_gm, tl.sum(g, axis=1), mask=row_ok, sem="relaxed")
    else:
        ptrs = G + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :].to(tl.int64) * stride_gn
        if MODE == 2:
            tl.atomic_add(ptrs, g, mask=row_ok[:, None] & col_ok[None, :], sem="relaxed")
        else:
            tl.store(ptrs, g, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=_VARYING + ["stride_sb", "stride_sh", "stride_sm"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, M, CU_Q, CU_K, SEED, DS, SLOPES, COS, SIN,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_lb, stride_lh, stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb, stride_sh, stride_sm, stride_sn, stride_ab, stride_ah, stride_rs, stride_rd,
    H, GROUP, L, S, TOTAL_Q, TOTAL_K, D, DV, scale, softcap, window_left, window_right, dropout_p,
    R_half, S_ROT,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, MASK: tl.constexpr,
    DROPOUT: tl.constexpr, IEEE: tl.constexpr, ALIBI: tl.constexpr,
    ROTARY: tl.constexpr, ROT_INTERLEAVED: tl.constexpr, ROT_HALVES: tl.constexpr,
    BIAS_GRAD: tl.constexpr, BIAS_SUM_M: tl.constexpr, BIAS_SUM_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ of a block of queries of one (batch, head); with BIAS_GRAD also the additive mask's
    gradient dS, accumulated into DS, a float32 buffer of the mask's own shape (strides 0
    along the dims the mask is broadcast over), see _bias_grad. BIAS_GRAD 1 stores (a
    full-size mask: every element has one writer, deterministic); 2 adds with atomics (a
    mask broadcast over batch, heads, queries or keys: several programs, or several tiles of
    one program, add into one element, in an order that varies from run to run, so the
    result is not bit-deterministic)."""
    pid_m, b, h = _tile(L, H, BLOCK_M)
    q_start, len_q, k_start, len_k = _seq_bounds(b, CU_Q, CU_K, CU_K, L, S, TOTAL_Q, TOTAL_K, VARLEN, False)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    shift = len_k - len_q if BOTTOM_RIGHT else len_k * 0
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < len_q
    q_ptr = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qm
    do_ptr = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + q_start * stride_dom
    k_ptr = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + k_start * stride_kn
    v_ptr = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + k_start * stride_vn
    m_ptr = M + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    l_ptr = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
    if ROTARY:
        # dQ is the gradient of the turned queries: turned back before it is stored.
        q = _rope_tile(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm, stride_qd, row_ok, offs_m + shift, D,
                       COS, SIN, stride_rs, stride_rd, R_half, S_ROT, ROT_INTERLEAVED, ROT_HALVES, BLOCK_D)
    else:
        q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(do_ptr + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + l_ptr + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + l_ptr + offs_m, mask=row_ok, other=0.0)
    seed = tl.load(SEED) if DROPOUT else 0
    slope = tl.load(SLOPES + b.to(tl.int64) * stride_ab + h * stride_ah) if ALIBI else 0.0
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(m0, m0 + BLOCK_M - 1, len_k, shift, window_left, window_right, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        if ROTARY:
            k = _rope_tile(k_ptr + offs_n[:, None].to(tl.int64) * stride_kn, stride_kd, offs_n < len_k, offs_n, D,
                           COS, SIN, stride_rs, stride_rd, R_half, S_ROT, ROT_INTERLEAVED, ROT_HALVES, BLOCK_D)
        else:
            k = tl.load(k_ptr + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                        mask=(offs_n[:, None] < len_k) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_ptr + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < len_k) & (offs_dv[None, :] < DV), other=0.0)
        s, th = _scores(q, k, offs_m[:, None], offs_n[None, :], len_q, len_k, shift, window_left, window_right,
                        scale, softcap, slope, m_ptr, stride_mm, stride_mn, HAS_LEFT, HAS_RIGHT, SOFTCAP, MASK, IEEE,
                        ALIBI)
        p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
        if IEEE:
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            dp = tl.dot(do, tl.trans(v))
        if DROPOUT:
            keep = _keep(seed, b, h, offs_m[:, None], offs_n[None, :], H, L, S, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD != 0:  # dense (B, L, H, D) only: masks never come with packed sequences
            _bias_grad(DS + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh, ds, offs_m, offs_n,
                       row_ok, offs_n < len_k, stride_sm, stride_sn, BIAS_GRAD, BIAS_SUM_M, BIAS_SUM_N)
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        if IEEE:
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    if ROTARY:
        dq = _rope_back_tile(dq, offs_m + shift, row_ok, COS, SIN, stride_rs, stride_rd, R_half, S_ROT, ROT_INTERLEAVED, ROT_HALVES, BLOCK_D)
    dq_ptr = DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + q_start * stride_dqm
    tl.store(dq_ptr + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit(do_not_specialize=["L", "S"])
def _dropout_mask_kernel(KEEP, SEED, H, L, S, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The kernels' dropout mask, written out as (B, H, L, S) booleans (for tests)."""
    # Axis 0 only (CUDA caps axes 1 and 2 at 65535): key blocks fastest, then query blocks.
    pid = tl.program_id(0)
    n_blocks = (S + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // n_blocks
    m_blocks = (L + BLOCK_M - 1) // BLOCK_M
    bh = pid_m // m_blocks
    offs_m = (pid_m % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(SEED), bh // H, bh % H, offs_m[:, None], offs_n[None, :], H, L, S, dropout_p)
    ptrs = KEEP + bh.to(tl.int64) * L * S + offs_m[:, None].to(tl.int64) * S + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))


# ----------------------------------------------------------------------------- launchers

class Problem:
    """The shape of one attention call, as the kernels see it: strides are taken per tensor."""

    def __init__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            self.B = cu_seqlens_q.shape[0] - 1
            self.L, self.S = max_seqlen_q, max_seqlen_k
            self.H, self.D = q.shape[1], q.shape[2]
            self.HK, self.DV = k.shape[1], v.shape[2]
            self.total_q, self.total_k = q.shape[0], k.shape[0]  # the rows the kernels clamp cu_seqlens to
        else:
            self.B, self.L, self.H, self.D = q.shape
            self.S, self.HK, self.DV = k.shape[1], k.shape[2], v.shape[3]
            self.total_q, self.total_k = self.L, self.S
        self.group = self.H // self.HK
        self.cu_q, self.cu_k, self.seqused_k = cu_seqlens_q, cu_seqlens_k, seqused_k

    def strides(self, t):
        """(batch, row, head, dim) strides; packed tensors have no batch stride (0)."""
        if self.varlen:
            return (0,) + tuple(t.stride())
        return tuple(t.stride())

    def lse_strides(self, lse):
        return (0, lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1))

    def new_lse(self, q):
        rows = q.shape[0] if self.varlen else self.L
        shape = (self.H, rows) if self.varlen else (self.B, self.H, rows)
        return empty(shape, torch.float32, q.device)


def _blocks(p: Problem, device, dtype, ieee=None, masked=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward (the backward's: _bwd_blocks).
    Small tiles under the interpreter (the same code, faster there, and block edges are
    hit by small tests). ieee: float32 dots in IEEE float32 (None: as torch's setting says).
    masked: a mask is loaded, one 64-bit address per score of the tile in the MMA's layout
    (it may be broadcast along any dim): 128 x 64 spilled 312 B (sm_90) and 552 B (sm_80) at
    head dim 128, 128 x 32 none."""
    if not gpu_tiles(device):
        return 16, 16, 1, 1
    if _ieee(dtype) if ieee is None else ieee:
        # IEEE float32 dots run on CUDA cores (FMA), each thread holding whole rows of both
        # operands: the tensor-core tiles below spill 8-25 KB of stack per thread there (head
        # dims 128-256). These keep the forward and both backward kernels in registers on sm_80 and sm_90
        # with every feature on (tests/test_attention_fp32.py compiles them); past head dim
        # 128, 16 warps and no software pipelining (its next tiles sit in registers too).
        if max(p.D, p.DV) > 128:
            return 32, 16, 16, 1
        return 32, 16, 8, 2
    big_d = max(p.D, p.DV) > 128 or dtype == torch.float32
    if big_d:
        return 64, 32, 4, 2
    if masked and max(p.D, p.DV) > 64:
        return 128, 32, 8, 3
    return 128, 64, 8, 3


def _bwd_blocks(p: Problem, device, dtype, ieee=None, masked=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel and of the dQ kernel
    (BLOCK_M counts queries, BLOCK_N keys, in both).

    Both hold more than the forward: dK/dV two (keys, head dim) float32 accumulators and its
    keys and values (in registers on sm_80, where Triton keeps a loop-invariant MMA operand),
    dQ the queries, dO and a (queries, head dim) accumulator. With the forward's tiles, at
    head dim 128 dK/dV spilled 64 B on sm_90 and dQ 32 B on sm_80, and with dropout, soft-
    capping, grouped-query heads or masks up to 5.5 KB (fastlm.bench.static, Triton 3.9).

    16-bit, head dims up to 128: dK/dV takes 128 keys over 8 warps, so that each warp group
    owns 64 rows of every product (Triton puts all warps of a chained dot along its rows:
    with 64 keys over 8 warps both warp groups would compute the same S^T and dP^T), and as
    many queries per step as fit: 32 up to head dim 64, 16 up to 128 (64 and 32 spilled
    32-48 B there). dQ: 128 queries x 32 keys, two stages at head dim 128 (64 keys spilled
    32-176 B on sm_80), three up to 64 (64 keys spilled 40-56 B with dropout on sm_80).
    masked (a mask is loaded, see _blocks): dK/dV 16 queries, in one stage at head dim 128
    (two spilled 96 B on sm_80; 64 keys over 4 warps 16 B there with Triton 3.6); dQ at head
    dim 128 16 keys. These compile without spills on sm_80 and sm_90 (Triton 3.9; 3.6 but for
    8 B on sm_80 with dropout on packed sequences at head dim 128), on sm_90 every product a
    wgmma, for plain, causal, windowed, soft-capped, dropout, grouped-query, packed and masked
    calls (with the mask's gradient).

    Head dims past 128: dQ 64 x 32 over 8 warps (64 x 32 over 4 spilled 24-72 B; on sm_90 both
    warp groups compute the 64-row products). dK/dV, like float32's, takes half the forward's
    BLOCK_M: 32 x 32 over 4 warps, HMMA on sm_90 and spilling 48-112 B, since two 256-wide
    float32 accumulators over wgmma's 64 rows per warp group fill a thread's registers (a
    fix splits the head dim of dK/dV over programs)."""
    bm, bn, warps, stages = _blocks(p, device, dtype, ieee)
    if not gpu_tiles(device):
        return (bm, bn, warps, stages), (bm, bn, warps, stages)
    if dtype == torch.float32 or (_ieee(dtype) if ieee is None else ieee):
        return (bm // 2, bn, warps, stages), (bm, bn, warps, stages)
    if max(p.D, p.DV) > 128:
        return (bm // 2, bn, warps, stages), (64, 32, 8, 2)
    if max(p.D, p.DV) > 64:
        return ((16, 128, 8, 1), (128, 16, 8, 2)) if masked else ((16, 128, 8, 2), (128, 32, 8, 2))
    return (16 if masked else 32, 128, 8, 3), (128, 32, 8, 3)


def _mask_args(mask, p: Problem):
    """(tensor, kind, strides (b, h, m, n)) of an attention mask broadcast to (B, H, L, S)."""
    if mask is None:
        return None, 0, (0, 0, 0, 0)
    kind = 1 if mask.dtype == torch.bool else 2
    if kind == 1:
        mask = mask.view(torch.uint8)  # same bytes; a broadcast view stays a view
    m = mask.expand(p.B, p.H, p.L, p.S)
    if (p.S - 1) * abs(m.stride(3)) >= 2 ** 31:  # the kernels form key offsets in int32: a transposed
        m = mask.contiguous().expand(p.B, p.H, p.L, p.S)  # mask of 2^31 elements a head is copied first
    return m, kind, tuple(m.stride())


def _bias_grad_args(mask, p: Problem, windowed: bool):
    """The additive mask's gradient buffer for the dQ kernel: float32 in the mask's own shape
    (leading 1s added), never the dense (B, H, L, S) (17 GB at B=8, H=32, L=S=4096). Returns
    (buffer, its strides broadcast to (B, H, L, S), the kernel's BIAS_* flags)."""
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    grad = empty(shape, torch.float32, mask.device)
    strides = grad.expand(p.B, p.H, p.L, p.S).stride()  # 0 exactly along the broadcast dims
    sum_m, sum_n = strides[2] == 0, strides[3] == 0
    shared = sum_m or sum_n or strides[0] == 0 or strides[1] == 0  # several writers per element
    if shared or windowed:
        grad.zero_()  # atomics add into it; tiles outside a window are never visited
    return grad, strides, dict(BIAS_GRAD=2 if shared else 1, BIAS_SUM_M=sum_m, BIAS_SUM_N=sum_n)


def _common_flags(p: Problem, bottom_right, window_left, window_right, softcap, mask_kind, dropout_p, dtype,
                  alibi=None):
    return dict(VARLEN=p.varlen, BOTTOM_RIGHT=bottom_right, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
                SOFTCAP=softcap > 0, MASK=mask_kind, DROPOUT=dropout_p > 0, IEEE=_ieee(dtype), ALIBI=alibi is not None)


def _alibi_args(alibi, p: Problem):
    """(slopes, (batch stride, head stride)): float32 slopes (H,) or (B, H), stride 0 along
    the batch for the first."""
    if alibi is None:
        return None, (0, 0)
    if alibi.dim() == 1:
        return alibi, (0, alibi.stride(0))
    return alibi, tuple(alibi.stride())


def _rotary_bwd_blocks(p, device, dtype, dkdv_tiles, dq_tiles):
    """The backward's tiles with rotary (16-bit, head dims 65-128, on a GPU): each turned tile
    adds its cos and sin and the turn itself to the registers the loop already fills. With
    _bwd_blocks' tiles (16 x 128 and 128 x 32) dK/dV spilled 552-624 B on sm_90 and dQ 264-304
    B (and ptxas fell back to 32 registers and 4 KB of stack for dQ on sm_80); 64 keys for
    dK/dV and 64 queries for dQ spill nothing on sm_90 and 136 B / 24 B on sm_80 (compile_check
    listing in docs/rotary_in_attention.md). The price: dK/dV's 64 keys over 8 warps compute
    S^T in both warp groups (see _bwd_blocks), and dQ reads every key tile twice as often."""
    if gpu_tiles(device) and dtype != torch.float32 and 64 < max(p.D, p.DV) <= 128:
        return (16, 64, 8, 2), (64, 32, 8, 2)
    return dkdv_tiles, dq_tiles


def _rotary_fwd_stages(stages: int) -> int:
    """The forward's pipeline depth with rotary: each stage also holds the keys' partner
    features and the (BLOCK_N, BLOCK_D) float32 cos and sin tiles; three stages at head dim
    128 needed 180 KB of shared memory, more than sm_80's 163 KB (compile_check)."""
    return min(stages, 2)


def _rotary_args(rotary, dummy, block_d: int = 0):
    """(cos, sin, (row stride, column stride), R/2, table rows, constexprs) of rotary =
    (cos, sin, interleaved) or None. cos and sin (S_ROT, R/2) share one pair of strides (a
    sin laid out otherwise is copied: a small table)."""
    if rotary is None:
        return dummy, dummy, (0, 0), 1, 0, dict(ROTARY=False, ROT_INTERLEAVED=False, ROT_HALVES=False)
    cos, sin, interleaved = rotary
    if sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    # HALVES (see _rope_tile): the whole head turns and fills the tile (R = D = BLOCK_D), NeoX
    # pairing only: Triton 3.6 (the GPU machine's) fails to compile the interleaved pairs'
    # join/reshape for sm_90 ("PassManager::run failed", tests/test_triton36.py), so GPT-J's
    # pairing takes the general path (a second strided load of the partners).
    flags = dict(ROTARY=True, ROT_INTERLEAVED=bool(interleaved),
                 ROT_HALVES=2 * cos.shape[1] == block_d and not interleaved)
    return cos, sin, tuple(cos.stride()), cos.shape[1], cos.shape[0], flags


def _ieee(dtype) -> bool:
    """float32 dots in IEEE float32 (FMA on CUDA cores) unless torch allows TF32."""
    return dtype == torch.float32 and not tf32_allowed()


def _grid(blocks: int, heads: int) -> tuple[int]:
    """A 1-D grid of blocks x (batch x head) programs (the kernels decode it with ``_tile``):
    CUDA allows 2^31 - 1 programs on axis 0 but only 65535 on axes 1 and 2."""
    programs = blocks * heads
    if programs > 2 ** 31 - 1:
        raise ValueError(f"attention: {blocks} blocks x {heads} (batch x head) pairs = {programs} programs, "
                         f"more than a CUDA grid holds (2^31 - 1); split the batch")
    return (programs,)


def _dummy(device):
    return torch.empty(1, dtype=torch.int32, device=device)


def attention_fwd(q, k, v, scale: float, bottom_right: bool, window_left: int, window_right: int, softcap: float,
                  mask, dropout_p: float, seed, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
                  max_seqlen_q: int = 0, max_seqlen_k: int = 0, alibi=None, sinks=None, block_table=None,
                  leftpad=None, num_splits: int = 1, rotary=None):
    """Returns (out (like q, with v's head dim), lse float32 (B, H, L) or (H, total)).
    alibi: float32 slopes (H,) or (B, H); sinks: (H,) logits in the softmax's denominator (the
    lse includes them). Inference only (no backward takes these): block_table (B, max pages)
    int32 with k and v (num pages, page size, Hk, D); leftpad (B,) int32, keys starting there;
    num_splits > 1 splits each row's keys over that many programs (then merged). rotary:
    (cos, sin, interleaved) with tables (S_ROT, R/2): q and k are turned as they are loaded,
    query i at position i + shift (S - L bottom-right, else 0), key j at j."""
    p = Problem(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)
    page = num_pages = max_pages = 1
    if block_table is not None and block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    if block_table is not None:
        page, num_pages, max_pages = k.shape[1], k.shape[0], block_table.shape[1]
        if p.varlen:  # packed queries, but the keys are (pages, page size, Hk, D)
            p.HK, p.DV = k.shape[2], v.shape[3]
            p.group = p.H // p.HK
        else:
            p.S = max_pages * page
        p.total_k = 2 ** 31 - 1  # the lengths are clamped to S and the pages to the cache instead
    out = empty(q.shape[:-1] + (p.DV,), q.dtype, q.device)
    lse = p.new_lse(q)
    if q.numel() == 0 or p.B == 0:
        if sinks is not None and lse.numel():  # no key seen: the lse is the sink's
            return out, lse.copy_(sinks.float()[:, None] if p.varlen else sinks.float()[None, :, None])
        return out, lse.fill_(float("inf"))
    mask_t, mask_kind, mask_strides = _mask_args(mask, p)
    slopes, alibi_strides = _alibi_args(alibi, p)
    bm, bn, warps, stages = _blocks(p, q.device, q.dtype, masked=mask is not None)
    if rotary is not None:
        stages = _rotary_fwd_stages(stages)
    num_splits = max(1, min(num_splits, 128, triton.cdiv(p.S, bn)))
    dummy = _dummy(q.device)
    rcos, rsin, rstrides, r_half, s_rot, rflags = _rotary_args(rotary, dummy, max(16, next_power_of_2(p.D)))
    o_dest, lse_dest = out, lse
    if num_splits > 1:  # float32 partials, one slice per split, merged below
        o_dest = empty((num_splits,) + tuple(out.shape), torch.float32, q.device)
        lse_dest = empty((num_splits,) + tuple(lse.shape), torch.float32, q.device)
    grid = _grid(triton.cdiv(p.L, bm), p.B * p.H) + ((num_splits,) if num_splits > 1 else ())
    _attn_fwd_kernel[grid](
        q, k, v, o_dest, lse_dest, mask_t if mask_t is not None else dummy,
        cu_seqlens_q if p.varlen else dummy, cu_seqlens_k if p.varlen else dummy,
        seqused_k if seqused_k is not None else dummy, seed if seed is not None else dummy,
        slopes if slopes is not None else dummy, sinks if sinks is not None else dummy,
        block_table if block_table is not None else dummy, leftpad if leftpad is not None else dummy, rcos, rsin,
        *p.strides(q), *(k.stride() if block_table is not None else p.strides(k)),
        *(v.stride() if block_table is not None else p.strides(v)),
        *p.strides(o_dest[0] if num_splits > 1 else out), *p.lse_strides(lse_dest[0] if num_splits > 1 else lse),
        *mask_strides, *alibi_strides,
        block_table.stride(0) if block_table is not None else 0,
        o_dest.stride(0) if num_splits > 1 else 0, lse_dest.stride(0) if num_splits > 1 else 0, *rstrides,
        p.H, p.group, p.L, p.S, p.total_q, p.total_k, p.D, p.DV, scale, softcap, window_left, window_right,
        dropout_p, page, max_pages, num_pages, num_splits, r_half, s_rot, **rflags,
        SEQUSED=seqused_k is not None, SINK=sinks is not None and num_splits == 1,
        PAGED=block_table is not None, LEFTPAD=leftpad is not None, SPLIT=num_splits > 1,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, next_power_of_2(p.D)), BLOCK_DV=max(16, next_power_of_2(p.DV)),
        num_warps=warps, num_stages=stages,
        **_common_flags(p, bottom_right, window_left, window_right, softcap, mask_kind, dropout_p, q.dtype, alibi),
    )
    if num_splits > 1:
        bm_c = 64 if gpu_tiles(q.device) else 16
        _attn_combine_kernel[_grid(triton.cdiv(p.L, bm_c), p.B * p.H)](
            o_dest, lse_dest, out, lse, sinks if sinks is not None else dummy,
            cu_seqlens_q if p.varlen else dummy,
            *p.strides(out), *p.strides(o_dest[0]), *p.lse_strides(lse_dest[0]), *p.lse_strides(lse),
            o_dest.stride(0), lse_dest.stride(0), p.H, p.L, p.total_q, p.DV, num_splits,
            VARLEN=p.varlen, SINK=sinks is not None, BLOCK_M=bm_c, BLOCK_DV=max(16, next_power_of_2(p.DV)),
            num_warps=(8 if p.DV > 128 else 4) if gpu_tiles(q.device) else 1,
        )
    return out, lse


def split_heuristic(B: int, H: int, L: int, S: int, device) -> int:
    """flash_attn_with_kvcache's num_splits=0: split the keys only when the (query block x
    batch x head) programs would leave most of the GPU idle (a decode step with few heads and
    a long cache), into as many splits as fill about two waves of the SMs, each keeping at
    least four key blocks of work; 1 on the interpreter and for anything that fills the GPU."""
    if not gpu_tiles(device):
        return 1
    device = torch.device(device)
    if device.type == "cuda":
        sms = launch._sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = launch.NOMINAL_SM_COUNT
    bm, bn = 128, 64
    programs = B * H * triton.cdiv(max(L, 1), bm)
    if programs == 0 or programs >= sms:
        return 1
    return max(1, min(2 * sms // programs, triton.cdiv(S, 4 * bn), 128))


def attention_bwd(dout, q, k, v, out, lse, scale: float, bottom_right: bool, window_left: int, window_right: int,
                  softcap: float, mask, dropout_p: float, seed, cu_seqlens_q=None, cu_seqlens_k=None,
                  max_seqlen_q: int = 0, max_seqlen_k: int = 0, bias_grad: bool = False, alibi=None, rotary=None):
    """Returns (dq, dk, dv), each laid out like its input; with bias_grad (a dense call with an
    additive mask) also the mask's gradient in float32, in the mask's own shape (made 4-D with
    leading 1s): the kernel sums dS over the dims the mask is broadcast along. Attention sinks
    need nothing here: the forward's lse includes them (their own gradient is the op's).
    rotary (cos, sin, interleaved) as attention_fwd's: q and k are turned again as they are
    loaded, and dq, dk (the gradients of the turned q, k) turned back before they are stored."""
    p = Problem(q, k, v, cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q, max_seqlen_k)
    if bias_grad and (p.varlen or mask is None or mask.dtype == torch.bool):
        raise ValueError("attention_bwd: bias_grad needs a dense call with an additive (float) mask")
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    ds, ds_strides, ds_flags = None, (0, 0, 0, 0), dict(BIAS_GRAD=0, BIAS_SUM_M=False, BIAS_SUM_N=False)
    if bias_grad:
        ds, ds_strides, ds_flags = _bias_grad_args(mask, p, window_left >= 0 or window_right >= 0)
    if p.B == 0 or q.numel() == 0 or k.numel() == 0:
        grads = (dq.zero_(), dk.zero_(), dv.zero_())
        return grads + (ds.zero_(),) if bias_grad else grads
    mask_t, mask_kind, mask_strides = _mask_args(mask, p)
    dkdv_tiles, dq_tiles = _bwd_blocks(p, q.device, q.dtype, masked=mask is not None)
    if rotary is not None:
        dkdv_tiles, dq_tiles = _rotary_bwd_blocks(p, q.device, q.dtype, dkdv_tiles, dq_tiles)
    block_d, block_dv = max(16, next_power_of_2(p.D)), max(16, next_power_of_2(p.DV))
    dummy = _dummy(q.device)
    cu_q = cu_seqlens_q if p.varlen else dummy
    cu_k = cu_seqlens_k if p.varlen else dummy
    delta = empty(lse.shape, torch.float32, q.device)
    # delta holds two (BLOCK_M, DV) float32 tiles: 128 x 128 over 4 warps spilled 664 bytes per
    # thread on sm_90; 64 rows over 8 warps spill nothing on sm_80 / sm_90 (compile_check).
    bm_delta = min(dq_tiles[0], 64) if gpu_tiles(q.device) else dq_tiles[0]
    _attn_bwd_delta_kernel[_grid(triton.cdiv(p.L, bm_delta), p.B * p.H)](
        out, dout, delta, cu_q, *p.strides(out), *p.strides(dout), *p.lse_strides(lse), p.H, p.L, p.total_q, p.DV,
        VARLEN=p.varlen, BLOCK_M=bm_delta, BLOCK_DV=block_dv, num_warps=8 if gpu_tiles(q.device) else 1,
    )
    flags = _common_flags(p, bottom_right, window_left, window_right, softcap, mask_kind, dropout_p, q.dtype, alibi)
    common = (mask_t if mask_t is not None else dummy, cu_q, cu_k, seed if seed is not None else dummy)
    slopes, alibi_strides = _alibi_args(alibi, p)
    slopes = slopes if slopes is not None else dummy
    rcos, rsin, rstrides, r_half, s_rot, rflags = _rotary_args(rotary, dummy, block_d)
    flags.update(rflags)
    # dK, dV: blocks of keys own their rows, so no two programs write the same element.
    bm, bn, warps, stages = dkdv_tiles
    _attn_bwd_dkdv_kernel[_grid(triton.cdiv(p.S, bn), p.B * p.HK)](
        q, k, v, dout, lse, delta, dk, dv, *common, slopes, rcos, rsin,
        *p.strides(q), *p.strides(k), *p.strides(v), *p.strides(dout), *p.strides(dk), *p.strides(dv),
        *p.lse_strides(lse), *mask_strides, *alibi_strides, *rstrides,
        p.H, p.HK, p.group, p.L, p.S, p.total_q, p.total_k, p.D, p.DV, scale, softcap, window_left, window_right,
        dropout_p, r_half, s_rot,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=warps, num_stages=stages, **flags,
    )
    bm, bn, warps, stages = dq_tiles
    _attn_bwd_dq_kernel[_grid(triton.cdiv(p.L, bm), p.B * p.H)](
        q, k, v, dout, lse, delta, dq, *common, ds if bias_grad else dummy, slopes, rcos, rsin,
        *p.strides(q), *p.strides(k), *p.strides(v), *p.strides(dout), *p.strides(dq),
        *p.lse_strides(lse), *mask_strides, *ds_strides, *alibi_strides, *rstrides,
        p.H, p.group, p.L, p.S, p.total_q, p.total_k, p.D, p.DV, scale, softcap, window_left, window_right,
        dropout_p, r_half, s_rot, **ds_flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_dv,
        num_warps=warps, num_stages=stages, **flags,
    )
    return (dq, dk, dv, ds) if bias_grad else (dq, dk, dv)


def dropout_mask(seed, B: int, H: int, L: int, S: int, dropout_p: float, device) -> torch.Tensor:
    """The (B, H, L, S) boolean mask of kept positions that the kernels draw for ``seed``."""
    keep = torch.empty((B, H, L, S), dtype=torch.int8, device=device)
    bm = bn = 64 if gpu_tiles(device) else 16
    if keep.numel() == 0:
        return keep.bool()
    _dropout_mask_kernel[_grid(triton.cdiv(L, bm) * triton.cdiv(S, bn), B * H)](
        keep, seed, H, L, S, dropout_p, BLOCK_M=bm, BLOCK_N=bn)
    return keep.bool()


def gpu_compile_variants():
    """(kernel, signature, constexprs, options) for kernels/compile_check.py: the tile shapes
    and warps ``_blocks`` picks on a GPU (it is asked here), for a plain call and one with
    every feature on. The IEEE float32 variants must not spill (tests/test_attention_fp32.py)."""
    pointer = {"Q": "dt", "K": "dt", "V": "dt", "O": "dt", "DO": "dt", "DQ": "dt", "DK": "dt", "DV_": "dt",
               "LSE": "*fp32", "DELTA": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "SEQUSED_K": "*i32",
               "SEED": "*i64", "KEEP": "*i8", "DS": "*fp32", "SLOPES": "*fp32", "SINKS": "*fp32",
               "BLOCK_TABLE": "*i32", "LEFTPAD_K": "*i32", "OP": "*fp32", "LSEP": "*fp32", "COS": "*fp32",
               "SIN": "*fp32"}
    floats = {"scale", "softcap", "dropout_p"}

    def signature(kernel, dt, mask_kind):
        sig = {}
        for param in kernel.params:
            name = param.name
            if param.is_constexpr:
                continue
            if name == "M":
                sig[name] = "*u8" if mask_kind == 1 else f"*{dt}"
            elif name in pointer:
                sig[name] = f"*{dt}" if pointer[name] == "dt" else pointer[name]
            else:
                sig[name] = "fp32" if name in floats else "i32"  # strides, sizes, window bounds
        return sig

    variants = []
    gpu = torch.device("cuda")  # a name only: nothing touches a device
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    # (dtype, head dim, every feature on, IEEE float32 dots, the mask-gradient variants).
    # float32 twice: IEEE (torch's default) and TF32 (allowed by torch's matmul setting).
    cases = [("bf16", 64, False, False, ()), ("bf16", 128, False, False, ()),
             ("bf16", 128, True, False, ((2, True, False), (1, False, False), (2, True, True))),
             ("fp16", 256, True, False, ((2, True, False),)),
             ("fp32", 64, False, True, ()), ("fp32", 128, True, True, ((2, True, False), (1, False, False))),
             ("fp32", 256, True, True, ()), ("fp32", 128, True, False, ((2, True, False),))]
    for dt, d, full, ieee, bias_modes in cases:
        # Exactly what the launchers pick on a GPU: _blocks, and _bwd_blocks for the backward.
        bm, bn, warps, stages = _blocks(SimpleNamespace(D=d, DV=d), gpu, dtypes[dt], ieee=ieee, masked=full)
        dkdv_tiles, dq_tiles = _bwd_blocks(SimpleNamespace(D=d, DV=d), gpu, dtypes[dt], ieee=ieee, masked=full)
        flags = dict(VARLEN=full, BOTTOM_RIGHT=full, HAS_LEFT=full, HAS_RIGHT=True, SOFTCAP=full, MASK=2 if full else 0,
                     DROPOUT=full, IEEE=ieee, ALIBI=full, ROTARY=False, ROT_INTERLEAVED=False,
                     ROT_HALVES=False)
        tiles = dict(BLOCK_D=d, BLOCK_DV=d)
        opts = {"num_warps": warps, "num_stages": stages}
        const = dict(flags, SEQUSED=full, SINK=full and not ieee, PAGED=False, LEFTPAD=False, SPLIT=False,
                     BLOCK_M=bm, BLOCK_N=bn, **tiles)
        variants.append((_attn_fwd_kernel, signature(_attn_fwd_kernel, dt, const["MASK"]), const, opts))
        if not ieee and dt != "fp32":
            # flash_attn_with_kvcache: a paged, left-padded cache, split over the keys (float32
            # partials), ALiBi, soft-cap, a window; and without the split, with the sinks.
            kv = dict(flags, VARLEN=False, SEQUSED=True, BOTTOM_RIGHT=True, MASK=0, DROPOUT=False, PAGED=True,
                      LEFTPAD=True, SPLIT=True, SINK=False, BLOCK_M=bm, BLOCK_N=bn, **tiles)
            variants.append((_attn_fwd_kernel, dict(signature(_attn_fwd_kernel, dt, 0), O="*fp32"), kv, opts))
            kv = dict(kv, SPLIT=False, SINK=True)
            variants.append((_attn_fwd_kernel, signature(_attn_fwd_kernel, dt, 0), kv, opts))
            variants.append((_attn_fwd_kernel, dict(signature(_attn_fwd_kernel, dt, 0), O="*fp32"),
                             dict(kv, PAGED=False, LEFTPAD=False, SPLIT=True, SINK=False), opts))
            variants.append((_attn_fwd_kernel, signature(_attn_fwd_kernel, dt, 0),
                             dict(kv, VARLEN=True, SEQUSED=False, LEFTPAD=False), opts))
        if ieee:
            # IEEE float32 decoding, split, dense or paged. With ALiBi and soft-capping on too, head
            # dim 256 spilled on sm_90 by this check's unspecialised signature (docs/STATUS.md).
            kv = dict(flags, VARLEN=False, SEQUSED=True, BOTTOM_RIGHT=True, MASK=0, DROPOUT=False, LEFTPAD=False,
                      SPLIT=True, SINK=False, ALIBI=False, SOFTCAP=False, BLOCK_M=bm, BLOCK_N=bn, **tiles)
            for paged in (False, True):
                variants.append((_attn_fwd_kernel, dict(signature(_attn_fwd_kernel, dt, 0), O="*fp32"),
                                 dict(kv, PAGED=paged), opts))
        if full and ieee:
            # IEEE float32 with every feature and the sinks spilled 8 B at head dim 256 (sm_90): the
            # sinks with everything but dropout (GPT-OSS's calls: a mask, a window, no dropout).
            const = dict(const, SINK=True, DROPOUT=False)
            variants.append((_attn_fwd_kernel, signature(_attn_fwd_kernel, dt, const["MASK"]), const, opts))
        bm, bn, warps, stages = dkdv_tiles
        const = dict(flags, BLOCK_M=bm, BLOCK_N=bn, **tiles)
        variants.append((_attn_bwd_dkdv_kernel, signature(_attn_bwd_dkdv_kernel, dt, const["MASK"]), const,
                         {"num_warps": warps, "num_stages": stages}))
        bm, bn, warps, stages = dq_tiles
        opts = {"num_warps": warps, "num_stages": stages}
        const = dict(flags, BIAS_GRAD=0, BIAS_SUM_M=False, BIAS_SUM_N=False, BLOCK_M=bm, BLOCK_N=bn, **tiles)
        variants.append((_attn_bwd_dq_kernel, signature(_attn_bwd_dq_kernel, dt, const["MASK"]), const, opts))
        # The additive mask's gradient (dense, as SDPA gives it; dropout and softcap on):
        # (mode, summed over queries, summed over keys), e.g. (2, True, False) for a (B, 1, 1, S)
        # padding bias, (1, False, False) for a full-size one.
        for mode, sum_m, sum_n in bias_modes:
            const = dict(flags, VARLEN=False, BOTTOM_RIGHT=False, HAS_LEFT=False, HAS_RIGHT=False, MASK=2,
                         DROPOUT=True, SOFTCAP=True, BIAS_GRAD=mode, BIAS_SUM_M=sum_m, BIAS_SUM_N=sum_n,
                         BLOCK_M=bm, BLOCK_N=bn, **tiles)
            variants.append((_attn_bwd_dq_kernel, signature(_attn_bwd_dq_kernel, dt, 2), const, opts))
    # Rotary inside attention (flash_attn_func's rotary_cos): a GPT's calls, causal, 16-bit, head
    # dims 64 and 128, both pairings; forward and both backward kernels at the tiles they get.
    # (dtype, head dim, interleaved, halves: the whole head turns; else a partial rotary dim)
    for dt, d, interleaved, halves in (("bf16", 64, False, True), ("bf16", 128, False, True), ("bf16", 128, True, False),
                                       ("fp16", 128, False, True), ("bf16", 64, False, False)):
        bm, bn, warps, stages = _blocks(SimpleNamespace(D=d, DV=d), gpu, dtypes[dt])
        stages = _rotary_fwd_stages(stages)  # as attention_fwd and attention_bwd launch them
        dkdv_tiles, dq_tiles = _rotary_bwd_blocks(SimpleNamespace(D=d, DV=d), gpu, dtypes[dt],
                                                  *_bwd_blocks(SimpleNamespace(D=d, DV=d), gpu, dtypes[dt]))
        flags = dict(VARLEN=False, BOTTOM_RIGHT=True, HAS_LEFT=False, HAS_RIGHT=True, SOFTCAP=False, MASK=0,
                     DROPOUT=False, IEEE=False, ALIBI=False, ROTARY=True, ROT_INTERLEAVED=interleaved,
                     ROT_HALVES=halves)
        tiles = dict(BLOCK_D=d, BLOCK_DV=d)
        variants.append((_attn_fwd_kernel, signature(_attn_fwd_kernel, dt, 0),
                         dict(flags, SEQUSED=False, SINK=False, PAGED=False, LEFTPAD=False, SPLIT=False, BLOCK_M=bm,
                              BLOCK_N=bn, **tiles), {"num_warps": warps, "num_stages": stages}))
        bm, bn, warps, stages = dkdv_tiles
        variants.append((_attn_bwd_dkdv_kernel, signature(_attn_bwd_dkdv_kernel, dt, 0),
                         dict(flags, BLOCK_M=bm, BLOCK_N=bn, **tiles), {"num_warps": warps, "num_stages": stages}))
        bm, bn, warps, stages = dq_tiles
        variants.append((_attn_bwd_dq_kernel, signature(_attn_bwd_dq_kernel, dt, 0),
                         dict(flags, BIAS_GRAD=0, BIAS_SUM_M=False, BIAS_SUM_N=False, BLOCK_M=bm, BLOCK_N=bn, **tiles),
                         {"num_warps": warps, "num_stages": stages}))
    for dv in (64, 128, 256):
        variants.append((_attn_combine_kernel, signature(_attn_combine_kernel, "bf16", 0),
                         dict(VARLEN=False, SINK=True, BLOCK_M=64, BLOCK_DV=dv), {"num_warps": 8 if dv > 128 else 4}))
    variants.append((_attn_bwd_delta_kernel, signature(_attn_bwd_delta_kernel, "bf16", 0),
                     dict(VARLEN=True, BLOCK_M=64, BLOCK_DV=128), {"num_warps": 8}))
    variants.append((_dropout_mask_kernel, signature(_dropout_mask_kernel, "bf16", 0),
                     dict(BLOCK_M=64, BLOCK_N=64), {"num_warps": 4}))
    return variants
