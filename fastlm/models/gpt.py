"""GPT: a decoder-only causal language model built from fastlm's modules and ops.

GPT-2 by default (learned positions, pre-norm LayerNorm, gelu_tanh MLP, tied embeddings);
GPTConfig switches to the Llama family's choices (RMSNorm, swiglu, rotary positions,
grouped-query attention, no biases) or the original Transformer's (post-norm, sinusoidal).

Every layer runs on fastlm: attention through fastlm.flash_attn_func (causal, the q/k/v
heads are views of one fused projection), the MLP through fastlm.feed_forward, the norms
with the sublayer's dropout and the residual add fused (norm(dropout(sublayer) + residual)
in one kernel; pre-norm: each norm also returns the updated residual stream), and the loss
through fastlm.linear_cross_entropy, so training never forms the (tokens, vocab) logits.
Generation keeps a KV cache per layer and attends through fastlm.flash_attn_with_kvcache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import nn as fnn
from ..ops.attention import flash_attn_func, flash_attn_with_kvcache
from ..ops.cross_entropy import cross_entropy
from ..ops.linear_cross_entropy import linear_cross_entropy_with_stats

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu", "geglu")
GATED = ("swiglu", "geglu", "reglu")


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    max_seq_len: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # None: n_head (multi-head); 1: multi-query; else grouped-query
    d_model: int = 768
    d_hidden: Optional[int] = None  # None: 4 d_model, or 8/3 d_model rounded up to 64 for gated MLPs
    activation: str = "gelu_tanh"
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    prenorm: bool = True
    positions: str = "learned"  # "learned", "sinusoidal" or "rotary"
    rotary_base: float = 10000.0
    # rotary positions turned inside the attention kernels (flash_attn_func's rotary_cos) instead
    # of a rotary launch of their own; off by default until a GPU says it is faster
    # (docs/rotary_in_attention.md). Decoding with a KV cache keeps the separate launch.
    rotary_in_attention: bool = False
    # RMSNorm of each head of q and k (learnable (head_dim,) weights, norm_eps) before the
    # rotary, as Qwen3 and Gemma 3: with rotary positions one fastlm.qk_norm_rotary launch
    # (which then also rotates, in place of rotary_in_attention).
    qk_norm: bool = False
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"GPTConfig: {msg}")
        for name in ("vocab_size", "max_seq_len", "n_layer", "n_head", "d_model"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            bad(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        kv = self.kv_heads
        if kv < 1 or self.n_head % kv:
            bad(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if self.activation not in ACTIVATIONS + ("reglu",):
            bad(f"activation must be one of {ACTIVATIONS + ('reglu',)}, got {self.activation!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            bad(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.positions not in ("learned", "sinusoidal", "rotary"):
            bad(f"positions must be 'learned', 'sinusoidal' or 'rotary', got {self.positions!r}")
        if self.positions == "rotary" and self.head_dim % 2:
            bad(f"rotary positions need an even head dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.qk_norm, bool):
            bad(f"qk_norm must be a bool, got {self.qk_norm!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        if self.d_hidden is not None:
            return self.d_hidden
        if self.activation in GATED:
            return -(-(8 * self.d_model // 3) // 64) * 64
        return 4 * self.d_model

    def to_dict(self) -> dict:
        return asdict(self)


def sinusoidal_table(length: int, dim: int, device=None) -> Tensor:
    """The original Transformer's position encoding (length, dim), float32."""
    pos = torch.arange(length, dtype=torch.float64, device=device)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.float()


def _norm(config: GPTConfig) -> torch.nn.Module:
    if config.norm == "rmsnorm":
        return fnn.RMSNorm(config.d_model, eps=config.norm_eps)
    return fnn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class KVCache:
    """Per-layer key and value caches (B, max_len, Hk, D) and how many positions are filled."""

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, max_len, config.kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0
        self.max_len = max_len


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        H, Hk, D = config.n_head, config.kv_heads, config.head_dim
        self.qkv = fnn.Linear(config.d_model, (H + 2 * Hk) * D, bias=config.bias)
        self.proj = fnn.Linear(H * D, config.d_model, bias=config.bias)
        if config.qk_norm:
            self.q_norm = fnn.RMSNorm(D, eps=config.norm_eps)
            self.k_norm = fnn.RMSNorm(D, eps=config.norm_eps)

    def forward(self, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]] = None, cache: Optional[KVCache] = None,
                layer: int = 0) -> Tensor:
        c = self.config
        B, L, _ = x.shape
        H, Hk, D = c.n_head, c.kv_heads, c.head_dim
        q, k, v = self.qkv(x).view(B, L, H + 2 * Hk, D).split([H, Hk, Hk], dim=2)  # views
        if c.qk_norm:
            if rotary is not None:  # the norms and the rotary in one launch
                from ..ops.rotary import qk_norm_rotary
                positions = None if cache is None else torch.arange(cache.length, cache.length + L, device=x.device)
                q, k = qk_norm_rotary(q, k, self.q_norm.weight, self.k_norm.weight, rotary[0], rotary[1],
                                      c.norm_eps, positions)
                rotary = None
            else:
                q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None and cache is None and c.rotary_in_attention:
            return self.proj(flash_attn_func(q, k, v, dropout_p=c.dropout if self.training else 0.0, causal=True,
                                             rotary_cos=rotary[0], rotary_sin=rotary[1]).flatten(-2))
        if rotary is not None:
            from ..ops.rotary import rotary as apply_rotary
            cos, sin = rotary
            offset = cache.length if cache is not None else 0
            positions = torch.arange(offset, offset + L, device=x.device)
            q, k = apply_rotary(q, cos, sin, positions), apply_rotary(k, cos, sin, positions)
        if cache is None:
            out = flash_attn_func(q, k, v, dropout_p=c.dropout if self.training else 0.0, causal=True)
        else:
            out = flash_attn_with_kvcache(q, cache.k[layer], cache.v[layer], k, v, cache_seqlens=cache.length,
                                          causal=True)
        return self.proj(out.flatten(-2))


class Block(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = _norm(config)
        self.mlp = fnn.FeedForward(config.d_model, config.hidden, config.activation, bias=config.bias)
        self.dropout = config.dropout  # the norms apply it: norm(dropout(sublayer) + residual)


class GPT(torch.nn.Module):
    """forward(input_ids, labels=None, return_logits=None) -> dict(loss, logits, accuracy)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.wte = torch.nn.Embedding(c.vocab_size, c.d_model)
        if c.positions == "learned":
            self.wpe = torch.nn.Embedding(c.max_seq_len, c.d_model)
        elif c.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(c.max_seq_len, c.d_model), persistent=False)
        else:
            from ..ops.rotary import rotary_cos_sin
            cos, sin = rotary_cos_sin(c.max_seq_len, c.head_dim, base=c.rotary_base)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.blocks = torch.nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm_f = _norm(c) if c.prenorm else None
        self.lm_head = None if c.tie_embeddings else torch.nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("attn.proj.weight") or name.endswith("mlp.fc_out.weight"):
                torch.nn.init.normal_(p, 0.0, c.init_std / math.sqrt(2 * c.n_layer))

    def _init(self, m: torch.nn.Module) -> None:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0.0, self.config.init_std)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, 0.0, self.config.init_std)

    @classmethod
    def from_transformers(cls, hf_model: torch.nn.Module) -> "GPT":
        """A GPT with the config and weights of a Hugging Face GPT2LMHeadModel (or GPT2Model),
        on its device and dtype. Configs fastlm cannot reproduce (scale_attn_by_inverse_layer_idx,
        cross-attention, ...) raise ValueError naming the field. See
        fastlm.integrations.transformers.gpt_from_transformers."""
        from ..integrations.transformers import gpt_from_transformers
        return gpt_from_transformers(cls, hf_model)

    @property
    def head_weight(self) -> Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def num_parameters(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings and hasattr(self, "wpe"):
            n -= self.wpe.weight.numel()
        return n

    def hidden_states(self, input_ids: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """The final hidden states (B, L, d_model), before the lm-head."""
        c = self.config
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"GPT: input_ids must be a (batch, seq) integer tensor, got {input_ids.dtype} "
                             f"{list(input_ids.shape)}")
        B, L = input_ids.shape
        offset = cache.length if cache is not None else 0
        if offset + L > c.max_seq_len:
            raise ValueError(f"GPT: {offset + L} positions exceed max_seq_len {c.max_seq_len}")
        x = self.wte(input_ids)
        if c.positions == "learned":
            x = x + self.wpe(torch.arange(offset, offset + L, device=input_ids.device))
        elif c.positions == "sinusoidal":
            x = x + self.pos_table[offset:offset + L].to(x.dtype)
        rotary = (self.rotary_cos, self.rotary_sin) if c.positions == "rotary" else None
        x = F.dropout(x, c.dropout, self.training) if c.dropout > 0 else x
        if c.prenorm:
            # The residual stream with each norm's add fused: norm(hidden, residual) also
            # returns hidden + residual, the stream the next sub-layer adds to.
            residual, hidden = x, None
            for i, blk in enumerate(self.blocks):
                # Each sublayer's dropout, residual add and the next norm are one call (the
                # norms drop in training mode only): norm(dropout(hidden) + residual).
                if hidden is None:
                    normed = blk.norm1(residual)
                else:
                    normed, residual = blk.norm1(hidden, residual, return_residual=True, dropout_p=c.dropout)
                a = blk.attn(normed, rotary, cache, i)
                normed, residual = blk.norm2(a, residual, return_residual=True, dropout_p=blk.dropout)
                hidden = blk.mlp(normed)
            out = self.norm_f(hidden, residual, dropout_p=c.dropout)
        else:
            out = x
            for i, blk in enumerate(self.blocks):  # post-norm: norm(x + sublayer(x))
                out = blk.norm1(blk.attn(out, rotary, cache, i), out, dropout_p=blk.dropout)  # dropout inside
                out = blk.norm2(blk.mlp(out), out, dropout_p=blk.dropout)
        if cache is not None:
            cache.length += L
        return out

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, return_logits: Optional[bool] = None,
                ignore_index: int = -100) -> dict:
        """labels (B, L) aligned with input_ids (shifted inside, as Hugging Face does); the loss
        goes through fastlm.linear_cross_entropy, so the logits are formed only when
        return_logits is True (default: only when no labels are given). With labels, "accuracy"
        is the token accuracy (a detached float32 scalar tensor: the fraction of counted labels
        that are their row's argmax), from the loss kernel's own pass: no logits, no host sync."""
        h = self.hidden_states(input_ids)
        out: dict = {"loss": None, "logits": None}
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"GPT: labels {list(labels.shape)} must match input_ids {list(input_ids.shape)}")
            target = labels[:, 1:].reshape(-1)
            out["loss"], stats = linear_cross_entropy_with_stats(h[:, :-1].reshape(-1, h.shape[-1]),
                                                                 self.head_weight, target, ignore_index=ignore_index)
            out["accuracy"] = stats.accuracy
        if return_logits or (return_logits is None and labels is None):
            out["logits"] = F.linear(h, self.head_weight)
        return out

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Sample max_new_tokens after input_ids (B, L) with a KV cache; temperature 0 is greedy.
        Sequences that produced eos_token_id keep producing it. Returns (B, L + new)."""
        if max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        B, L = input_ids.shape
        total = L + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"GPT.generate: {total} positions exceed max_seq_len {self.config.max_seq_len}")
        cache = KVCache(self.config, B, total, input_ids.device, cache_dtype(self.wte.weight))

        def next_logits(step_input: Tensor, step: int) -> Tensor:
            return F.linear(self.hidden_states(step_input, cache)[:, -1], self.head_weight)
        return decode(next_logits, input_ids, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                      generator)

    def loss_of_logits(self, logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
        """The same loss as forward's, from logits (for checking the fused path)."""
        return cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=ignore_index)


def decode(next_logits, tokens: Tensor, step_input: Tensor, max_new_tokens: int, temperature: float,
           top_k: Optional[int], top_p: Optional[float], eos_token_id: Optional[int],
           generator: Optional[torch.Generator]) -> Tensor:
    """The sampling loop every model's generate shares. ``next_logits(step_input, step)`` gives
    the (B, V) logits of the next token (the model keeps its own cache or state); each step
    appends one sampled token per row to ``tokens`` and feeds it back. Rows that produced
    eos_token_id keep producing it; the loop stops early once every row has."""
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for step in range(max_new_tokens):
        nxt = sample(next_logits(step_input, step).float(), temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if eos_token_id is not None and bool(done.all()):
            break
    return tokens


def cache_dtype(weight: Tensor) -> torch.dtype:
    """The KV cache's dtype: the autocast dtype inside an autocast region (the attention
    computes in the cache's dtype), else the weights'."""
    if weight.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(weight.device.type) \
            and weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def sample(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """One token per row of logits (B, V): greedy at temperature 0, else softmax(logits / T)
    restricted to the top_k most likely and to the smallest set whose probability passes top_p."""
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"sample: top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
