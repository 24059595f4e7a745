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
    c = _to(c.unsqueeze(-2), cd)  # (..., S, 1, R/2): the same angle for every head
    s = _to(s.unsqueeze(-2), cd)
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
