"""Keeps the loss benchmark suites ("ce", "lce") working: tiny CPU cases under
pytest-benchmark (run with --benchmark-enable to see figures), the byte and flop counts, and
one end-to-end run of each suite through ``fastlm.bench.main``.

Real figures come from ``python -m fastlm.bench ce`` / ``lce`` on a GPU (benchmarks/gpu_check.sh).
"""

import json
import math

import pytest
import torch

from fastlm.bench import ce as ce_bench
from fastlm.bench import main, runner


@pytest.fixture
def bench(request):
    if not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.skip("pytest-benchmark is not installed or is disabled (-p no:benchmark)")
    return request.getfixturevalue("benchmark")


@pytest.mark.parametrize("mode", ce_bench.MODES)
@pytest.mark.parametrize("impl", ["fastlm-torch", runner.EAGER])
def test_ce_case(bench, impl, mode):
    logits = torch.randn(16, 50).requires_grad_()
    t = ce_bench._targets(16, 50, "cpu")
    forward = ce_bench._ce_forward(impl, {})
    out = bench(ce_bench._call(mode, lambda: forward(logits, t), [logits]))
    assert all(torch.isfinite(o).all() for o in out)
    assert out[0].shape == (() if mode == "fwd" else logits.shape)


@pytest.mark.parametrize("impl", ["fastlm-torch", runner.EAGER])
def test_lce_case(bench, impl):
    x, w = torch.randn(16, 8).requires_grad_(), torch.randn(40, 8).requires_grad_()
    t = ce_bench._targets(16, 40, "cpu")
    forward = ce_bench._lce_forward(impl, {})
    dx, dw = bench(ce_bench._call("fwd+bwd", lambda: forward(x, w, t), [x, w]))
    assert dx.shape == x.shape and dw.shape == w.shape


def test_counts():
    assert ce_bench.ce_bytes("fwd", 4, 10, torch.bfloat16) == 80
    assert ce_bench.ce_bytes("fwd+bwd", 4, 10, torch.float32) == 3 * 160
    assert ce_bench.lce_flops("fwd+bwd", 2, 3, 5) == 3 * 2 * 2 * 3 * 5


@pytest.mark.parametrize("suite", ["ce", "lce"])
def test_main_quick_writes_json_and_markdown(tmp_path, capsys, suite):
    assert main([suite, "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / f"{suite}.json").read_text())
    assert doc["rows"], "no case ran"
    assert {r["impl"] for r in doc["rows"]} >= {"fastlm-torch", runner.EAGER}
    for row in doc["rows"]:
        assert math.isfinite(row["ms"]) and row["ms"] > 0
        if suite == "lce":
            assert row["tflops"] > 0 and row["hidden"] > 0
    assert not any("differs" in n or "failed" in n for n in doc["notes"]), doc["notes"]
    table = (tmp_path / f"{suite}.md").read_text()
    assert "| op | mode | impl |" in table and ("| TFLOP/s |" in table) == (suite == "lce")
