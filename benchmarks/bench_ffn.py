"""Keeps the feed-forward benchmark suite working: tiny CPU cases under pytest-benchmark (run
with --benchmark-enable to see figures), the FLOP count, and one end-to-end run of the suite
through ``fastlm.bench.main``.

Real figures come from ``python -m fastlm.bench ffn`` on a GPU (benchmarks/gpu_check.sh).
"""

import json
import math

import pytest
import torch

from fastlm.bench import ffn as ffn_bench
from fastlm.bench import main, runner


@pytest.fixture
def bench(request):
    if not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.skip("pytest-benchmark is not installed or is disabled (-p no:benchmark)")
    return request.getfixturevalue("benchmark")


@pytest.mark.parametrize("mode", ffn_bench.MODES)
@pytest.mark.parametrize("impl", ["fastlm-torch", runner.EAGER])
@pytest.mark.parametrize("activation", ffn_bench.ACTIVATIONS)
def test_ffn_case(bench, impl, mode, activation):
    hidden = ffn_bench.hidden_width(16, activation)
    rows = 2 * hidden if activation == "swiglu" else hidden
    inputs = [torch.randn(*s).requires_grad_() for s in ((12, 16), (rows, 16), (rows,), (16, hidden), (16,))]
    forward = ffn_bench._forward(impl, activation, {})
    out = bench(ffn_bench._call(mode, lambda: forward(*inputs), inputs, torch.randn(12, 16)))
    assert all(torch.isfinite(o).all() for o in out)
    if mode == "fwd":
        torch.testing.assert_close(out[0], ffn_bench.eager_block(*inputs, activation), rtol=1e-4, atol=1e-5)


def test_counts():
    assert ffn_bench.hidden_width(4096, "gelu_tanh") == 16384
    assert ffn_bench.hidden_width(4096, "swiglu") == 11008  # Llama's 8/3 d_model, rounded up to 256
    # tokens 2, d_model 3, hidden 5: forward 2 * 2 * 3 * (5 + 5); gated 2 * 2 * 3 * (10 + 5)
    assert ffn_bench.ffn_flops("fwd", 2, 3, 5, False) == 120
    assert ffn_bench.ffn_flops("fwd+bwd", 2, 3, 5, True) == 3 * 180


def test_main_quick_writes_json_and_markdown(tmp_path):
    assert main(["ffn", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "ffn.json").read_text())
    assert {r["impl"] for r in doc["rows"]} >= {"fastlm-torch", runner.EAGER, "matmuls"}
    assert {r["op"] for r in doc["rows"]} == {"feed_forward gelu_tanh", "feed_forward swiglu"}
    assert {r["mode"] for r in doc["rows"]} == set(ffn_bench.MODES)
    assert not [n for n in doc["notes"] if "failed" in n or "differs" in n], doc["notes"]
    for row in doc["rows"]:
        assert math.isfinite(row["ms"]) and row["ms"] > 0 and row["tflops"] > 0
        assert row["vs_matmuls"] > 0
