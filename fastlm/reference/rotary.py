"""Rotary position embedding (RoPE) in plain PyTorch: the oracle for the kernel and the CPU path.

x is (B, S, H, D). Only the first R = 2 * cos.shape[-1] features of each head rotate; the
other D - R pass through (partial rotary, as GPT-NeoX and Phi use). Feature pair j, with
angle theta = angle(position, j), turns by theta:

    out_a = x_a * cos(theta) - x_b * sin(theta)
    out_b = x_b * cos(theta) + x_a * sin(theta)

where the pair (a, b) is (j, j + R/2) for GPT-NeoX / Llama ("rotate_half") and (2j, 2j + 1)
for GPT-J (interleaved). cos and sin are tables (S_max, R/2), read at each token's position:
0..S-1, or position_ids (B, S) or (S,). ``conjugate`` turns by -theta, the inverse rotation,
which is also the backward (the gradient of a rotation is the rotation back).

:func:`rotary_pos_emb` is Hugging Face's apply_rotary_pos_emb in the same terms: q and k in
HF's layouts, cos/sin (B or 1, S, R) or (S, R) whose two halves are equal (HF's
cat((freqs, freqs))), so ``x * cos + rotate_half(x) * sin`` is the (j, j + R/2) rotation
above with the first half of the tables.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cos_sin(seqlen: int, rotary_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """The (seqlen, rotary_dim / 2) tables in float64, on the CPU:
    angle(p, j) = p * base ** (-2j / rotary_dim)."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float64), inv_freq)
    return angles.cos(), angles.sin()


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # Tensor.to costs microseconds even when a no-op


def rotary(x: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None = None, interleaved: bool = False,
           conjugate: bool = False, upcast: bool = True) -> Tensor:
    """RoPE of x (B, S, H, D); computes in float32 when ``upcast`` (float64 stays float64).

    Also fastlm's CPU path, differentiated by torch's autograd: so it does no work that the
    formula does not need (no position arange when position_ids is None, the tables sliced
    rather than gathered, no pass-through concatenation when the whole head rotates)."""
    S = x.shape[1]
    half = cos.shape[-1]
    R = 2 * half
    cd = torch.float64 if x.dtype == torch.float64 else (torch.float32 if upcast else x.dtype)
    if position_ids is None:  # positions 0..S-1: the tables' first S rows, (S, R/2)
        c, s = cos[:S], sin[:S]
    else:  # rows at (S,), (1, S) or (B, S) positions: (..., S, R/2)
        pos = position_ids.long()
        c, s = cos[pos], sin[pos]
    return _turn(x, c.unsqueeze(-2), s.unsqueeze(-2), interleaved, conjugate, cd)  # the same angle for every head


def _turn(x: Tensor, c: Tensor, s: Tensor, interleaved: bool, conjugate: bool, cd: torch.dtype) -> Tensor:
    """x's first R = 2 * c.shape[-1] features turned by the angles c, s (broadcast against
    x's pairs), computed in ``cd``; the rest of x passes through."""
    half = c.shape[-1]
    R = 2 * half
    c, s = _to(c, cd), _to(s, cd)
    if conjugate:
        s = -s
    if interleaved:  # pairs (2j, 2j + 1)
        xr = _to(x[..., :R].unflatten(-1, (half, 2)), cd)
        xa, xb = xr[..., 0], xr[..., 1]
        rotated = torch.stack((xa * c - xb * s, xb * c + xa * s), dim=-1).flatten(-2)
    else:  # pairs (j, j + R/2)
        xa, xb = _to(x[..., :half], cd), _to(x[..., half:R], cd)
        rotated = torch.cat((xa * c - xb * s, xb * c + xa * s), dim=-1)
    if R == x.shape[-1]:
        return _to(rotated, x.dtype)
    return torch.cat((_to(rotated, x.dtype), x[..., R:]), dim=-1)


def rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1, conjugate: bool = False,
                   upcast: bool = True) -> tuple[Tensor, Tensor]:
    """Hugging Face's apply_rotary_pos_emb: q (B, H, S, D), k (B, Hk, S, D) with
    unsqueeze_dim=1, (B, S, H, D) with 2; cos, sin (B or 1, S, R) or (S, R), R <= D (the
    features past R pass through). Only the first half of the tables is read (the halves are
    equal). Returns (q_embed, k_embed), contiguous, in q's and k's dtypes; computed in float32
    when ``upcast`` (float64 stays float64). ``conjugate`` turns back (the backward)."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    if c.dim() == 2:
        c, s = c[None], s[None]
    c, s = c.unsqueeze(unsqueeze_dim), s.unsqueeze(unsqueeze_dim)  # broadcast over the heads

    def one(x: Tensor) -> Tensor:
        cd = torch.float64 if x.dtype == torch.float64 else (torch.float32 if upcast else x.dtype)
        return _turn(x, c, s, False, conjugate, cd)
    return one(q), one(k)


def _table_rows(t: Tensor, B: int, S: int, position_ids: Tensor | None) -> Tensor:
    """Rows of a (S_max, R/2) or (B or 1, S_max, R/2) table at the tokens' positions: (S, R/2)
    or (B or 1, S, R/2) when shared, (B, S, R/2) when gathered per sequence."""
    if t.dim() == 2:
        return t[:S] if position_ids is None else t[position_ids.long()]
    if position_ids is None:
        return t[:, :S]
    pos = position_ids.long().expand(B, S)
    return t.expand(B, *t.shape[1:])[torch.arange(B, device=t.device)[:, None], pos]


def qk_norm_rotary(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, eps: float,
                   position_ids: Tensor | None = None, interleaved: bool = False, weight_offset: float = 0.0,
                   cast_before_weight: bool = False, norm_over: str = "heads",
                   upcast: bool = True) -> tuple[Tensor, Tensor]:
    """RMSNorm of q (B, S, H, D) and k (B, S, H_k, D), then RoPE, as one formula:

        xhat = x / sqrt(mean(x^2) + eps)      over each head's D features (norm_over="heads")
                                               or over a token's H * D features ("all", OLMo-2)
        n    = xhat * (w + weight_offset)      (Gemma's 1 + w with weight_offset=1)
        out  = rotary(n)                       (cos, sin (S_max, R/2) or (B or 1, S_max, R/2))

    computed in float32 when ``upcast`` (float64 stays float64) and rounded once, to x's dtype,
    at the end; with ``cast_before_weight`` xhat is first rounded to x's dtype (Llama's and
    Qwen3's RMSNorm: ``weight * xhat.to(input_dtype)``). Weights: (D,) per head, or (H * D,) and
    (H_k * D,) with norm_over="all". Differentiable by torch's autograd (the CPU path)."""
    B, S = q.shape[:2]
    c, s = _table_rows(cos, B, S, position_ids), _table_rows(sin, B, S, position_ids)
    c, s = c.unsqueeze(-2), s.unsqueeze(-2)  # the same angle for every head

    def one(x: Tensor, w: Tensor) -> Tensor:
        cd = torch.float64 if x.dtype == torch.float64 else (torch.float32 if upcast else x.dtype)
        xf = _to(x, cd)
        dims = (-2, -1) if norm_over == "all" else (-1,)
        xhat = xf * torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + eps)
        if cast_before_weight:
            xhat = _to(_to(xhat, x.dtype), cd)
        wf = _to(w, cd)
        if weight_offset:
            wf = wf + weight_offset
        n = xhat * (wf.view(x.shape[-2], x.shape[-1]) if norm_over == "all" else wf)
        return _to(_turn(n, c, s, interleaved, False, cd), x.dtype)
    return one(q, q_weight), one(k, k_weight)


def qk_norm_rotary_bwd(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor,
                       cos: Tensor, sin: Tensor, eps: float, position_ids: Tensor | None = None,
                       interleaved: bool = False, weight_offset: float = 0.0, cast_before_weight: bool = False,
                       norm_over: str = "heads") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dq_weight, dk_weight) of :func:`qk_norm_rotary`, in closed form (the
    backward op's body on the "torch" backend, where autograd does not run inside a custom op):
    dn = the output gradient rotated back; with g = dn * (w + offset) and xhat = x * rstd,
    dx = rstd * (g - xhat * mean(g * xhat)) over the normalised features, dw = the sum of
    dn * xhat over the tokens (and the heads, per head)."""
    B, S = q.shape[:2]
    c, s = _table_rows(cos, B, S, position_ids), _table_rows(sin, B, S, position_ids)
    c, s = c.unsqueeze(-2), s.unsqueeze(-2)

    def one(dy: Tensor, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = _to(x, cd)
        dims = (-2, -1) if norm_over == "all" else (-1,)
        rstd = torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + eps)
        xhat = xf * rstd
        dn = _turn(_to(dy, cd), c, s, interleaved, True, cd)
        wf = _to(w, cd) + weight_offset
        wf = wf.view(x.shape[-2], x.shape[-1]) if norm_over == "all" else wf
        g = dn * wf
        dx = rstd * (g - xhat * (g * xhat).mean(dim=dims, keepdim=True))
        xw = _to(_to(xhat, x.dtype), cd) if cast_before_weight else xhat
        dw = (dn * xw).sum(dim=(0, 1)) if norm_over == "all" else (dn * xw).sum(dim=(0, 1, 2))
        return _to(dx, x.dtype), _to(dw.reshape(w.shape), w.dtype)
    dq, dqw = one(dq_out, q, q_weight)
    dk, dkw = one(dk_out, k, k_weight)
    return dq, dk, dqw, dkw
