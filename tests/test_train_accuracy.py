"""Token accuracy (issue 22): the models return it beside the loss, from the loss kernel's own
pass (fastlm.linear_cross_entropy_with_stats), with the loss and every gradient exactly what
fastlm.linear_cross_entropy gave; `fastlm train` weights it by labelled tokens across
micro-batches and processes and writes it to metrics.jsonl, the validation records and the
progress bar. The oracle throughout: the model's head recomputed in float64, argmax against
the labels over the counted tokens."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.models import (BertConfig, BertForMaskedLM, EncoderDecoder, EncoderDecoderConfig, GPT, GPTConfig,
                           LSTMConfig, LSTMLM)
from fastlm.models import bert as bert_module
from fastlm.models import encdec as encdec_module
from fastlm.models import gpt as gpt_module
from fastlm.models import lstm as lstm_module
from fastlm.ops import linear_cross_entropy as lce_ops
from fastlm.train import evaluate as evaluate_module
from fastlm.train import loop as loop_module
from fastlm.train.commands import eval_main, train_main
from fastlm.train.evaluate import load

from .conftest import DEVICE
from .train_common import train_args, write_corpus

IGNORE = -100
MODULES = {"gpt": gpt_module, "bert": bert_module, "encdec": encdec_module, "lstm": lstm_module}


@torch.no_grad()
def predictions(model, kind: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax of the float64 logits, label) for every labelled position of ``batch``: the
    model's hidden states, then its head in float64."""
    if kind in ("gpt", "lstm"):
        h = model.hidden_states(batch["input_ids"])
        h = h[0] if kind == "lstm" else h
        logits = F.linear(h[:, :-1].double(), model.head_weight.double())
        return logits.argmax(-1).reshape(-1), batch["labels"][:, 1:].reshape(-1)
    if kind == "bert":
        hidden = model(batch["input_ids"], return_logits=False)["hidden_states"]
        t = model.head_norm(model.head_dense(hidden)).double()
        logits = F.linear(t, model.word_embeddings.weight.double(), model.head_bias.double())
        return logits.argmax(-1).reshape(-1), batch["labels"].reshape(-1)
    y = model.decode(batch["tgt_ids"], model.encode(batch["src_ids"], batch.get("src_mask")))
    logits = F.linear(y.double(), model.embed.weight.double())
    return logits.argmax(-1).reshape(-1), batch["labels"].reshape(-1)


def correct_and_counted(model, kind: str, batch: dict) -> tuple[int, int]:
    pred, label = predictions(model, kind, batch)
    counted = label != IGNORE
    return int((pred == label)[counted].sum()), int(counted.sum())


# ----------------------------------------------------------------------------- the op's small-logits path

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_with_stats_on_the_native_path_is_the_plain_op(reduction, bias):
    """Small logits on a CPU take torch's own loss (F.linear + F.cross_entropy): the with-stats
    form takes it too, so its loss and gradients are linear_cross_entropy's bit for bit (the
    chunked path's loss can differ from torch's in the last bit); its statistics are right."""
    g = torch.Generator().manual_seed(1)
    n, h, v = 100, 64, 300
    x = torch.randn(n, h, generator=g, requires_grad=True)
    w = (torch.randn(v, h, generator=g) * 0.3).requires_grad_(True)
    b = torch.randn(v, generator=g, requires_grad=True) if bias else None
    logits64 = F.linear(x.double(), w.double(), b.double() if bias else None).detach()
    t = torch.randint(0, v, (n,), generator=g)
    t[::3] = logits64.argmax(-1)[::3]
    t[1::5] = IGNORE
    leaves = [p for p in (x, w, b) if p is not None]
    plain = fastlm.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction)
    plain_grads = torch.autograd.grad(plain, leaves, torch.ones_like(plain))
    for skip in (True, False):
        loss, stats = fastlm.linear_cross_entropy_with_stats(x, w, t, linear_bias=b, reduction=reduction,
                                                             skip_ignored=skip)
        grads = torch.autograd.grad(loss, leaves, torch.ones_like(loss))
        assert torch.equal(loss, plain)
        assert all(torch.equal(a, r) for a, r in zip(grads, plain_grads))
        counted = t != IGNORE
        expected = (logits64.argmax(-1) == t)[counted].double().mean()
        assert stats.accuracy.dtype == torch.float32 and stats.accuracy.dim() == 0
        assert not stats.accuracy.requires_grad
        assert abs(stats.accuracy.item() - expected.item()) < 1e-6 and expected > 0.3
        lse = torch.logsumexp(logits64, -1)
        torch.testing.assert_close(stats.lse.double()[counted], lse[counted], rtol=1e-6, atol=1e-6)
        if skip:  # an ignored row's lse is 0, as on the fused path that never forms its logits
            assert (stats.lse[~counted] == 0).all()
        else:
            torch.testing.assert_close(stats.lse.double()[~counted], lse[~counted], rtol=1e-6, atol=1e-6)
        assert stats.z_loss.abs().max() == 0 and stats.lse.shape == t.shape


# ----------------------------------------------------------------------------- the models

def _model_and_batch(kind: str, ignored: float):
    """A tiny model and a batch whose labels are the model's own float64 argmax at every third
    counted position (an accuracy well away from 0), random elsewhere, ignored at a fraction."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    B, L = 3, 17
    if kind == "gpt":
        model = GPT(GPTConfig(vocab_size=61, max_seq_len=40, n_layer=2, n_head=2, d_model=32))
    elif kind == "lstm":
        model = LSTMLM(LSTMConfig(vocab_size=61, max_seq_len=40, n_layer=1, d_model=32))
    elif kind == "bert":
        model = BertForMaskedLM(BertConfig(vocab_size=57, max_seq_len=24, n_layer=2, n_head=2, d_model=32,
                                           d_hidden=64, dropout=0.0))
    else:
        model = EncoderDecoder(EncoderDecoderConfig(vocab_size=53, max_seq_len=32, n_encoder_layer=1,
                                                    n_decoder_layer=1, n_head=2, d_model=32, d_hidden=64,
                                                    dropout=0.0))
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (B, L), generator=g)
    if kind == "encdec":
        batch = {"src_ids": torch.randint(3, vocab, (B, 11), generator=g), "tgt_ids": ids}
    else:
        batch = {"input_ids": ids}
    pred, _ = predictions(model, kind, {**batch, "labels": ids})
    labels = torch.randint(0, vocab, (B, L), generator=g)
    aligned = labels[:, 1:] if kind in ("gpt", "lstm") else labels  # a view: GPT's labels are shifted inside
    aligned[:, ::3] = pred.view(B, -1)[:, ::3]
    drop = torch.rand(aligned.shape, generator=g) < ignored
    drop[:, ::3] = False  # the right ones stay counted
    aligned[drop] = IGNORE
    return model, {**batch, "labels": labels}


class _PlainStats:
    """The previous forward: fastlm.linear_cross_entropy for the loss (and no statistics)."""

    def __call__(self, *args, **kwargs):
        return fastlm.linear_cross_entropy(*args, **kwargs), types.SimpleNamespace(accuracy=None)


@pytest.mark.parametrize("chunked", [False, True], ids=["native", "chunked"])
@pytest.mark.parametrize("kind, ignored", [("gpt", 0.2), ("lstm", 0.2), ("bert", 0.85), ("encdec", 0.1)])
def test_models_return_accuracy_and_keep_the_loss_and_gradients(kind, ignored, chunked, monkeypatch):
    """The loss and every parameter's gradient are bit for bit those of the previous forward
    (linear_cross_entropy), on torch's small-logits path and on the chunked custom op (what a
    GPU runs); out["accuracy"] is the float64 head's token accuracy, detached."""
    if chunked:
        monkeypatch.setattr(lce_ops, "_SMALL_LOGITS", 0)
    model, batch = _model_and_batch(kind, ignored)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(**batch)
    grads = torch.autograd.grad(out["loss"], params, allow_unused=True)
    with monkeypatch.context() as m:
        m.setattr(MODULES[kind], "linear_cross_entropy_with_stats", _PlainStats())
        before = model(**batch)
        before_grads = torch.autograd.grad(before["loss"], params, allow_unused=True)
    assert before["accuracy"] is None  # the patch took: the comparison is with the other path
    assert torch.equal(out["loss"], before["loss"])
    for name_p, a, r in zip((n for n, p in model.named_parameters() if p.requires_grad), grads, before_grads):
        assert (a is None and r is None) or torch.equal(a, r), name_p
    correct, counted = correct_and_counted(model, kind, batch)
    acc = out["accuracy"]
    assert acc.dtype == torch.float32 and acc.dim() == 0 and not acc.requires_grad
    assert counted > 0 and correct / counted > 0.25
    assert abs(acc.item() - correct / counted) < 1e-6, (acc.item(), correct, counted)
    assert set(out) >= {"loss", "logits"} and out["logits"] is None  # the other returns stay


def test_gpt_accuracy_on_the_triton_kernels():
    """The same accuracy from the Triton kernels' STATS pass (the interpreter here)."""
    model, batch = _model_and_batch("gpt", 0.2)
    model, batch = model.to(DEVICE), {k: v.to(DEVICE) for k, v in batch.items()}
    with fastlm.use_backend("triton"):
        out = model(**batch)
    correct, counted = correct_and_counted(model, "gpt", batch)
    assert abs(out["accuracy"].item() - correct / counted) < 1e-6
    with fastlm.use_backend("torch"):
        torch.testing.assert_close(out["loss"], model(**batch)["loss"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- fastlm train

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"), n_files=12)


def _records(run: str, kind: str) -> list:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.mark.parametrize("kind", ["gpt", "bert", "encdec", "lstm"])
def test_train_writes_the_token_accuracy(kind, corpus, tmp_path, monkeypatch, capsys):
    """Each train record's accuracy is that of the weights before its step (the checkpoint one
    step back) on that step's micro-batches, weighted by their labelled tokens; the validation
    records' val_accuracy that of their step's weights on the evaluation batches; the progress
    bar shows it. Two micro-batches per step: BERT's differ in labelled tokens, and there the
    right weighting differs from a mean of the micro-batches' accuracies."""
    steps, accum = 4, 2
    train_batches, eval_batches = [], []

    def spy(into, real):
        def make_batch(*args, **kwargs):
            batch, n = real(*args, **kwargs)
            into.append((batch, n))
            return batch, n
        return make_batch

    monkeypatch.setattr(loop_module, "make_batch", spy(train_batches, loop_module.make_batch))
    monkeypatch.setattr(evaluate_module, "make_batch", spy(eval_batches, evaluate_module.make_batch))
    run = str(tmp_path / kind)
    args = train_args(kind, corpus, run, steps, "--lr", "1e-2", "--save-every", "1", "--keep", str(steps + 1),
                      "--grad-accum", str(accum), "--batch-size", "2", "--dropout", "0")
    args.remove("--no-progress")
    assert train_main(args) == 0
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert len(train_batches) == steps * accum

    def weights_after(step):
        return load(os.path.join(run, "checkpoints", f"step-{step:08d}")).model

    train = _records(run, "train")
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    weighted_apart = []
    for r in train[1:]:  # step s ran on the weights saved at step s - 1
        model = weights_after(r["step"] - 1)
        micro = [correct_and_counted(model, kind, b) for b, _ in train_batches[(r["step"] - 1) * accum:
                                                                              r["step"] * accum]]
        assert [c for _, c in micro] == [n for _, n in train_batches[(r["step"] - 1) * accum:r["step"] * accum]]
        expected = sum(c for c, _ in micro) / sum(n for _, n in micro)
        assert abs(r["accuracy"] - expected) < 1e-6, (r["step"], r["accuracy"], micro)
        mean_of_means = sum(c / n for c, n in micro) / len(micro)
        weighted_apart.append(abs(expected - mean_of_means) > 1e-4)
    assert any(r["accuracy"] > 0 for r in train[1:]), train
    if kind == "bert":
        assert any(weighted_apart), "the runs never told the weighting from a mean of means"

    vals = _records(run, "val")
    assert [v["step"] for v in vals] == [2, 4]
    per_eval = len(eval_batches) // len(vals)
    assert per_eval * len(vals) == len(eval_batches)
    for i, v in enumerate(vals):
        model = weights_after(v["step"])
        got = [correct_and_counted(model, kind, b) for b, _ in eval_batches[i * per_eval:(i + 1) * per_eval]]
        expected = sum(c for c, _ in got) / sum(n for _, n in got)
        assert abs(v["val_accuracy"] - expected) < 1e-6, (v["step"], v["val_accuracy"], expected)
        assert sum(n for _, n in got) == v["val_tokens"]

    assert f"acc={train[-1]['accuracy']:.1%}" in err, err[-2000:]  # the progress bar's postfix
    assert eval_main([run, "--json", "--max-tokens", "512"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(vals[-1]["val_accuracy"], abs=1e-9)
