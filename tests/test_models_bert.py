"""fastlm.models.BertForMaskedLM against a plain-PyTorch twin from the same parameters (padded
batches through SDPA with a key padding mask), and BERT's masking helper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.models import BertConfig, BertForMaskedLM, mask_tokens
from fastlm.testing import assert_close, summation_floor

from .conftest import DEVICE

TINY = dict(vocab_size=57, max_seq_len=24, n_layer=2, n_head=2, d_model=32, d_hidden=64, dropout=0.0)


def twin(model: BertForMaskedLM, ids, mask, types, dtype=torch.float64):
    """Logits (B, L, V) of the same network in plain torch on the padded batch."""
    c = model.config
    p = {k: v.to(dtype) for k, v in model.named_parameters()}
    B, L = ids.shape
    H, D = c.n_head, c.head_dim

    def ln(prefix, x):
        return F.layer_norm(x, (c.d_model,), p[prefix + ".weight"], p[prefix + ".bias"], c.norm_eps)

    def lin(prefix, x):
        return F.linear(x, p[prefix + ".weight"], p[prefix + ".bias"])

    x = p["word_embeddings.weight"][ids] + p["position_embeddings.weight"][:L] + p["token_type_embeddings.weight"][types]
    x = ln("embed_norm", x)
    keep = mask.bool()[:, None, None, :]  # (B, 1, 1, S): True takes part
    for i in range(c.n_layer):
        q, k, v = lin(f"layers.{i}.qkv", x).view(B, L, 3, H, D).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep)
        x = ln(f"layers.{i}.norm1", x + lin(f"layers.{i}.proj", a.transpose(1, 2).reshape(B, L, -1)))
        h = F.gelu(lin(f"layers.{i}.mlp.fc_in", x))
        x = ln(f"layers.{i}.norm2", x + lin(f"layers.{i}.mlp.fc_out", h))
    t = ln("head_norm", F.gelu(lin("head_dense", x)))
    return F.linear(t, p["word_embeddings.weight"], p["head_bias"])


def make():
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**TINY)).to(DEVICE)
    with torch.no_grad():  # BERT's init (std 0.02, zero biases) leaves a tiny model nearly linear
        for name, q in model.named_parameters():
            if q.dim() == 1:
                q.add_(torch.randn_like(q) * 0.2)
            else:
                q.normal_(0.0, 1.0 if "embeddings" in name else q.shape[1] ** -0.5)
    return model


def batch(B=3, L=19):
    ids = torch.randint(1, TINY["vocab_size"], (B, L), device=DEVICE)
    lengths = torch.tensor([L, 7, 1][:B], device=DEVICE)
    mask = torch.arange(L, device=DEVICE)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    types = (torch.arange(L, device=DEVICE)[None, :] >= 4).long().expand(B, L) * mask
    return ids, mask, types


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_and_loss_match_the_twin_on_padded_batches(backend):
    model = make()
    ids, mask, types = batch()
    inputs, labels = mask_tokens(ids, 3, TINY["vocab_size"], special_tokens_mask=~mask,
                                 generator=torch.Generator().manual_seed(1), probability=0.4)
    with fastlm.use_backend(backend):
        out = model(inputs, mask, types, labels=labels, return_logits=True)
        grads = torch.autograd.grad(out["loss"], [model.word_embeddings.weight, model.layers[0].qkv.weight])
    ref, eager = twin(model, inputs, mask, types), twin(model, inputs, mask, types, torch.float32)
    real = mask[..., None]  # padding rows: fastlm gives zeros there, the twin whatever torch computes
    terms = TINY["d_model"] * 4 * TINY["n_layer"]
    assert_close(out["logits"] * real, ref * real, eager * real, "logits",
                 atol=summation_floor(ref, torch.float32, terms))

    def loss_of(logits):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    assert_close(out["loss"], loss_of(ref), loss_of(eager), "loss")
    ref_grads = torch.autograd.grad(loss_of(twin(model, inputs, mask, types)),
                                    [model.word_embeddings.weight, model.layers[0].qkv.weight])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.to(g.dtype), rtol=1e-3, atol=1e-5 * max(r.abs().max().item(), 1.0))


def test_padding_does_not_change_the_real_tokens():
    model = make().eval()
    ids, mask, types = batch()
    full = model(ids, mask, types)["logits"]
    alone = model(ids[1:2, :7], mask[1:2, :7], types[1:2, :7])["logits"]
    torch.testing.assert_close(full[1, :7], alone[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(full[1, 7:], torch.zeros_like(full[1, 7:]))


def test_mask_tokens_is_bert_masking():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 512))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    inputs, labels = mask_tokens(ids, 4, 1000, special_tokens_mask=special, generator=g)
    picked = labels != -100
    assert abs(picked.float().mean().item() - 0.15) < 0.01 and not picked[:, 0].any()
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(inputs[~picked], ids[~picked])
    masked = (inputs == 4) & picked
    unchanged = (inputs == ids) & picked
    frac = picked.sum().item()
    assert abs(masked.sum().item() / frac - 0.8) < 0.02
    assert abs(unchanged.sum().item() / frac - 0.1) < 0.02  # (plus the rare random draw of the same token)
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(ids, 4, 1000, probability=1.5)


def test_bad_inputs():
    model = BertForMaskedLM(BertConfig(**TINY))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.ones(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(**{**TINY, "d_model": 30, "n_head": 4})
