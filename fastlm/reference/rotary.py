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


def rotary(x: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None = None, interleaved: bool = False,
           conjugate: bool = False, upcast: bool = True) -> Tensor:
    """RoPE of x (B, S, H, D); computes in float32 when ``upcast`` (float64 stays float64)."""
    B, S = x.shape[0], x.shape[1]
    R = 2 * cos.shape[-1]
    cd = torch.float64 if x.dtype == torch.float64 else (torch.float32 if upcast else x.dtype)
    if position_ids is None:
        position_ids = torch.arange(S, device=x.device)
    pos = position_ids.long().expand(B, S)
    c = cos[pos].to(cd)[:, :, None, :]  # (B, S, 1, R/2): the same angle for every head
    s = sin[pos].to(cd)[:, :, None, :]
    if conjugate:
        s = -s
    xr = x[..., :R].to(cd)
    if interleaved:
        xa, xb = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((xa * c - xb * s, xb * c + xa * s), dim=-1).flatten(-2)
    else:
        xa, xb = xr[..., : R // 2], xr[..., R // 2:]
        rotated = torch.cat((xa * c - xb * s, xb * c + xa * s), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., R:]), dim=-1)
