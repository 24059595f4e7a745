"""Keeps the attention benchmark suite working: tiny CPU cases under pytest-benchmark (run
with --benchmark-enable to see figures), the FLOP count, and one end-to-end run of the suite
through ``fastlm.bench.main``.

Real figures come from ``python -m fastlm.bench attention`` on a GPU (benchmarks/gpu_check.sh).
"""

import json
import math

import pytest
import torch

from fastlm.bench import attention as attn_bench
from fastlm.bench import main, runner


@pytest.fixture
def bench(request):
    if not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.skip("pytest-benchmark is not installed or is disabled (-p no:benchmark)")
    return request.getfixturevalue("benchmark")


@pytest.mark.parametrize("mode", attn_bench.MODES)
@pytest.mark.parametrize("impl", ["fastlm-torch", runner.EAGER, "sdpa-math"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_case(bench, impl, mode, causal):
    q, k, v = (torch.randn(1, 24, 2, 16).requires_grad_() for _ in range(3))
    forward = attn_bench._forward(impl, causal, {})
    out = bench(attn_bench._call(mode, lambda: forward(q, k, v), [q, k, v], torch.randn_like(q)))
    assert all(torch.isfinite(o).all() for o in out)
    assert out[0].shape == q.shape
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
    if mode == "fwd":
        torch.testing.assert_close(out[0], expected, rtol=1e-4, atol=1e-5)


def test_flops_as_flashattention_counts():
    # B=2, H=3, L=S=128, D=64: forward 4 * 2 * 3 * 128 * 128 * 64, halved when causal.
    fwd = 4 * 2 * 3 * 128 * 128 * 64
    assert attn_bench.attention_flops("fwd", 2, 3, 128, 128, 64, False) == fwd
    assert attn_bench.attention_flops("fwd", 2, 3, 128, 128, 64, True) == fwd / 2
    assert attn_bench.attention_flops("bwd", 2, 3, 128, 128, 64, False) == 2.5 * fwd
    assert attn_bench.attention_flops("fwd+bwd", 2, 3, 128, 128, 64, True) == 3.5 * fwd / 2


def test_gpu_shapes_are_flashattentions():
    config = runner.Config(device=torch.device("cuda"), dtype=torch.bfloat16)
    shapes = attn_bench.shapes(config)
    assert {(b * s, h * d) for b, s, h, d in shapes} == {(16384, 2048)}
    assert {s for _, s, _, _ in shapes} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {d for *_, d in shapes} == {64, 128}


def test_main_quick_writes_json_and_markdown(tmp_path):
    assert main(["attention", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "attention.json").read_text())
    assert {r["impl"] for r in doc["rows"]} >= {"fastlm-torch", runner.EAGER, "sdpa-math"}
    assert {r["op"] for r in doc["rows"]} == {"attention", "attention causal"}
    assert {r["mode"] for r in doc["rows"]} == set(attn_bench.MODES)
    assert not [n for n in doc["notes"] if "failed" in n], doc["notes"]
    for row in doc["rows"]:
        assert math.isfinite(row["ms"]) and row["ms"] > 0 and row["tflops"] > 0
    assert "TFLOP/s" in (tmp_path / "attention.md").read_text()
