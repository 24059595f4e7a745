"""fastlm.models.EncoderDecoder against a plain-PyTorch twin from the same parameters (padded
sources through SDPA with a key padding mask), and cached greedy decoding against recomputing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.models import EncoderDecoder, EncoderDecoderConfig
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE

TINY = dict(vocab_size=53, max_seq_len=32, n_encoder_layer=2, n_decoder_layer=2, n_head=2, d_model=32,
            d_hidden=64, dropout=0.0)
ACT = {"relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}
GATE = {"swiglu": F.silu, "geglu": F.gelu}


def twin(model: EncoderDecoder, src, src_mask, tgt, dtype=torch.float64):
    c = model.config
    p = {k: v.to(dtype) for k, v in model.named_parameters()}
    H, Hk, D = c.n_head, c.kv_heads, c.head_dim

    def norm(prefix, x):
        if c.norm == "rmsnorm":
            return F.rms_norm(x, (c.d_model,), p[prefix + ".weight"], c.norm_eps)
        return F.layer_norm(x, (c.d_model,), p[prefix + ".weight"], p.get(prefix + ".bias"), c.norm_eps)

    def lin(prefix, x):
        return F.linear(x, p[prefix + ".weight"], p.get(prefix + ".bias"))

    def heads(t, n):
        return t.unflatten(-1, (n, D)).transpose(1, 2)

    def sdpa(q, k, v, **kw):
        k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
        return F.scaled_dot_product_attention(q, k, v, **kw).transpose(1, 2).flatten(-2)

    def mlp(prefix, x):
        z = lin(prefix + ".fc_in", x)
        if c.activation in GATE:
            g, u = z.chunk(2, dim=-1)
            return lin(prefix + ".fc_out", GATE[c.activation](g) * u)
        return lin(prefix + ".fc_out", ACT[c.activation](z))

    def sub(prefix, x, fn):
        return x + fn(norm(prefix, x)) if c.prenorm else norm(prefix, x + fn(x))

    def embed(ids):
        x = p["embed.weight"][ids] * (math.sqrt(c.d_model) if c.scale_embeddings else 1.0)
        return x + (p["pos.weight"][: ids.shape[1]] if c.positions == "learned" else model.pos_table[: ids.shape[1]].to(dtype))

    keep = src_mask.bool()[:, None, None, :]
    x = embed(src)
    for i in range(c.n_encoder_layer):
        def att(t, i=i):
            q, k, v = lin(f"encoder.{i}.qkv", t).split([H * D, Hk * D, Hk * D], dim=-1)
            return lin(f"encoder.{i}.proj", sdpa(heads(q, H), heads(k, Hk), heads(v, Hk), attn_mask=keep))
        x = sub(f"encoder.{i}.norms.0", x, att)
        x = sub(f"encoder.{i}.norms.1", x, lambda t, i=i: mlp(f"encoder.{i}.mlp", t))
    if c.prenorm:
        x = norm("encoder_norm", x)
    y = embed(tgt)
    for i in range(c.n_decoder_layer):
        def self_att(t, i=i):
            q, k, v = lin(f"decoder.{i}.qkv", t).split([H * D, Hk * D, Hk * D], dim=-1)
            return lin(f"decoder.{i}.proj", sdpa(heads(q, H), heads(k, Hk), heads(v, Hk), is_causal=True))

        def cross_att(t, i=i):
            k, v = lin(f"decoder.{i}.cross_kv", x).chunk(2, dim=-1)
            q = lin(f"decoder.{i}.cross_q", t)
            return lin(f"decoder.{i}.cross_proj", sdpa(heads(q, H), heads(k, Hk), heads(v, Hk), attn_mask=keep))
        y = sub(f"decoder.{i}.norms.0", y, self_att)
        y = sub(f"decoder.{i}.norms.1", y, cross_att)
        y = sub(f"decoder.{i}.norms.2", y, lambda t, i=i: mlp(f"decoder.{i}.mlp", t))
    if c.prenorm:
        y = norm("decoder_norm", y)
    return F.linear(y, p["embed.weight"])


def make(**overrides):
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(**{**TINY, **overrides})).to(DEVICE)
    with torch.no_grad():  # the small init leaves a tiny model nearly linear: give every parameter an effect
        for name, q in model.named_parameters():
            if q.dim() == 1:
                q.add_(torch.randn_like(q) * 0.2)
            else:
                q.normal_(0.0, 0.3 if "embed" in name or "pos" in name else q.shape[1] ** -0.5)
    return model


def batch(B=3, S=13, T=9):
    src = torch.randint(3, TINY["vocab_size"], (B, S), device=DEVICE)
    lengths = torch.tensor([S, 6, 1][:B], device=DEVICE)
    mask = torch.arange(S, device=DEVICE)[None, :] < lengths[:, None]
    src = src.masked_fill(~mask, 0)
    tgt = torch.randint(3, TINY["vocab_size"], (B, T), device=DEVICE)
    tgt[:, 0] = 1
    labels = torch.roll(tgt, -1, dims=1)
    labels[:, -1] = 2
    return src, mask, tgt, labels


OPTIONS = [{}, {"prenorm": True, "norm": "rmsnorm", "activation": "swiglu", "n_kv_head": 1, "positions": "learned",
                "bias": False}]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", OPTIONS, ids=["original", "modern"])
def test_logits_and_loss_match_the_twin(backend, options):
    model = make(**options)
    src, mask, tgt, labels = batch()
    with fastlm.use_backend(backend):
        out = model(src, tgt, mask, labels=labels, return_logits=True)
        grads = torch.autograd.grad(out["loss"], [model.embed.weight, model.decoder[0].cross_kv.weight])
    ref, eager = twin(model, src, mask, tgt), twin(model, src, mask, tgt, torch.float32)
    terms = TINY["d_model"] * 4 * 4
    assert_close(out["logits"], ref, eager, "logits", atol=summation_floor(ref, torch.float32, terms))

    def loss_of(logits):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    assert_close(out["loss"], loss_of(ref), loss_of(eager), "loss")
    ref_grads = torch.autograd.grad(loss_of(twin(model, src, mask, tgt)),
                                    [model.embed.weight, model.decoder[0].cross_kv.weight])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.to(g.dtype), rtol=1e-3, atol=1e-5 * max(r.abs().max().item(), 1.0))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_generation_with_the_cache_equals_recomputing(backend):
    model = make().eval()
    src, mask, _, _ = batch()
    with fastlm.use_backend(backend):
        fast = model.generate(src, 7, src_mask=mask, temperature=0, eos_token_id=-1)
        slow = _greedy_by_recomputing(model, src, mask, 7)
    assert torch.equal(fast, slow)


def _greedy_by_recomputing(model, src, mask, steps: int):
    """Greedy decoding that runs the whole prefix through the model at every step (no cache)."""
    out = torch.full((src.shape[0], 1), 1, dtype=torch.long, device=DEVICE)
    for _ in range(steps):
        logits = model(src, out, mask)["logits"][:, -1]
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out


def _record_norm_calls(monkeypatch, chain: bool = False) -> list:
    """Record (residual given, dropout_p) for every norm module call. chain=True: the pre-norm
    wiring before the fusion besides, each residual call as the separate ops it replaces,
    residual + input then the plain norm (x + fn(norm(x)), the next norm reading the sum)."""
    calls = []
    for cls in (fastlm.nn.LayerNorm, fastlm.nn.RMSNorm):
        plain = cls.forward

        def forward(self, input, residual=None, return_residual=False, *, dropout_p=0.0, plain=plain):
            calls.append((residual is not None, dropout_p))
            if residual is None or not chain:
                return plain(self, input, residual, return_residual, dropout_p=dropout_p)
            s = residual + input
            return (plain(self, s), s) if return_residual else plain(self, s)

        monkeypatch.setattr(cls, "forward", forward)
    return calls


@pytest.mark.parametrize("options", [{}, OPTIONS[1]], ids=["layernorm", "modern"])
def test_prenorm_adds_inside_the_next_norm_bit_identical(monkeypatch, options):
    """Pre-norm: every norm but each stack's first takes the previous sublayer's output and the
    residual stream (dropout, add and norm one call, the final norms included); with dropout 0
    the loss and every gradient are those of the separate add and norm, bit for bit."""
    model = make(**{"prenorm": True, **options})
    src, mask, tgt, labels = batch()

    def loss_and_grads():
        loss = model(src, tgt, mask, labels=labels)["loss"]
        return [loss] + list(torch.autograd.grad(loss, list(model.parameters())))

    with monkeypatch.context() as m:
        calls = _record_norm_calls(m)
        fused = loss_and_grads()
    c = model.config
    n_norms = 2 * c.n_encoder_layer + 3 * c.n_decoder_layer + 2
    assert calls.count((True, c.dropout)) == n_norms - 2 and calls.count((False, 0.0)) == 2
    _record_norm_calls(monkeypatch, chain=True)
    chain = loss_and_grads()
    for a, b in zip(fused, chain):
        assert torch.equal(a, b)
    monkeypatch.undo()
    dropped = make(**{"prenorm": True, "dropout": 0.2, **options}).train()  # the sublayers' dropout: the norms'
    with monkeypatch.context() as m:
        calls = _record_norm_calls(m)
        dropped(src, tgt, mask, labels=labels)["loss"].backward()
    assert calls.count((True, 0.2)) == n_norms - 2 and calls.count((False, 0.0)) == 2


def test_prenorm_generation_with_the_cache(monkeypatch):
    """The fused pre-norm decoder under the KV cache: cached greedy decoding equals recomputing
    the whole prefix, and equals the separate add-and-norm chain's decoding."""
    model = make(**OPTIONS[1]).eval()
    src, mask, _, _ = batch()
    fast = model.generate(src, 7, src_mask=mask, temperature=0, eos_token_id=-1)
    assert torch.equal(fast, _greedy_by_recomputing(model, src, mask, 7))
    calls = _record_norm_calls(monkeypatch, chain=True)
    assert torch.equal(model.generate(src, 7, src_mask=mask, temperature=0, eos_token_id=-1), fast)
    assert any(residual for residual, _ in calls)


def test_option_combinations_run_forward_and_backward():
    for norm, prenorm, act, pos, kv in itertools.product(["layernorm", "rmsnorm"], [False, True],
                                                         ["relu", "gelu", "geglu"], ["sinusoidal", "learned"],
                                                         [None, 1]):
        model = EncoderDecoder(EncoderDecoderConfig(vocab_size=19, max_seq_len=12, n_encoder_layer=1,
                                                    n_decoder_layer=1, n_head=2, d_model=16, d_hidden=24, norm=norm,
                                                    prenorm=prenorm, activation=act, positions=pos, n_kv_head=kv))
        src = torch.randint(3, 19, (2, 7))
        tgt = torch.randint(3, 19, (2, 5))
        out = model(src, tgt, labels=tgt)
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
        assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in model.parameters())


def test_bad_inputs():
    model = EncoderDecoder(EncoderDecoderConfig(**TINY))
    src = torch.randint(3, 50, (2, 5))
    with pytest.raises(ValueError, match="tgt_ids"):
        model(src, torch.randint(3, 50, (3, 4)))
    with pytest.raises(ValueError, match="src_mask"):
        model(src, src, src_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(3, 50, (1, 33)), src[:1])
    with pytest.raises(ValueError, match="positions"):
        EncoderDecoderConfig(**{**TINY, "positions": "alibi"})
