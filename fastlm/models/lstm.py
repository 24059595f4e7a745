"""LSTMLM: the recurrent language model that came before Transformers, as a baseline.

torch.nn.Embedding -> torch.nn.LSTM (batch_first, n_layer layers) -> [projection] -> lm head,
with the interface of fastlm.models.GPT, so the same training, evaluation and generation
code runs it: forward(input_ids, labels) -> {"loss", "logits"} with the labels shifted
inside and the loss through fastlm.linear_cross_entropy (the logits are formed only when
asked for), generate(...) through the sampling loop of fastlm.models.gpt.decode, num_parameters().

The state (h, c) of every layer is the generation cache: the prompt runs once, then each
new token costs one step of the recurrence, whatever the length so far.

With tied embeddings the lm head is the embedding matrix (V, d_embed); when the LSTM's
width d_model differs from d_embed, a bias-free projection d_model -> d_embed comes before
it (as in Press & Wolf's tied LSTM models). Untied, the head is (V, d_model) and no
projection is needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.cross_entropy import cross_entropy
from ..ops.linear_cross_entropy import linear_cross_entropy_with_stats
from .gpt import decode


@dataclass
class LSTMConfig:
    vocab_size: int = 50257
    max_seq_len: int = 1024  # the context the training/eval code uses; the LSTM itself has no limit
    d_model: int = 512  # the LSTM's hidden (and cell) width
    n_layer: int = 2
    d_embed: Optional[int] = None  # None: d_model
    dropout: float = 0.0  # on the embeddings, between LSTM layers and on the LSTM's output
    tie_embeddings: bool = True
    init_std: float = 0.02  # normal init of the embedding, projection and untied head
    forget_bias: float = 1.0  # initial forget-gate bias (Jozefowicz et al. 2015); the rest: torch's LSTM init

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"LSTMConfig: {msg}")
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f"{name} must be a positive int, got {v!r}")
        if self.d_embed is not None and (isinstance(self.d_embed, bool) or not isinstance(self.d_embed, int)
                                         or self.d_embed < 1):
            bad(f"d_embed must be a positive int or None, got {self.d_embed!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.tie_embeddings, bool):
            bad(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if not isinstance(self.init_std, (int, float)) or not self.init_std > 0:
            bad(f"init_std must be a positive float, got {self.init_std!r}")
        if not isinstance(self.forget_bias, (int, float)) or isinstance(self.forget_bias, bool):
            bad(f"forget_bias must be a float, got {self.forget_bias!r}")

    @property
    def embed_dim(self) -> int:
        return self.d_model if self.d_embed is None else self.d_embed

    def to_dict(self) -> dict:
        return asdict(self)


State = tuple[Tensor, Tensor]  # (h, c), each (n_layer, B, d_model)


class LSTMLM(torch.nn.Module):
    """forward(input_ids, labels=None, return_logits=None) -> dict(loss, logits), as GPT."""

    def __init__(self, config: LSTMConfig):
        super().__init__()
        if not isinstance(config, LSTMConfig):
            raise TypeError(f"LSTMLM: config must be an LSTMConfig, got {type(config).__name__}")
        self.config = c = config
        E = c.embed_dim
        self.wte = torch.nn.Embedding(c.vocab_size, E)
        self.lstm = torch.nn.LSTM(E, c.d_model, num_layers=c.n_layer, batch_first=True,
                                  dropout=c.dropout if c.n_layer > 1 else 0.0)
        head_in = E if c.tie_embeddings else c.d_model
        self.proj = torch.nn.Linear(c.d_model, head_in, bias=False) if head_in != c.d_model else None
        self.lm_head = None if c.tie_embeddings else torch.nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        torch.nn.init.normal_(self.wte.weight, 0.0, c.init_std)
        for m in (self.proj, self.lm_head):
            if m is not None:
                torch.nn.init.normal_(m.weight, 0.0, c.init_std)
        self.lstm.reset_parameters()  # uniform(-1/sqrt(d_model), 1/sqrt(d_model))
        H = c.d_model
        with torch.no_grad():
            for layer in range(c.n_layer):  # torch's gate order: input, forget, cell, output
                getattr(self.lstm, f"bias_ih_l{layer}")[H:2 * H].fill_(c.forget_bias)
                getattr(self.lstm, f"bias_hh_l{layer}")[H:2 * H].zero_()

    @property
    def head_weight(self) -> Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def num_parameters(self, embeddings: bool = True) -> int:
        """All parameters. ``embeddings=False`` exists for GPT's signature: GPT then leaves out
        its position embeddings; an LSTM has none, so both counts are the same."""
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch: int, device=None, dtype=None) -> State:
        c = self.config
        device = self.wte.weight.device if device is None else device
        dtype = self.wte.weight.dtype if dtype is None else dtype
        z = torch.zeros(c.n_layer, batch, c.d_model, device=device, dtype=dtype)
        return z, z.clone()

    def hidden_states(self, input_ids: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        """The hidden states (B, L, head width) before the lm head, and the LSTM state after
        the last position (to continue from). ``state`` None starts from zeros."""
        c = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or \
                input_ids.dtype not in (torch.int32, torch.int64):
            desc = f"{input_ids.dtype} {list(input_ids.shape)}" if isinstance(input_ids, Tensor) else \
                type(input_ids).__name__
            raise ValueError(f"LSTMLM: input_ids must be a (batch, seq) integer tensor, got {desc}")
        if input_ids.shape[1] == 0:
            raise ValueError("LSTMLM: input_ids must hold at least one position")
        x = self.wte(input_ids)
        drop = c.dropout if self.training else 0.0
        if drop > 0:
            x = F.dropout(x, drop, True)
        out, state = self.lstm(x, state)
        if drop > 0:
            out = F.dropout(out, drop, True)
        if self.proj is not None:
            out = self.proj(out)
        return out, state

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, return_logits: Optional[bool] = None,
                ignore_index: int = -100) -> dict:
        """labels (B, L) aligned with input_ids (shifted inside, as GPT and Hugging Face do);
        the loss (mean over the counted tokens, nats) goes through fastlm.linear_cross_entropy,
        so the logits are formed only when return_logits is True (default: only without labels).
        With labels, "accuracy" is the token accuracy, as GPT's."""
        h, _ = self.hidden_states(input_ids)
        out: dict = {"loss": None, "logits": None}
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"LSTMLM: labels {list(labels.shape)} must match input_ids "
                                 f"{list(input_ids.shape)}")
            target = labels[:, 1:].reshape(-1)
            out["loss"], stats = linear_cross_entropy_with_stats(h[:, :-1].reshape(-1, h.shape[-1]),
                                                                 self.head_weight, target, ignore_index=ignore_index)
            out["accuracy"] = stats.accuracy
        if return_logits or (return_logits is None and labels is None):
            out["logits"] = F.linear(h, self.head_weight)
        return out

    def loss_of_logits(self, logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
        """The same loss as forward's, from logits (for checking the fused path)."""
        return cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=ignore_index)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Sample max_new_tokens after input_ids (B, L), carrying the LSTM state (h, c) from
        step to step; temperature 0 is greedy. Sequences that produced eos_token_id keep
        producing it. Returns (B, L + new) (fewer new when every sequence ended)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"LSTMLM.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        tokens = input_ids
        if max_new_tokens == 0:
            self.hidden_states(input_ids)  # argument checks only
            return tokens
        state: Optional[State] = None

        def next_logits(step_input: Tensor, step: int) -> Tensor:
            nonlocal state
            h, state = self.hidden_states(step_input, state)
            return F.linear(h[:, -1], self.head_weight)
        return decode(next_logits, tokens, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                      generator)
