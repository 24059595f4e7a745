"""Train a tiny model a few dozen steps on each backend from the same seed: the per-step
losses must agree (the reference backend against the Triton kernels; bf16 on a GPU)."""

from __future__ import annotations

import pytest
import torch

import fastlm

from .conftest import DEVICE, ON_GPU


class TinyLM(torch.nn.Module):
    """Embedding, two pre-norm MLP blocks with the fused residual add, a final RMSNorm."""

    def __init__(self, vocab=64, d=48):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.norms = torch.nn.ModuleList([fastlm.nn.LayerNorm(d), fastlm.nn.RMSNorm(d)])
        self.mlps = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(),
                                                             torch.nn.Linear(2 * d, d)) for _ in range(2)])
        self.final = fastlm.nn.RMSNorm(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        delta = torch.zeros_like(h)
        for norm, mlp in zip(self.norms, self.mlps):
            x, h = norm(delta, h, return_residual=True)  # h <- h + delta; x = norm(h)
            delta = mlp(x)
        return self.head(self.final(delta, h))


def make_data(steps, batch, length, vocab, seed):
    """Sequences that follow a fixed rule (next = 5 * token + 3 mod vocab) from random starts:
    learnable in a few steps, so the losses fall and any drift between backends shows."""
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, vocab, (steps, batch), generator=g)]
    for _ in range(length - 1):
        tokens.append((5 * tokens[-1] + 3) % vocab)
    return torch.stack(tokens, dim=-1)


def train(backend, dtype, steps=20, seed=1234):
    torch.manual_seed(seed)
    model = TinyLM().to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = make_data(steps, 4, 9, 64, seed).to(DEVICE)
    losses = []
    with fastlm.use_backend(backend):
        for ids in data:
            with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if ON_GPU else []))
def test_losses_match_the_reference_backend(dtype):
    ref = train("torch", dtype)
    got = train("triton", dtype)
    assert ref[-1] < ref[0] - 0.1, f"the tiny model did not learn: {ref.tolist()}"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    rel = ((got - ref).abs() / ref.abs()).max().item()
    assert rel < tol, f"per-step losses drift apart (max relative {rel:.2e}):\n{ref.tolist()}\n{got.tolist()}"
