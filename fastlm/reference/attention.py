"""Attention in plain PyTorch, as the formula reads: the oracle and the CPU path.

Layout (B, L, H, D) for queries and (B, S, Hk, D) for keys and values (FlashAttention's);
Hk divides H (grouped-query attention: query head h reads key head h // (H / Hk)).

Which keys query i of a sequence sees (L, S: that sequence's query and key lengths):

    shift = S - L if bottom_right else 0       (FlashAttention aligns causal bottom-right,
                                                torch's SDPA top-left)
    i + shift - window_left <= j <= i + shift + window_right

with a window side of -1 meaning unbounded; causal is window_right = 0. On top of that a
boolean mask (True takes part) or an additive float mask, broadcast to (B, H, L, S).

    s = q k^T * scale                  (soft-capped: s <- softcap * tanh(s / softcap))
    p = softmax(s) over the visible keys, lse = logsumexp(s)
    out = (p * keep / (1 - dropout_p)) v

A query that sees no key gets out = 0 and lse = +inf (so the backward's exp(s - lse) is 0
and its gradients are zero): torch's SDPA may give NaN there.

An additive mask is a bias on the final scores (after scaling and soft-capping), so its
gradient is dS = p * (dp - delta) itself, before the soft-cap's chain rule: zero wherever
p is (masked positions, rows that see no key).

ALiBi (flash-attn's): slopes (H,) or (B, H) add -slope * |i + shift - j| to the soft-capped
scores, shift as above (S - L bottom-right); a constant, no gradient. Attention sinks
(GPT-OSS's s_aux): a logit a_h per head joins each row's softmax with no value,

    lse = log(sum_j exp(s_ij) + exp(a_h)),   p_ij = exp(s_ij - lse),

so a row that sees no key has out 0 and lse a_h. The backward's formulas are unchanged given
that lse (the sink is a key whose value is 0), and d(loss)/d(a_h) = -sum_i exp(a_h - lse_i)
* delta_i (``sink_grad``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def visible(L: int, S: int, bottom_right: bool, window_left: int, window_right: int, device) -> Tensor:
    """(L, S) boolean: which keys each query sees under the causal / window rule."""
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    shift = S - L if bottom_right else 0
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if window_left >= 0:
        ok &= j >= i + shift - window_left
    if window_right >= 0:
        ok &= j <= i + shift + window_right
    return ok


def _visible_or_none(L: int, S: int, bottom_right: bool, window_left: int, window_right: int,
                     device) -> Optional[Tensor]:
    """visible(...), or None where every query sees every key (no window)."""
    if window_left < 0 and window_right < 0:
        return None
    return visible(L, S, bottom_right, window_left, window_right, device)


def _alibi(slopes: Tensor, B: int, H: int, L: int, S: int, bottom_right: bool, dtype) -> Tensor:
    """(B or 1, H, L, S): -slope * |i + shift - j|."""
    i = torch.arange(L, device=slopes.device)[:, None]
    j = torch.arange(S, device=slopes.device)[None, :]
    distance = (i + (S - L if bottom_right else 0) - j).abs().to(dtype)
    return -slopes.to(dtype).reshape(-1, H, 1, 1) * distance


def _scores(q: Tensor, k: Tensor, scale: float, softcap: float, mask: Optional[Tensor], ok: Optional[Tensor],
            keep_tanh: bool = False, alibi: Optional[Tensor] = None):
    """(B, H, L, S) scores with everything invisible at -inf; with keep_tanh also tanh of the
    capped scores (the backward's). One (B, H, L, S) tensor, updated in place, as torch's
    math path holds (the boolean masks stay in their own broadcast shapes)."""
    group = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(group, dim=2) if group > 1 else k
    s = torch.einsum("blhd,bshd->bhls", q, kk).mul_(scale)
    th = None
    if softcap > 0:
        s.div_(softcap).tanh_()
        if keep_tanh:
            th = s.clone()
        s.mul_(softcap)
    if alibi is not None:
        s.add_(alibi)
    if mask is not None and mask.dtype != torch.bool:
        s.add_(mask.to(s.dtype))
    if ok is not None:
        s.masked_fill_(~ok, float("-inf"))
    if mask is not None and mask.dtype == torch.bool:
        s.masked_fill_(~mask, float("-inf"))
    return s, th, kk


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _lse(s: Tensor, sinks: Optional[Tensor]) -> Tensor:
    """logsumexp over the keys (and the sink); +inf where a row sees nothing at all."""
    lse = torch.logsumexp(s, dim=-1)  # -inf where a row sees no key
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.to(lse.dtype)[:, None])
    return lse.masked_fill_(torch.isneginf(lse), float("inf"))


def attention_dense(q, k, v, scale: float, bottom_right: bool, window_left: int, window_right: int,
                    softcap: float, mask: Optional[Tensor], keep: Optional[Tensor], dropout_p: float,
                    alibi: Optional[Tensor] = None, sinks: Optional[Tensor] = None):
    """One batch of equal-length sequences. Returns (out in q's dtype, lse (B, H, L) float32/64).
    alibi: slopes (H,) or (B, H); sinks (H,) (see the module docstring)."""
    dt = _compute_dtype(q)
    B, L, H, _ = q.shape
    S = k.shape[1]
    ok = _visible_or_none(L, S, bottom_right, window_left, window_right, q.device)
    bias = None if alibi is None else _alibi(alibi, B, H, L, S, bottom_right, dt)
    s, _, _ = _scores(q.to(dt), k.to(dt), scale, softcap, mask, ok, alibi=bias)
    lse = _lse(s, sinks)
    p = s.sub_(lse[..., None]).exp_()  # in place (s is not needed again): 0 on rows that see nothing
    if keep is not None:
        p.mul_(keep).div_(1 - dropout_p)
    group = H // k.shape[2]
    vv = v.to(dt).repeat_interleave(group, dim=2) if group > 1 else v.to(dt)
    out = torch.einsum("bhls,bshd->blhd", p, vv)
    return out.to(q.dtype), lse


def attention_dense_bwd(dout, q, k, v, out, lse, scale: float, bottom_right: bool, window_left: int,
                        window_right: int, softcap: float, mask: Optional[Tensor], keep: Optional[Tensor],
                        dropout_p: float, bias_grad: bool = False, alibi: Optional[Tensor] = None):
    """Gradients (dq, dk, dv) of attention_dense, by the explicit formula (no autograd); with
    bias_grad also d(mask) = dS, (B, H, L, S) in float32/64 (the caller sums it over the
    mask's broadcast dimensions)."""
    dt = _compute_dtype(q)
    B, L, H, D = q.shape
    S, Hk = k.shape[1], k.shape[2]
    group = H // Hk
    ok = _visible_or_none(L, S, bottom_right, window_left, window_right, q.device)
    qd, do = q.to(dt), dout.to(dt)
    bias = None if alibi is None else _alibi(alibi, B, H, L, S, bottom_right, dt)
    s, th, kk = _scores(qd, k.to(dt), scale, softcap, mask, ok, keep_tanh=True, alibi=bias)
    p = s.sub_(lse.to(dt)[..., None]).exp_()  # in place: s is not needed again
    vv = v.to(dt).repeat_interleave(group, dim=2) if group > 1 else v.to(dt)
    dp = torch.einsum("blhd,bshd->bhls", do, vv)
    delta = (do * out.to(dt)).sum(-1).transpose(1, 2)  # (B, H, L): sum_j p_ij dp_ij
    if keep is not None:
        dv = torch.einsum("bhls,blhd->bshd", (p * keep).div_(1 - dropout_p), do)
        dp.mul_(keep).div_(1 - dropout_p)
    else:
        dv = torch.einsum("bhls,blhd->bshd", p, do)
    ds = dp.sub_(delta[..., None]).mul_(p)  # d(loss)/d(final scores): the additive mask's gradient
    del p, dp
    dbias = ds
    if th is not None:
        if bias_grad:
            ds = ds.clone()
        ds.mul_(th.square_().neg_().add_(1))
    dq = torch.einsum("bhls,bshd->blhd", ds, kk) * scale
    dk = torch.einsum("bhls,blhd->bshd", ds, qd) * scale
    if group > 1:
        dk = dk.reshape(B, S, Hk, group, dk.shape[-1]).sum(3)  # not -1: S may be 0
        dv = dv.reshape(B, S, Hk, group, dv.shape[-1]).sum(3)
    if bias_grad:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _sequences(cu_q: Optional[Tensor], cu_k: Optional[Tensor], seqused_k: Optional[Tensor], B: int, L: int,
               S: int):
    """Per sequence: (batch index, q rows, k rows), slices of the packed or padded tensors."""
    if cu_q is not None:
        cq, ck = cu_q.tolist(), cu_k.tolist()
        return [(b, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(cq) - 1)]
    used = seqused_k.tolist() if seqused_k is not None else [S] * B
    return [(b, slice(0, L), slice(0, used[b])) for b in range(B)]


def _keep_of(keep: Optional[Tensor], b: int, rq: slice, rk: slice) -> Optional[Tensor]:
    if keep is None:
        return None
    return keep[b:b + 1, :, :rq.stop - rq.start, :rk.stop - rk.start]


def attention(q, k, v, scale: float, bottom_right: bool = False, window_left: int = -1, window_right: int = -1,
              softcap: float = 0.0, mask: Optional[Tensor] = None, keep: Optional[Tensor] = None,
              dropout_p: float = 0.0, cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
              seqused_k: Optional[Tensor] = None, alibi: Optional[Tensor] = None, sinks: Optional[Tensor] = None):
    """Attention over dense (B, L, H, D) tensors, or packed (total, H, D) ones with cu_seqlens.

    keep: the dropout mask (B, H, L, S) of kept positions, or None; for packed sequences
    (B, H, max L, max S), sequence b using keep[b, :, :its L, :its S].
    seqused_k: (B,) keys in use per batch (the KV cache's filled length).
    alibi: slopes (H,) or (B, H); sinks: (H,) (see the module docstring).
    Returns (out like q with v's head dim, lse (B, H, L) or (H, total_q), float32/64).
    """
    if (cu_seqlens_q is not None or seqused_k is not None) and mask is not None:
        raise ValueError("attention: masks are for dense batches, not packed or cached ones")
    if cu_seqlens_q is None and seqused_k is None:
        return attention_dense(q, k, v, scale, bottom_right, window_left, window_right, softcap, mask, keep,
                               dropout_p, alibi, sinks)
    dt = _compute_dtype(q)
    out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    varlen = cu_seqlens_q is not None
    B = len(cu_seqlens_q) - 1 if varlen else q.shape[0]
    lse = torch.full((q.shape[-2], q.shape[0]) if varlen else (B, q.shape[2], q.shape[1]), float("inf"),
                     dtype=dt, device=q.device)
    for b, rq, rk in _sequences(cu_seqlens_q, cu_seqlens_k, seqused_k, B, q.shape[1], k.shape[1]):
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        if varlen:
            o, l_ = attention_dense(q[None, rq], k[None, rk], v[None, rk], scale, bottom_right, window_left,
                                    window_right, softcap, None, _keep_of(keep, b, rq, rk), dropout_p, slopes, sinks)
            out[rq] = o[0]
            lse[:, rq] = l_[0]
        else:
            o, l_ = attention_dense(q[b:b + 1], k[b:b + 1, rk], v[b:b + 1, rk], scale, bottom_right, window_left,
                                    window_right, softcap, None, _keep_of(keep, b, rq, rk), dropout_p, slopes, sinks)
            out[b] = o[0]
            lse[b] = l_[0]
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, scale: float, bottom_right: bool = False, window_left: int = -1,
                  window_right: int = -1, softcap: float = 0.0, mask: Optional[Tensor] = None,
                  keep: Optional[Tensor] = None, dropout_p: float = 0.0, cu_seqlens_q: Optional[Tensor] = None,
                  cu_seqlens_k: Optional[Tensor] = None, bias_grad: bool = False, alibi: Optional[Tensor] = None):
    """Gradients (dq, dk, dv) of ``attention`` (dense or packed; no gradient through a KV cache);
    with bias_grad (dense only) also dS (B, H, L, S), the additive mask's unreduced gradient.
    Sinks need nothing here (lse includes them): their gradient is ``sink_grad``."""
    if cu_seqlens_q is None:
        return attention_dense_bwd(dout, q, k, v, out, lse, scale, bottom_right, window_left, window_right,
                                   softcap, mask, keep, dropout_p, bias_grad, alibi)
    if bias_grad:
        raise ValueError("attention_bwd: a mask gradient is for dense batches, not packed ones")
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, rq, rk in _sequences(cu_seqlens_q, cu_seqlens_k, None, 0, 0, 0):
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        g = attention_dense_bwd(dout[None, rq], q[None, rq], k[None, rk], v[None, rk], out[None, rq],
                                lse[None, :, rq], scale, bottom_right, window_left, window_right, softcap, None,
                                _keep_of(keep, b, rq, rk), dropout_p, alibi=slopes)
        dq[rq], dk[rk], dv[rk] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


def attention_cache(q, k, v, scale: float, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                    seqused_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                    leftpad: Optional[Tensor] = None, alibi: Optional[Tensor] = None, sinks: Optional[Tensor] = None):
    """Inference attention over a cache, bottom-right aligned, as flash-attn's paged and
    left-padded calls read (no gradient). Sequence b's keys: rows [start, end) of its cache
    (end: seqused_k[b], the cu_seqlens_k difference, or the cache's length; start: leftpad[b]
    or 0), key j being row start + j; with block_table (B, pages) and k, v (pages, page size,
    Hk, D) row r lives in page block_table[b, r // page size], slot r % page size. Queries:
    q[b] (B, L, H, D) or rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of a packed q. Returns (out,
    lse (B, H, L) or (H, total_q))."""
    varlen = cu_seqlens_q is not None
    B = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    dt = _compute_dtype(q)
    out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    lse = torch.full((q.shape[-2], q.shape[0]) if varlen else (B, q.shape[2], q.shape[1]), float("inf"), dtype=dt,
                     device=q.device)
    page = k.shape[1] if block_table is not None else None
    for b in range(B):
        if varlen:
            rq = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
            first, end = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
            end -= first
            first = 0 if block_table is not None else first
        else:
            first = 0
            end = int(seqused_k[b]) if seqused_k is not None else (
                block_table.shape[1] * page if block_table is not None else k.shape[1])
        start = int(leftpad[b]) if leftpad is not None else 0
        rows = first + torch.arange(start, end, device=q.device)
        if block_table is not None:
            pages = block_table[b].long()[rows // page]
            kk, vv = k[pages, rows % page], v[pages, rows % page]
        elif varlen:
            kk, vv = k[rows], v[rows]
        else:
            kk, vv = k[b, rows], v[b, rows]
        qq = q[rq] if varlen else q[b]
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        o, l_ = attention_dense(qq[None], kk[None], vv[None], scale, True, window_left, window_right, softcap, None,
                                None, 0.0, slopes, sinks)
        if varlen:
            out[rq], lse[:, rq] = o[0], l_[0]
        else:
            out[b], lse[b] = o[0], l_[0]
    return out, lse


def sink_grad(dout: Tensor, out: Tensor, lse: Tensor, sinks: Tensor, varlen: bool = False) -> Tensor:
    """d(loss)/d(sinks) (H,): -sum over batches and queries of exp(a_h - lse) * delta, delta =
    rowsum(dO * O) (the sink's probability times minus the row's mean gradient); lse (B, H, L)
    or (H, total) for packed sequences. float32 (float64 for float64 inputs)."""
    dt = lse.dtype
    delta = (dout.to(dt) * out.to(dt)).sum(-1)  # (B, L, H) or (total, H)
    p_sink = torch.exp(sinks.to(dt)[:, None] - lse) if varlen else torch.exp(sinks.to(dt)[None, :, None] - lse)
    if varlen:
        return -(p_sink * delta.transpose(0, 1)).sum(1)
    return -(p_sink * delta.transpose(1, 2)).sum((0, 2))


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
