"""BERT: an encoder-only masked language model built from fastlm's modules and ops.

BERT-base by default: learned positions and token types, an embedding LayerNorm, post-norm
layers (norm(x + dropout(sublayer(x))), the dropout and residual add fused into the norm), gelu, and an MLM head
(dense, gelu, LayerNorm, then the tied word embeddings plus a bias).

Padding costs nothing: with an attention_mask, the tokens that are not padding are packed
once after the embeddings (B * L rows become the total of the real lengths), every layer
runs on the packed rows, attention goes through fastlm.flash_attn_varlen_func with the
sequences' offsets, and the output is scattered back to (B, L) at the end. The loss is
taken only at the labelled positions, through fastlm.linear_cross_entropy (no logits).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import nn as fnn
from ..ops.attention import flash_attn_varlen_func
from ..ops.linear_cross_entropy import linear_cross_entropy_with_stats


@dataclass
class BertConfig:
    vocab_size: int = 30522
    max_seq_len: int = 512
    type_vocab_size: int = 2
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_hidden: int = 3072
    activation: str = "gelu"
    head_activation: str = "gelu"  # the MLM head's dense layer (Hugging Face: hidden_act, like the MLP)
    norm_eps: float = 1e-12
    dropout: float = 0.1
    pad_token_id: int = 0
    mask_token_id: int = 103
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "type_vocab_size", "n_layer", "n_head", "d_model", "d_hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"BertConfig: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"BertConfig: d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.activation not in ("relu", "gelu", "gelu_tanh", "swiglu", "geglu"):
            raise ValueError(f"BertConfig: activation {self.activation!r} is not one of relu, gelu, gelu_tanh, "
                             f"swiglu, geglu")
        if self.head_activation not in ("relu", "gelu", "gelu_tanh"):
            raise ValueError(f"BertConfig: head_activation {self.head_activation!r} is not one of relu, gelu, "
                             f"gelu_tanh")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BertConfig: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


class EncoderLayer(torch.nn.Module):
    """Post-norm self-attention + MLP on packed rows (total, d_model)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = config
        self.config = c
        self.qkv = fnn.Linear(c.d_model, 3 * c.d_model)
        self.proj = fnn.Linear(c.d_model, c.d_model)
        self.norm1 = fnn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.mlp = fnn.FeedForward(c.d_model, c.d_hidden, c.activation)
        self.norm2 = fnn.LayerNorm(c.d_model, eps=c.norm_eps)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_len: int) -> Tensor:
        c = self.config
        q, k, v = self.qkv(x).unflatten(-1, (3, c.n_head, c.head_dim)).unbind(-3)  # views (total, H, D)
        a = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len,
                                   dropout_p=c.dropout if self.training else 0.0)
        # norm(dropout(sublayer) + x): the dropout (training mode only) inside the norm's kernel
        x = self.norm1(self.proj(a.flatten(-2)), x, dropout_p=c.dropout)
        return self.norm2(self.mlp(x), x, dropout_p=c.dropout)


class BertForMaskedLM(torch.nn.Module):
    """forward(input_ids, attention_mask=None, token_type_ids=None, labels=None, return_logits=None)
    -> dict(loss, logits, hidden_states, accuracy)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = config
        self.config = c
        self.word_embeddings = torch.nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)
        self.position_embeddings = torch.nn.Embedding(c.max_seq_len, c.d_model)
        self.token_type_embeddings = torch.nn.Embedding(c.type_vocab_size, c.d_model)
        self.embed_norm = fnn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.layers = torch.nn.ModuleList(EncoderLayer(c) for _ in range(c.n_layer))
        self.head_dense = fnn.Linear(c.d_model, c.d_model, activation=c.head_activation)
        self.head_norm = fnn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.head_bias = torch.nn.Parameter(torch.zeros(c.vocab_size))
        self.apply(self._init)

    def _init(self, m: torch.nn.Module) -> None:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0.0, self.config.init_std)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, 0.0, self.config.init_std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    @classmethod
    def from_transformers(cls, hf_model: torch.nn.Module) -> "BertForMaskedLM":
        """A BertForMaskedLM with the config and weights of a Hugging Face BertForMaskedLM, on its
        device and dtype. Configs fastlm cannot reproduce (relative positions, a decoder,
        untied decoder weights, ...) raise ValueError naming the field. See
        fastlm.integrations.transformers.bert_from_transformers."""
        from ..integrations.transformers import bert_from_transformers
        return bert_from_transformers(cls, hf_model)

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               token_type_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(packed hidden states (total, d_model) of the non-padding tokens, their flat indices
        into (B * L))."""
        c = self.config
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"BertForMaskedLM: input_ids must be a (batch, seq) integer tensor, got "
                             f"{input_ids.dtype} {list(input_ids.shape)}")
        B, L = input_ids.shape
        if L > c.max_seq_len:
            raise ValueError(f"BertForMaskedLM: sequence length {L} exceeds max_seq_len {c.max_seq_len}")
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"BertForMaskedLM: attention_mask {list(attention_mask.shape)} must match input_ids "
                             f"{list(input_ids.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(torch.arange(L, device=input_ids.device)) \
            + self.token_type_embeddings(token_type_ids)
        keep = attention_mask.bool().reshape(-1)
        index = keep.nonzero()[:, 0]
        lengths = attention_mask.bool().sum(dim=1)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        max_len = int(lengths.max()) if B else 0
        h = x.reshape(B * L, -1)[index]  # packed: padding never enters a layer
        h = self.embed_norm(h)
        h = F.dropout(h, c.dropout, self.training) if c.dropout > 0 else h
        for layer in self.layers:
            h = layer(h, cu, max_len)
        return h, index

    def _logits(self, h: Tensor) -> Tensor:
        return F.linear(self.head_norm(self.head_dense(h)), self.word_embeddings.weight, self.head_bias)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                return_logits: Optional[bool] = None, ignore_index: int = -100) -> dict:
        """labels (B, L): the original token at masked positions, ignore_index elsewhere. Logits
        (B, L, vocab; zeros at padding) are formed only when return_logits is True (default:
        only without labels); the loss is the mean over labelled positions, and "accuracy" (a
        detached float32 scalar tensor, from the loss kernel's pass) the fraction of them whose
        argmax is the label. hidden_states (B, L, d_model) are zeros at padding too."""
        B, L = input_ids.shape
        h, index = self.encode(input_ids, attention_mask, token_type_ids)
        out: dict = {"loss": None, "logits": None}
        hidden = h.new_zeros(B * L, h.shape[-1]).index_copy(0, index, h)
        out["hidden_states"] = hidden.view(B, L, -1)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"BertForMaskedLM: labels {list(labels.shape)} must match input_ids "
                                 f"{list(input_ids.shape)}")
            flat = labels.reshape(-1)
            picked = (flat != ignore_index).nonzero()[:, 0]
            rows = hidden[picked]  # the head runs only where there is a label
            t = self.head_norm(self.head_dense(rows))
            out["loss"], stats = linear_cross_entropy_with_stats(t, self.word_embeddings.weight, flat[picked],
                                                                 linear_bias=self.head_bias, ignore_index=ignore_index)
            out["accuracy"] = stats.accuracy
        if return_logits or (return_logits is None and labels is None):
            logits = self._logits(h)  # the packed rows only
            out["logits"] = logits.new_zeros(B * L, logits.shape[-1]).index_copy(0, index, logits).view(B, L, -1)
        return out


def mask_tokens(input_ids: Tensor, mask_token_id: int, vocab_size: int, special_tokens_mask: Optional[Tensor] = None,
                probability: float = 0.15, ignore_index: int = -100,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """BERT's masking: pick each (non-special) token with ``probability``; of those, 80%
    become mask_token_id, 10% a random token, 10% stay. Returns (inputs, labels) with labels
    the original token at picked positions and ignore_index elsewhere."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"mask_tokens: probability must be in (0, 1), got {probability}")
    device = input_ids.device

    def rand(shape):
        return torch.rand(shape, generator=generator, device="cpu").to(device)

    picked = rand(input_ids.shape) < probability
    if special_tokens_mask is not None:
        picked &= ~special_tokens_mask.bool()
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, ignore_index))
    roll = rand(input_ids.shape)
    to_mask = picked & (roll < 0.8)
    to_random = picked & (roll >= 0.8) & (roll < 0.9)
    random_tokens = torch.randint(0, vocab_size, input_ids.shape, generator=generator, device="cpu").to(device)
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    inputs = torch.where(to_random, random_tokens.to(input_ids.dtype), inputs)
    return inputs, labels


__all__ = ["BertConfig", "BertForMaskedLM", "EncoderLayer", "mask_tokens"]
