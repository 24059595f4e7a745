"""MFU inputs, bits per byte and the learning-rate schedule of fastlm.train."""

from __future__ import annotations

import math

import pytest
import torch

from fastlm.models import GPT, GPTConfig
from fastlm.train import metrics
from fastlm.train.loop import lr_factor


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("Some Future GPU", None)])
def test_peak_table(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.peak_tflops(torch.device("cuda", 0)) == peak
    assert metrics.peak_tflops(torch.device("cuda", 0), override=123.0) == 123.0
    assert metrics.peak_tflops(torch.device("cpu")) is None


def test_flops_per_token_is_6n_plus_attention():
    c = GPTConfig(vocab_size=97, max_seq_len=64, n_layer=3, n_head=2, d_model=32)
    model = GPT(c)
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    assert metrics.flops_per_token(model, "gpt", c, 64) == 6 * n + 12 * 3 * 32 * 64


def test_bits_per_byte_and_perplexity():
    out = metrics.summarize(1.5, tokens_per_byte=0.25)
    assert out["perplexity"] == pytest.approx(math.exp(1.5))
    assert out["bits_per_byte"] == pytest.approx(1.5 / math.log(2) * 0.25)
    assert "bits_per_byte" not in metrics.summarize(1.5, None)


def test_warmup_then_cosine_to_the_floor():
    f = [lr_factor(s, warmup=10, steps=110, min_ratio=0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:110], f[11:111]))
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5) and f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)
