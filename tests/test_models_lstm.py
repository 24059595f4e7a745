"""fastlm.models.LSTMLM against the same network written plainly with torch (F.embedding,
torch.nn.LSTM's weights through a hand-written recurrence, F.cross_entropy on shifted
logits), its gradients, its cached generation against recomputing the whole sequence, and
its config checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastlm.models import LSTMLM, LSTMConfig

TINY = dict(vocab_size=53, max_seq_len=32, d_model=24, n_layer=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These shapes are tiny: one thread is fastest, and OpenMP threads that spin while other
    processes hold the cores make a step of a 32-wide LSTM take a tenth of a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def plain_logits(model: LSTMLM, ids: torch.Tensor) -> torch.Tensor:
    """The logits written out: embedding, the LSTM cell equations layer by layer, head (float64)."""
    c = model.config
    p = {k: v.detach().double() for k, v in model.named_parameters()}
    x = F.embedding(ids, p["wte.weight"])
    B, L = ids.shape
    for layer in range(c.n_layer):
        h = torch.zeros(B, c.d_model, dtype=torch.float64)
        cell = torch.zeros_like(h)
        outs = []
        for t in range(L):
            gates = x[:, t] @ p[f"lstm.weight_ih_l{layer}"].T + p[f"lstm.bias_ih_l{layer}"] + \
                h @ p[f"lstm.weight_hh_l{layer}"].T + p[f"lstm.bias_hh_l{layer}"]
            i, f, g, o = gates.chunk(4, dim=-1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(cell)
            outs.append(h)
        x = torch.stack(outs, dim=1)
    if "proj.weight" in p:
        x = x @ p["proj.weight"].T
    head = p["wte.weight"] if c.tie_embeddings else p["lm_head.weight"]
    return x @ head.T


@pytest.mark.parametrize("extra", [dict(), dict(tie_embeddings=False), dict(d_embed=16),
                                   dict(d_embed=16, tie_embeddings=False)])
def test_loss_and_logits_match_plain_torch(extra):
    model = LSTMLM(LSTMConfig(**TINY, **extra))
    ids = torch.randint(0, TINY["vocab_size"], (3, 11))
    labels = ids.clone()
    labels[0, 4] = -100
    labels[2, 7] = -100
    out = model(ids, labels=labels, return_logits=True)
    ref = plain_logits(model, ids)
    torch.testing.assert_close(out["logits"].double(), ref, rtol=1e-5, atol=1e-5)
    ref_loss = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(out["loss"].item() - ref_loss.item()) < 1e-5, (out["loss"].item(), ref_loss.item())
    assert abs(model.loss_of_logits(out["logits"], labels).item() - ref_loss.item()) < 1e-5
    # Shapes of the pieces the config asked for.
    assert (model.proj is not None) == (extra.get("d_embed") is not None and extra.get("tie_embeddings", True))
    assert (model.lm_head is None) == extra.get("tie_embeddings", True)


def test_logits_only_when_asked():
    model = LSTMLM(LSTMConfig(**TINY))
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    out = model(ids, labels=ids)
    assert out["logits"] is None and out["loss"].dim() == 0
    out = model(ids)
    assert out["loss"] is None and out["logits"].shape == (2, 9, TINY["vocab_size"])


@pytest.mark.parametrize("tie", [True, False])
def test_gradients_match_plain_torch(tie):
    model = LSTMLM(LSTMConfig(**TINY, tie_embeddings=tie, d_embed=20)).double()
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    model(ids, labels=ids)["loss"].backward()
    got = {k: v.grad.clone() for k, v in model.named_parameters()}
    for v in model.parameters():
        assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
        v.grad = None
    logits = model(ids, return_logits=True)["logits"]
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    for k, v in model.named_parameters():
        # The fused loss works in float32 inside, whatever the input dtype.
        torch.testing.assert_close(got[k], v.grad, rtol=1e-6, atol=1e-9, msg=lambda m: f"{k}: {m}")


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = LSTMLM(LSTMConfig(vocab_size=17, max_seq_len=16, d_model=32, n_layer=1))
    ids = torch.randint(0, 17, (4, 16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = model(ids, labels=ids)["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_greedy_generation_with_state_equals_recomputing():
    for _ in range(8):  # a random model may greedily repeat one token: draw until it does not
        model = LSTMLM(LSTMConfig(**TINY, init_std=1.0)).eval()  # a peaked model: greedy paths differ
        prompt = torch.randint(0, TINY["vocab_size"], (3, 5))
        out = model.generate(prompt, 12, temperature=0.0)
        if len(set(out[:, 5:].flatten().tolist())) > 1:
            break
    assert out.shape == (3, 17) and torch.equal(out[:, :5], prompt)
    seq = prompt
    for _ in range(12):
        logits = model(seq)["logits"][:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert len(set(out[:, 5:].flatten().tolist())) > 1  # not a degenerate constant


def test_sampling_top_k_eos_and_reproducibility():
    model = LSTMLM(LSTMConfig(**TINY, init_std=0.5)).eval()
    prompt = torch.randint(0, TINY["vocab_size"], (4, 3))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = model.generate(prompt, 10, temperature=1.3, top_k=3, generator=g1)
    b = model.generate(prompt, 10, temperature=1.3, top_k=3, generator=g2)
    assert torch.equal(a, b)
    # top_k: every sampled token is among the 3 most likely given what came before it.
    logits = model(a)["logits"]
    top3 = logits[:, 2:-1].topk(3, dim=-1).indices
    assert (top3 == a[:, 3:, None]).any(-1).all()
    # top_k=1 is greedy.
    assert torch.equal(model.generate(prompt, 6, top_k=1, generator=g1), model.generate(prompt, 6, temperature=0.0))
    # eos: once a row produced it, it keeps producing it; generation stops when all rows did.
    greedy = model.generate(prompt, 8, temperature=0.0)
    eos = int(greedy[0, 3])
    out = model.generate(prompt, 8, temperature=0.0, eos_token_id=eos)
    for row in out[:, 3:]:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[hits[0, 0]:] == eos).all()
    assert out.shape[1] <= 11


def test_generate_zero_and_errors():
    model = LSTMLM(LSTMConfig(**TINY))
    prompt = torch.randint(0, TINY["vocab_size"], (2, 4))
    assert torch.equal(model.generate(prompt, 0), prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)
    with pytest.raises(ValueError, match="input_ids"):
        model(prompt.float())
    with pytest.raises(ValueError, match="labels"):
        model(prompt, labels=prompt[:, :-1])


def test_num_parameters_and_to_dict():
    c = LSTMConfig(**TINY)
    model = LSTMLM(c)
    V, E, H = c.vocab_size, c.d_model, c.d_model
    expect = V * E + (4 * H * (E + H) + 8 * H) + (4 * H * (H + H) + 8 * H)
    assert model.num_parameters() == expect == model.num_parameters(embeddings=False)
    assert LSTMConfig(**c.to_dict()) == c
    untied = LSTMLM(LSTMConfig(**TINY, tie_embeddings=False))
    assert untied.num_parameters() == expect + V * H
    # forget-gate bias initialised as asked (torch's gate order i, f, g, o).
    b = model.lstm.bias_ih_l0 + model.lstm.bias_hh_l0
    assert torch.allclose(b[H:2 * H], torch.ones(H))


@pytest.mark.parametrize("field,value", [("vocab_size", 0), ("max_seq_len", -3), ("d_model", 2.5), ("n_layer", 0),
                                         ("d_embed", 0), ("dropout", 1.0), ("dropout", -0.1), ("init_std", 0.0),
                                         ("tie_embeddings", "yes"), ("vocab_size", True)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"LSTMConfig: {field}"):
        LSTMConfig(**{**TINY, field: value})


def test_dropout_only_in_training():
    model = LSTMLM(LSTMConfig(**TINY, dropout=0.5))
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    model.eval()
    torch.testing.assert_close(model(ids)["logits"].double(), plain_logits(model, ids), rtol=1e-5, atol=1e-5)
    model.train()
    a, b = model(ids)["logits"], model(ids)["logits"]
    assert not torch.allclose(a, b)  # a fresh mask each call
