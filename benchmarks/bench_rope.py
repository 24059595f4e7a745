"""Keeps the rotary benchmark suite working: tiny CPU cases under pytest-benchmark (run with
--benchmark-enable to see figures) and one end-to-end run through ``fastlm.bench.main``.

Real figures come from ``python -m fastlm.bench rope`` on a GPU (benchmarks/gpu_check.sh).
"""

import json
import math

import pytest
import torch

import fastlm
from fastlm.bench import main, runner
from fastlm.bench import rope as rope_bench


@pytest.fixture
def bench(request):
    if not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.skip("pytest-benchmark is not installed or is disabled (-p no:benchmark)")
    return request.getfixturevalue("benchmark")


@pytest.mark.parametrize("mode", rope_bench.MODES)
@pytest.mark.parametrize("impl", ["fastlm-torch", runner.EAGER])
def test_rope_case(bench, impl, mode):
    x = torch.randn(2, 9, 3, 16).requires_grad_()
    cos, sin = fastlm.rotary_cos_sin(9, 16)
    forward = rope_bench._forward(impl, {})
    out = bench(rope_bench._call(mode, lambda: forward(x, cos, sin), [x], torch.randn(2, 9, 3, 16)))
    assert all(torch.isfinite(o).all() for o in out)
    if mode == "fwd":
        torch.testing.assert_close(out[0], fastlm.rotary(x, cos, sin), rtol=1e-5, atol=1e-6)


def test_eager_form_is_fastlm_rotary():
    x = torch.randn(3, 11, 2, 24, dtype=torch.float64)
    cos, sin = fastlm.rotary_cos_sin(11, 24, dtype=torch.float64)
    torch.testing.assert_close(rope_bench.eager_rope(x, cos, sin), fastlm.rotary(x, cos, sin), rtol=1e-12, atol=1e-12)


def test_main_quick_writes_json_and_markdown(tmp_path):
    assert main(["rope", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "rope.json").read_text())
    # (rotary_attention's rows: rotary fused into attention vs its own launch, both on fastlm)
    assert {r["impl"] for r in doc["rows"]} == {"fastlm-torch", runner.EAGER, "fastlm-torch-fused",
                                                "fastlm-torch-unfused"}
    assert {r["op"] for r in doc["rows"]} >= {"rotary", "qk_norm_rotary", "rotary_attention"}
    assert {r["mode"] for r in doc["rows"]} == set(rope_bench.MODES)
    assert not [n for n in doc["notes"] if "failed" in n or "differs" in n], doc["notes"]
    for row in doc["rows"]:
        assert math.isfinite(row["ms"]) and row["ms"] > 0 and row["gbps"] > 0
        if row["op"] != "rotary":  # (the fused ops' rows take the attention suite's shapes)
            continue
        B, S, H, D = 1, 64, 2, 32
        assert (row["rows"], row["width"], row["heads"], row["hidden"]) == (B, S, H, D)
        assert row["bytes"] == 2 * B * S * H * D * 4 * (2 if row["mode"] == "fwd+bwd" else 1)
