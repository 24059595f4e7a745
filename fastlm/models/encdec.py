"""The encoder-decoder Transformer (Vaswani et al.) from fastlm's modules and ops.

The original by default: post-norm LayerNorm, relu MLP, sinusoidal positions, embeddings
scaled by sqrt(d_model) and shared by the encoder, the decoder and the output layer.

- The encoder runs on packed rows (padding removed once; attention through
  fastlm.flash_attn_varlen_func), as BERT does.
- The decoder's self-attention is causal on the padded (B, T) batch (with right padding a
  real token never sees a later pad); its cross-attention reads the packed encoder rows
  through flash_attn_varlen_func, every decoder sequence T long, each source its own length.
- Each sublayer's dropout and residual add are fused into a norm (one kernel,
  norm(dropout(sublayer) + residual)). Post-norm: the sublayer's own norm. Pre-norm: the norm
  that follows, the next sublayer's or the stack's final one (encoder_norm, decoder_norm),
  which also returns the updated residual stream; as fastlm.models.gpt's pre-norm loop.
- The loss goes through fastlm.linear_cross_entropy; generate() caches the decoder's keys and
  values (fastlm.flash_attn_with_kvcache) and the encoder's projected keys and values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import nn as fnn
from ..ops.attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from ..ops.linear_cross_entropy import linear_cross_entropy_with_stats
from .gpt import cache_dtype, decode, sinusoidal_table


@dataclass
class EncoderDecoderConfig:
    vocab_size: int = 32000
    max_seq_len: int = 512
    n_encoder_layer: int = 6
    n_decoder_layer: int = 6
    n_head: int = 8
    n_kv_head: Optional[int] = None
    d_model: int = 512
    d_hidden: int = 2048
    activation: str = "relu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    prenorm: bool = False
    positions: str = "sinusoidal"  # or "learned"
    scale_embeddings: bool = True
    dropout: float = 0.1
    bias: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 1  # the decoder's start token
    eos_token_id: int = 2
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "n_encoder_layer", "n_decoder_layer", "n_head", "d_model",
                     "d_hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EncoderDecoderConfig: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"EncoderDecoderConfig: d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"EncoderDecoderConfig: n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if self.activation not in ("relu", "gelu", "gelu_tanh", "swiglu", "geglu"):
            raise ValueError(f"EncoderDecoderConfig: activation {self.activation!r} is not one of relu, gelu, "
                             f"gelu_tanh, swiglu, geglu")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"EncoderDecoderConfig: norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.positions not in ("sinusoidal", "learned"):
            raise ValueError(f"EncoderDecoderConfig: positions must be 'sinusoidal' or 'learned', got "
                             f"{self.positions!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"EncoderDecoderConfig: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(c: EncoderDecoderConfig) -> torch.nn.Module:
    if c.norm == "rmsnorm":
        return fnn.RMSNorm(c.d_model, eps=c.norm_eps)
    return fnn.LayerNorm(c.d_model, eps=c.norm_eps, bias=c.bias)


class _Sublayers(torch.nn.Module):
    """Residual wiring shared by the encoder and decoder layers; each sublayer's dropout and
    residual add run inside a norm's kernel.

    Post-norm: the state is the tensor x and each sublayer is norm(x + dropout(fn(x))), one call.
    Pre-norm: the state is (hidden, residual): the last sublayer's output, not yet dropped nor
    added, and the residual stream it will be added to (hidden None before the first sublayer).
    Each sublayer's norm takes them, norm(dropout(hidden) + residual), and returns the new stream
    beside the normed input, so the previous sublayer's dropout, the add and this norm are one
    call; the stack's final norm (encoder_norm / decoder_norm) closes the last one (_close)."""

    def __init__(self, c: EncoderDecoderConfig, count: int):
        super().__init__()
        self.config = c
        self.norms = torch.nn.ModuleList(_norm(c) for _ in range(count))

    def residual(self, i: int, state, fn):
        c = self.config
        if c.prenorm:
            hidden, res = state
            if hidden is None:  # the stack's first sublayer: nothing to add yet
                return fn(self.norms[i](res)), res
            normed, res = self.norms[i](hidden, res, return_residual=True, dropout_p=c.dropout)
            return fn(normed), res
        # norm(x + dropout(fn(x))), the dropout (training mode only) and add inside the norm's kernel
        return self.norms[i](fn(state), state, dropout_p=c.dropout)


def _close(norm: torch.nn.Module, state, p: float) -> Tensor:
    """A pre-norm stack's final norm over its last sublayer: norm(dropout(hidden) + residual)."""
    hidden, res = state
    return norm(res) if hidden is None else norm(hidden, res, dropout_p=p)


class EncoderLayer(_Sublayers):
    def __init__(self, c: EncoderDecoderConfig):
        super().__init__(c, 2)
        H, Hk, D = c.n_head, c.kv_heads, c.head_dim
        self.qkv = fnn.Linear(c.d_model, (H + 2 * Hk) * D, bias=c.bias)
        self.proj = fnn.Linear(H * D, c.d_model, bias=c.bias)
        self.mlp = fnn.FeedForward(c.d_model, c.d_hidden, c.activation, bias=c.bias)

    def forward(self, x, cu: Tensor, max_len: int):
        """x: the packed rows (total, d_model); pre-norm: the (hidden, residual) pair (see
        _Sublayers), returned as the pair after this layer's sublayers."""
        c = self.config
        H, Hk, D = c.n_head, c.kv_heads, c.head_dim

        def attend(t):
            q, k, v = self.qkv(t).split([H * D, Hk * D, Hk * D], dim=-1)
            a = flash_attn_varlen_func(q.unflatten(-1, (H, D)), k.unflatten(-1, (Hk, D)), v.unflatten(-1, (Hk, D)),
                                       cu, cu, max_len, max_len, dropout_p=c.dropout if self.training else 0.0)
            return self.proj(a.flatten(-2))

        x = self.residual(0, x, attend)
        return self.residual(1, x, self.mlp)


class DecoderLayer(_Sublayers):
    def __init__(self, c: EncoderDecoderConfig):
        super().__init__(c, 3)
        H, Hk, D = c.n_head, c.kv_heads, c.head_dim
        self.qkv = fnn.Linear(c.d_model, (H + 2 * Hk) * D, bias=c.bias)
        self.proj = fnn.Linear(H * D, c.d_model, bias=c.bias)
        self.cross_q = fnn.Linear(c.d_model, H * D, bias=c.bias)
        self.cross_kv = fnn.Linear(c.d_model, 2 * Hk * D, bias=c.bias)
        self.cross_proj = fnn.Linear(H * D, c.d_model, bias=c.bias)
        self.mlp = fnn.FeedForward(c.d_model, c.d_hidden, c.activation, bias=c.bias)

    def memory(self, enc: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder rows' keys and values for the cross-attention, packed (total, Hk, D)."""
        c = self.config
        k, v = self.cross_kv(enc).unflatten(-1, (2, c.kv_heads, c.head_dim)).unbind(-3)
        return k, v

    def forward(self, y, memory: tuple[Tensor, Tensor], cu_src: Tensor, max_src: int,
                cache: Optional[list] = None, cache_len: int = 0):
        """y: (B, T, d_model); pre-norm: the (hidden, residual) pair (see _Sublayers), returned
        as the pair after this layer's sublayers."""
        c = self.config
        H, Hk, D = c.n_head, c.kv_heads, c.head_dim
        B, T, _ = (y[1] if c.prenorm else y).shape
        p = c.dropout if self.training else 0.0

        def self_attend(t):
            q, k, v = self.qkv(t).split([H * D, Hk * D, Hk * D], dim=-1)
            q, k, v = q.unflatten(-1, (H, D)), k.unflatten(-1, (Hk, D)), v.unflatten(-1, (Hk, D))
            if cache is None:
                a = flash_attn_func(q, k, v, dropout_p=p, causal=True)
            else:
                a = flash_attn_with_kvcache(q, cache[0], cache[1], k, v, cache_seqlens=cache_len, causal=True)
            return self.proj(a.flatten(-2))

        def cross_attend(t):
            q = self.cross_q(t).unflatten(-1, (H, D)).reshape(B * T, H, D)
            cu_q = torch.arange(B + 1, device=t.device, dtype=torch.int32) * T
            a = flash_attn_varlen_func(q, memory[0], memory[1], cu_q, cu_src, T, max_src, dropout_p=p)
            return self.cross_proj(a.reshape(B, T, H * D))

        y = self.residual(0, y, self_attend)
        y = self.residual(1, y, cross_attend)
        return self.residual(2, y, self.mlp)


class EncoderDecoder(torch.nn.Module):
    """forward(src_ids, tgt_ids, src_mask=None, labels=None, return_logits=None) -> dict(loss, logits, accuracy).

    tgt_ids is the decoder's input (starting with bos_token_id); labels (B, T) are the tokens
    it should produce at each position (ignore_index where none), not shifted inside. With
    labels, "accuracy" is the token accuracy (detached float32 scalar, from the loss kernel's
    pass: the fraction of counted labels that are their row's argmax)."""

    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        c = config
        self.config = c
        self.embed = torch.nn.Embedding(c.vocab_size, c.d_model)
        if c.positions == "learned":
            self.pos = torch.nn.Embedding(c.max_seq_len, c.d_model)
        else:
            self.register_buffer("pos_table", sinusoidal_table(c.max_seq_len, c.d_model), persistent=False)
        self.encoder = torch.nn.ModuleList(EncoderLayer(c) for _ in range(c.n_encoder_layer))
        self.decoder = torch.nn.ModuleList(DecoderLayer(c) for _ in range(c.n_decoder_layer))
        self.encoder_norm = _norm(c) if c.prenorm else None
        self.decoder_norm = _norm(c) if c.prenorm else None
        for m in self.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, 0.0, c.init_std)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.Embedding):
                torch.nn.init.normal_(m.weight, 0.0, c.init_std)

    def _embed(self, ids: Tensor, offset: int = 0) -> Tensor:
        c = self.config
        L = ids.shape[1]
        if offset + L > c.max_seq_len:
            raise ValueError(f"EncoderDecoder: {offset + L} positions exceed max_seq_len {c.max_seq_len}")
        x = self.embed(ids) * (math.sqrt(c.d_model) if c.scale_embeddings else 1.0)
        if c.positions == "learned":
            x = x + self.pos(torch.arange(offset, offset + L, device=ids.device))
        else:
            x = x + self.pos_table[offset:offset + L].to(x.dtype)
        return F.dropout(x, c.dropout, self.training) if c.dropout > 0 else x

    def encode(self, src_ids: Tensor, src_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, int]:
        """(packed encoder output (total, d_model), cu_seqlens, longest source)."""
        if src_ids.dim() != 2 or src_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"EncoderDecoder: src_ids must be a (batch, seq) integer tensor, got {src_ids.dtype} "
                             f"{list(src_ids.shape)}")
        B, S = src_ids.shape
        if src_mask is None:
            src_mask = src_ids != self.config.pad_token_id
        if src_mask.shape != src_ids.shape:
            raise ValueError(f"EncoderDecoder: src_mask {list(src_mask.shape)} must match src_ids "
                             f"{list(src_ids.shape)}")
        keep = src_mask.bool()
        lengths = keep.sum(dim=1)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        max_src = int(lengths.max()) if B else 0
        x = self._embed(src_ids).reshape(B * S, -1)[keep.reshape(-1).nonzero()[:, 0]]
        if self.config.prenorm:
            state = (None, x)
            for layer in self.encoder:
                state = layer(state, cu, max_src)
            return _close(self.encoder_norm, state, self.config.dropout), cu, max_src
        for layer in self.encoder:
            x = layer(x, cu, max_src)
        return x, cu, max_src

    def decode(self, tgt_ids: Tensor, enc: tuple[Tensor, Tensor, int], caches: Optional[list] = None,
               cache_len: int = 0, memories: Optional[list] = None) -> Tensor:
        x, cu, max_src = enc
        y = self._embed(tgt_ids, cache_len)
        memories = memories or [layer.memory(x) for layer in self.decoder]
        state = (None, y) if self.config.prenorm else y
        for i, layer in enumerate(self.decoder):
            state = layer(state, memories[i], cu, max_src, caches[i] if caches is not None else None, cache_len)
        return _close(self.decoder_norm, state, self.config.dropout) if self.config.prenorm else state

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, src_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, return_logits: Optional[bool] = None,
                ignore_index: int = -100) -> dict:
        if tgt_ids.dim() != 2 or tgt_ids.shape[0] != src_ids.shape[0]:
            raise ValueError(f"EncoderDecoder: tgt_ids must be (batch, seq) with src_ids' batch, got "
                             f"{list(tgt_ids.shape)}")
        y = self.decode(tgt_ids, self.encode(src_ids, src_mask))
        out: dict = {"loss": None, "logits": None}
        if labels is not None:
            if labels.shape != tgt_ids.shape:
                raise ValueError(f"EncoderDecoder: labels {list(labels.shape)} must match tgt_ids "
                                 f"{list(tgt_ids.shape)}")
            out["loss"], stats = linear_cross_entropy_with_stats(y.reshape(-1, y.shape[-1]), self.embed.weight,
                                                                 labels.reshape(-1), ignore_index=ignore_index)
            out["accuracy"] = stats.accuracy
        if return_logits or (return_logits is None and labels is None):
            out["logits"] = F.linear(y, self.embed.weight)
        return out

    @torch.no_grad()
    def generate(self, src_ids: Tensor, max_new_tokens: int, src_mask: Optional[Tensor] = None,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Decode up to max_new_tokens after bos_token_id for each source; returns (B, 1 + new)
        starting with bos. Temperature 0 is greedy; finished sequences repeat eos."""
        c = self.config
        if max_new_tokens + 1 > c.max_seq_len:
            raise ValueError(f"EncoderDecoder.generate: {max_new_tokens + 1} positions exceed max_seq_len "
                             f"{c.max_seq_len}")
        eos = c.eos_token_id if eos_token_id is None else eos_token_id
        B = src_ids.shape[0]
        enc = self.encode(src_ids, src_mask)
        memories = [layer.memory(enc[0]) for layer in self.decoder]
        dtype = cache_dtype(self.embed.weight)
        shape = (B, max_new_tokens + 1, c.kv_heads, c.head_dim)
        caches = [(torch.zeros(shape, device=src_ids.device, dtype=dtype),
                   torch.zeros(shape, device=src_ids.device, dtype=dtype)) for _ in self.decoder]
        tokens = torch.full((B, 1), c.bos_token_id, dtype=torch.long, device=src_ids.device)

        def next_logits(step_input: Tensor, step: int) -> Tensor:
            return F.linear(self.decode(step_input, enc, caches, step, memories)[:, -1], self.embed.weight)
        return decode(next_logits, tokens, tokens, max_new_tokens, temperature, top_k, top_p, eos, generator)
