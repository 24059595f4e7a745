"""MultiheadAttention: a drop-in for torch.nn.MultiheadAttention on fastlm's attention kernel.

It subclasses torch's module, so the constructor, parameter names (in_proj_weight or
q/k/v_proj_weight, in_proj_bias, out_proj, bias_k, bias_v), initialisation, state_dict
and ``isinstance`` checks are torch's own; only ``forward`` differs.

Two paths, as torch has:
- ``need_weights=False`` is the fast path: the projections are views of one packed matmul
  output where possible (self-attention), and attention runs in fastlm's fused kernel
  (fastlm::attention), never holding the (L, S) scores. key_padding_mask and attn_mask become
  the kernel's boolean or additive mask as broadcast views; ``is_causal=True`` uses the
  kernel's causal block skipping.
- ``need_weights=True`` (torch's default) must return the (L, S) weights, so it computes
  attention in plain PyTorch with the weights materialised. fastlm warns once that
  need_weights=False is the fast path.

torch's own forward hands eval-mode, no-grad, batch-first self-attention to a fused kernel
(torch._native_multi_head_attention); this forward never calls torch's, so fastlm's attention
runs in every mode. torch.nn.TransformerEncoderLayer has a fast path of its own that skips its
self_attn altogether: fastlm.nn.TransformerEncoderLayer (which fastlm.patch swaps in) has none.

Differences from torch, on purpose:
- A query that can see no key (every key masked) gives 0 and zero gradients; torch gives NaN
  on its need_weights=True path and its fused inference path (its SDPA path gives 0 too).

``is_causal`` follows torch's rules (issue 20): without attn_mask it raises torch's
RuntimeError; with one, it is the hint torch takes it for (the causal rule, aligned top-left
as generate_square_subsequent_mask, in place of the mask) unless a key_padding_mask is given or
need_weights=True, where torch uses attn_mask itself and drops the hint, and so does fastlm.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import native_backend
from ..errors import ArgumentError, ArgumentTypeError
from ..ops._eager import compiling
from ..ops.attention import _attention_eager, _native_sdpa, _seed_for
from ..reference.attention import visible

_warned_need_weights = False


def _warn_need_weights_once() -> None:
    global _warned_need_weights
    if not _warned_need_weights:
        _warned_need_weights = True
        warnings.warn("fastlm.nn.MultiheadAttention: need_weights=True (torch's default) materialises the (L, S) "
                      "attention weights in plain PyTorch; pass need_weights=False for fastlm's fused kernel",
                      stacklevel=3)


def _check_mask(name: str, mask: Optional[Tensor], shapes: list[tuple], device) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ArgumentTypeError(f"MultiheadAttention: {name} must be a Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ArgumentTypeError(f"MultiheadAttention: {name} must be boolean or floating point, got {mask.dtype}")
    if tuple(mask.shape) not in shapes:
        raise ArgumentError(f"MultiheadAttention: {name} has shape {list(mask.shape)}; expected "
                            f"{' or '.join(str(list(s)) for s in shapes)}")
    if mask.device != device:
        raise ArgumentError(f"MultiheadAttention: {name} is on {mask.device} but query is on {device}")
    return mask


def _kernel_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], causal: bool, extra_keys: int,
                 B: int, H: int, L: int, S: int, dtype: torch.dtype, device) -> Optional[Tensor]:
    """torch's masks (boolean True = masked out, or additive) as fastlm's: boolean True =
    takes part, or additive, broadcast to (B, H, L, S + extra_keys). Keys appended by
    bias_k / add_zero_attn are visible to every query, as in torch."""
    parts = []  # each broadcastable to (B, H, L, S)
    if attn_mask is not None:
        m = attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask.reshape(B, H, L, S)
        parts.append(~m if m.dtype == torch.bool else m)
    if key_padding_mask is not None:
        m = key_padding_mask[:, None, None, :]
        parts.append(~m if m.dtype == torch.bool else m)
    if causal:
        parts.append(visible(L, S, False, -1, 0, device)[None, None])
    if not parts:
        return None
    if all(p.dtype == torch.bool for p in parts):
        mask = parts[0]
        for p in parts[1:]:
            mask = mask & p
        pad_value = True
    else:
        zero = torch.zeros((), dtype=dtype, device=device)
        mask = zero
        for p in parts:
            mask = mask + (torch.where(p, zero, float("-inf")) if p.dtype == torch.bool else p.to(dtype))
        pad_value = 0.0
    mask = mask.expand(B, H, L, S)
    if extra_keys:
        mask = F.pad(mask, (0, extra_keys), value=pad_value)
    return mask


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with its forward on fastlm's attention (see the module doc)."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise ArgumentTypeError(f"MultiheadAttention: {name} must be a Tensor, got {type(t).__name__}")
            if t.dim() not in (2, 3):
                raise ArgumentError(f"MultiheadAttention: {name} must be 3-D (batched) or 2-D (unbatched), got shape "
                                    f"{list(t.shape)}")
            if t.dim() != query.dim():
                raise ArgumentError(f"MultiheadAttention: query is {query.dim()}-D but {name} is {t.dim()}-D")
            if t.device != query.device:
                raise ArgumentError(f"MultiheadAttention: {name} is on {t.device} but query is on {query.device}")
        same_kv = key is value
        self_attention = same_kv and query is key
        batched = query.dim() == 3
        if not batched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None and isinstance(key_padding_mask, Tensor) and key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask[None]
        elif not self.batch_first:  # (L, B, E) -> (B, L, E) views
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, E = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        if E != self.embed_dim:
            raise ArgumentError(f"MultiheadAttention: query has embedding dim {E} but the module has {self.embed_dim}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ArgumentError(f"MultiheadAttention: key {list(key.shape)} and value {list(value.shape)} must share "
                                f"batch and sequence length with each other and the batch of query {list(query.shape)}")
        if key.shape[2] != self.kdim or value.shape[2] != self.vdim:
            raise ArgumentError(f"MultiheadAttention: key and value must have {self.kdim} and {self.vdim} features, "
                                f"got {key.shape[2]} and {value.shape[2]}")
        attn_shapes = [(L, S), (B * H, L, S)] if batched else [(L, S), (H, L, S)]
        attn_mask = _check_mask("attn_mask", attn_mask, attn_shapes, query.device)
        key_padding_mask = _check_mask("key_padding_mask", key_padding_mask, [(B, S)], query.device)
        if is_causal:
            if attn_mask is None:
                raise ArgumentError("MultiheadAttention: is_causal=True needs attn_mask as well (as torch: the "
                                    "hint stands for the mask; nn.Transformer.generate_square_subsequent_mask "
                                    "makes it)")
            if key_padding_mask is None and not need_weights:
                attn_mask = None  # the hint: the causal rule stands for the mask
            else:  # torch uses the mask itself here, merged with the padding mask
                is_causal = False

        # Projections. Self-attention: one matmul, q, k, v are views of its output.
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        if self_attention and self._qkv_same_embed_dim:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, E)).unbind(-2)
        else:
            q = F.linear(query, w_q, b_q)
            if same_kv and self._qkv_same_embed_dim:
                k, v = F.linear(key, self.in_proj_weight[E:], None if b_k is None else self.in_proj_bias[E:]) \
                    .unflatten(-1, (2, E)).unbind(-2)
            else:
                k, v = F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(B, 1, E)], dim=1)
            extra += 1
        q, k, v = (t.unflatten(-1, (H, D)) for t in (q, k, v))  # (B, L|S, H, D)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, 1, H, D)], dim=1)
            v = torch.cat([v, v.new_zeros(B, 1, H, D)], dim=1)
            extra += 1
        dropout_p = self.dropout if self.training else 0.0
        # The kernel's causal rule covers the plain case; with appended keys the causal mask
        # is built explicitly (they stay visible to every query, as in torch).
        kernel_causal = is_causal and extra == 0
        mask = _kernel_mask(attn_mask, key_padding_mask, is_causal and not kernel_causal, extra, B, H, L, S,
                            q.dtype, q.device)

        if need_weights:
            _warn_need_weights_once()
            if kernel_causal:
                mask = _kernel_mask(None, key_padding_mask, True, 0, B, H, L, S, q.dtype, q.device)
            out, weights = _attention_with_weights(q, k, v, mask, dropout_p)
        else:
            out = None
            if dropout_p == 0.0 and not (kernel_causal and mask is not None) and q.is_cpu and not compiling() \
                    and native_backend("cpu"):
                # the CPU path: torch's SDPA on (B, H, L, D) views, as fastlm.scaled_dot_product_attention
                # (torch takes no mask beside is_causal: a padding mask with the causal rule stays here)
                out = _native_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, kernel_causal,
                                   D ** -0.5, False)
                out = out.transpose(1, 2) if out is not None else None
            if out is None:
                out, _ = _attention_eager(q, k, v, mask, None, None, None, _seed_for(dropout_p, q.device), D ** -0.5,
                                          False, -1, 0 if kernel_causal else -1, 0.0, dropout_p, 0, 0)
            weights = None
        out = out.flatten(-2)  # (B, L, E)
        if batched and not self.batch_first:
            out = out.transpose(0, 1).contiguous()
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out[0]
            weights = weights[0] if weights is not None else None
        return out, weights


def _attention_with_weights(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float):
    """Attention with the (B, H, L, S) weights materialised (the need_weights path), in plain
    PyTorch. Rows that see no key get weights 0."""
    s = torch.einsum("blhd,bshd->bhls", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    seen = (s != float("-inf")).any(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~seen, 0.0), dim=-1) * seen
    if dropout_p > 0:
        p = F.dropout(p, dropout_p, training=True)
    return torch.einsum("bhls,bshd->blhd", p, v), p
