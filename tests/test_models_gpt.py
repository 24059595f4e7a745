"""fastlm.models.GPT against a plain-PyTorch twin written here from the same parameters
(torch's layer_norm / rms_norm, scaled_dot_product_attention, linear and activations), on
the reference backend and, at tiny sizes, on the Triton kernels under the interpreter."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.models import GPT, GPTConfig
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE

TINY = dict(vocab_size=61, max_seq_len=40, n_layer=2, n_head=2, d_model=32)
ACT = {"relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}
GATE = {"swiglu": F.silu, "geglu": F.gelu, "reglu": torch.relu}


def twin(model: GPT, ids: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """The logits of the same network written with plain torch ops, in ``dtype``."""
    c = model.config
    p = {k: v.to(dtype) for k, v in model.named_parameters()}
    H, Hk, D = c.n_head, c.kv_heads, c.head_dim

    def norm(prefix, x):
        if c.norm == "rmsnorm":
            return F.rms_norm(x, (c.d_model,), p[prefix + ".weight"], c.norm_eps)
        return F.layer_norm(x, (c.d_model,), p[prefix + ".weight"], p.get(prefix + ".bias"), c.norm_eps)

    def lin(prefix, x):
        return F.linear(x, p[prefix + ".weight"], p.get(prefix + ".bias"))

    def attn(i, x):
        B, L, _ = x.shape
        q, k, v = lin(f"blocks.{i}.attn.qkv", x).split([H * D, Hk * D, Hk * D], dim=-1)
        q, k, v = (t.view(B, L, -1, D).transpose(1, 2) for t in (q, k, v))
        k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, H * D)
        return lin(f"blocks.{i}.attn.proj", o)

    def mlp(i, x):
        z = lin(f"blocks.{i}.mlp.fc_in", x)
        if c.activation in GATE:
            g, u = z.chunk(2, dim=-1)
            h = GATE[c.activation](g) * u
        else:
            h = ACT[c.activation](z)
        return lin(f"blocks.{i}.mlp.fc_out", h)

    L = ids.shape[1]
    x = F.embedding(ids, p["wte.weight"])
    if c.positions == "learned":
        x = x + p["wpe.weight"][:L]
    elif c.positions == "sinusoidal":
        x = x + model.pos_table[:L].to(dtype)
    for i in range(c.n_layer):
        if c.prenorm:
            x = x + attn(i, norm(f"blocks.{i}.norm1", x))
            x = x + mlp(i, norm(f"blocks.{i}.norm2", x))
        else:
            x = norm(f"blocks.{i}.norm1", x + attn(i, x))
            x = norm(f"blocks.{i}.norm2", x + mlp(i, x))
    if c.prenorm:
        x = norm("norm_f", x)
    head = p["wte.weight"] if c.tie_embeddings else p["lm_head.weight"]
    return F.linear(x, head)


def make(**overrides):
    torch.manual_seed(0)
    config = GPTConfig(**{**TINY, **overrides})
    model = GPT(config).to(DEVICE)
    with torch.no_grad():  # GPT-2's init (std 0.02, zero biases) keeps a tiny model nearly linear:
        for name, q in model.named_parameters():  # give every parameter a real effect
            if name.endswith("bias") or "norm" in name:
                q.add_(torch.randn_like(q) * 0.2)
            elif q.dim() == 2:
                q.normal_(0.0, 1.0 if "wte" in name or "wpe" in name else q.shape[1] ** -0.5)
    return model


OPTIONS = [
    {},
    {"norm": "rmsnorm", "activation": "swiglu", "n_kv_head": 1, "bias": False, "tie_embeddings": False},
    {"prenorm": False, "positions": "sinusoidal", "activation": "relu"},
    {"activation": "geglu", "n_head": 4, "n_kv_head": 2},
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "gpt2")
def test_logits_loss_and_gradients_match_the_twin(backend, options):
    model = make(**options)
    ids = torch.randint(0, TINY["vocab_size"], (2, 17), device=DEVICE)
    labels = ids.clone()
    labels[0, 5] = -100
    with fastlm.use_backend(backend):
        out = model(ids, labels=labels, return_logits=True)
        grads = torch.autograd.grad(out["loss"], [model.wte.weight, model.blocks[0].attn.qkv.weight,
                                                  model.blocks[-1].mlp.fc_in.weight])
    ref = twin(model, ids)
    eager = twin(model, ids, torch.float32)
    terms = TINY["d_model"] * 4 * TINY["n_layer"]
    assert_close(out["logits"], ref, eager, "logits", atol=summation_floor(ref, torch.float32, terms))

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    assert_close(out["loss"], loss_of(ref), loss_of(eager), "loss")
    params = [model.wte.weight, model.blocks[0].attn.qkv.weight, model.blocks[-1].mlp.fc_in.weight]
    ref_grads = torch.autograd.grad(loss_of(twin(model, ids)), params)  # float64 through .to(): grads in fp32 leaves
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.to(g.dtype), rtol=1e-3, atol=1e-5 * max(r.abs().max().item(), 1.0))


def test_every_option_combination_runs_forward_and_backward():
    combos = itertools.product(["layernorm", "rmsnorm"], [True, False], ["relu", "gelu", "gelu_tanh", "swiglu",
                                                                          "geglu"],
                               ["learned", "sinusoidal"], [None, 1], [True, False])
    for norm, prenorm, act, pos, kv, tie in combos:
        model = GPT(GPTConfig(vocab_size=23, max_seq_len=16, n_layer=1, n_head=2, d_model=16, norm=norm,
                              prenorm=prenorm, activation=act, positions=pos, n_kv_head=kv, tie_embeddings=tie,
                              dropout=0.1))
        ids = torch.randint(0, 23, (2, 9))
        out = model(ids, labels=ids)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and out["logits"] is None
        assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in model.parameters())


def test_fused_loss_equals_the_loss_of_the_logits():
    model = make()
    ids = torch.randint(0, TINY["vocab_size"], (3, 12), device=DEVICE)
    out = model(ids, labels=ids, return_logits=True)
    torch.testing.assert_close(out["loss"], model.loss_of_logits(out["logits"], ids))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [{}, {"positions": "sinusoidal", "n_kv_head": 1, "prenorm": False}])
def test_greedy_generation_with_the_cache_equals_recomputing(backend, options):
    model = make(**options).eval()
    prompt = torch.randint(0, TINY["vocab_size"], (2, 5), device=DEVICE)
    with fastlm.use_backend(backend):
        fast = model.generate(prompt, max_new_tokens=8, temperature=0)
        slow = prompt
        for _ in range(8):
            logits = model(slow)["logits"][:, -1]
            slow = torch.cat([slow, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, slow)


def test_sampling_respects_top_k_top_p_and_eos():
    model = make().eval()
    prompt = torch.randint(0, TINY["vocab_size"], (4, 3))
    g = torch.Generator().manual_seed(0)
    out = model.generate(prompt, 10, temperature=0.8, top_k=5, top_p=0.9, generator=g)
    assert out.shape == (4, 13) and torch.equal(out[:, :3], prompt)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(200, 1)
    assert set(fastlm.models.sample(logits, 1.0, top_k=2).tolist()) <= {2, 3}
    assert set(fastlm.models.sample(logits, 1.0, top_p=0.5).tolist()) <= {2, 3}  # p(3)=0.64 > 0.5: just 3
    assert set(fastlm.models.sample(logits, 1.0, top_p=0.5).tolist()) == {3}
    eos = int(model.generate(prompt[:1], 1, temperature=0)[0, -1])
    stopped = model.generate(prompt[:1], 6, temperature=0, eos_token_id=eos)
    assert stopped.shape[1] == 4 and stopped[0, -1] == eos


def test_config_errors_name_the_field():
    for bad, match in [({"d_model": 30, "n_head": 4}, "divisible"), ({"n_kv_head": 3, "n_head": 4, "d_model": 32},
                                                                       "n_kv_head"),
                       ({"activation": "tanh"}, "activation"), ({"norm": "batch"}, "norm"),
                       ({"positions": "alibi"}, "positions"), ({"dropout": 1.5}, "dropout")]:
        with pytest.raises(ValueError, match=match):
            GPTConfig(**{**TINY, **bad})
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, 4))
