"""Keeps the norm benchmark harness working: the same cases fastlm.bench times, at tiny
sizes on CPU, under pytest-benchmark (run with --benchmark-enable to see figures), and
one end-to-end run of ``fastlm.bench.main``.

Real figures come from ``python -m fastlm.bench norm`` on a GPU (benchmarks/gpu_check.sh).
Where pytest-benchmark is missing or disabled (``-p no:benchmark``, as on the GPU machine),
the fixture tests skip and the end-to-end test still runs.
"""

import json
import math

import pytest
import torch

from fastlm.bench import main
from fastlm.bench import norm as norm_bench
from fastlm.bench import runner

CPU = torch.device("cpu")
TINY_ROWS, TINY_WIDTH = 8, 64


@pytest.fixture
def bench(request):
    """pytest-benchmark's ``benchmark`` fixture, or a skip where the plugin is not active."""
    if not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.skip("pytest-benchmark is not installed or is disabled (-p no:benchmark)")
    return request.getfixturevalue("benchmark")


@pytest.mark.parametrize("mode", norm_bench.MODES)
@pytest.mark.parametrize("impl", ["fastlm-torch", runner.EAGER])
@pytest.mark.parametrize("op", norm_bench.OPS)
def test_norm_case(bench, op, impl, mode):
    inputs = norm_bench.make_inputs(op, TINY_ROWS, TINY_WIDTH, torch.float32, CPU)
    grads = norm_bench.output_grads(op, inputs[0])
    forward = (norm_bench.eager_forward(op, TINY_WIDTH) if impl == runner.EAGER
               else norm_bench.fastlm_forward(op, TINY_WIDTH, "torch"))
    call = norm_bench.mode_call(mode, forward, inputs, grads)
    out = bench(call)
    n_inputs = sum(t is not None for t in inputs)
    # (the residual ops' forward returns the normed rows and the residual stream)
    assert len(out) == (n_inputs if mode != "fwd" else (2 if op.startswith(("add_", "dropout_add_")) else 1))
    assert all(torch.isfinite(t).all() for t in out)


def test_harness_case(bench):
    """One case through Harness.run_case: interleaved timing, rows, the output check."""
    config = runner.Config(device=CPU, dtype=torch.float32, reps=2, warmup=1)
    harness = runner.Harness(config, {"copy_gbps": 1.0})
    op, mode = "add_rms_norm", "fwd+bwd"
    inputs = norm_bench.make_inputs(op, TINY_ROWS, TINY_WIDTH, torch.float32, CPU)
    grads = norm_bench.output_grads(op, inputs[0])
    fns = {name: norm_bench.mode_call(mode, fwd, inputs, grads) for name, fwd in (
        ("fastlm-torch", norm_bench.fastlm_forward(op, TINY_WIDTH, "torch")),
        (runner.EAGER, norm_bench.eager_forward(op, TINY_WIDTH)))}
    meta = {"op": op, "mode": mode, "rows": TINY_ROWS, "width": TINY_WIDTH, "dtype": "fp32"}
    nbytes = norm_bench.bytes_moved(op, mode, TINY_ROWS, TINY_WIDTH, torch.float32)
    rows = bench(harness.run_case, meta, fns, nbytes, norm_bench.compare(torch.float32))
    assert [r["impl"] for r in rows] == ["fastlm-torch", runner.EAGER]
    assert harness.notes == []  # the reference agrees with eager
    eager = rows[1]
    assert eager["speedup_vs_eager"] == 1.0 and eager["speedup_vs_compile"] is None


def test_failing_impl_is_left_out_with_a_note():
    config = runner.Config(device=CPU, dtype=torch.float32, reps=1, warmup=1)
    harness = runner.Harness(config, {"copy_gbps": 1.0})

    def broken():
        raise RuntimeError("no kernel here")

    meta = {"op": "x", "mode": "fwd", "rows": 1, "width": 1, "dtype": "fp32"}
    rows = harness.run_case(meta, {"broken": broken, runner.EAGER: lambda: torch.ones(3).sum()}, 12)
    assert [r["impl"] for r in rows] == [runner.EAGER]
    assert any("broken failed" in n and "no kernel here" in n for n in harness.notes)


def test_bytes_moved_counts_each_tensor_once():
    rows, width, elem = 4, 8, 2  # bf16
    act, vec = rows * width * elem, width * elem
    assert norm_bench.bytes_moved("rms_norm", "fwd", rows, width, torch.bfloat16) == 2 * act + vec
    assert norm_bench.bytes_moved("add_layer_norm", "bwd", rows, width, torch.bfloat16) == 4 * act + 3 * vec
    assert (norm_bench.bytes_moved("layer_norm", "fwd+bwd", rows, width, torch.bfloat16)
            == norm_bench.bytes_moved("layer_norm", "fwd", rows, width, torch.bfloat16)
            + norm_bench.bytes_moved("layer_norm", "bwd", rows, width, torch.bfloat16))


def test_main_quick_writes_json_and_markdown(tmp_path, capsys):
    assert main(["norm", "--quick", "--out", str(tmp_path)]) == 0
    json_path, md_path = tmp_path / "norm.json", tmp_path / "norm.md"
    assert json_path.is_file() and md_path.is_file()
    doc = json.loads(json_path.read_text())
    for key in ("date", "device", "torch", "python", "triton"):
        assert key in doc["environment"]
    assert doc["ceilings"]["copy_gbps"] > 0
    assert doc["rows"], "no case ran"
    expected = {"op", "mode", "impl", "rows", "width", "dtype", "ms", "gbps", "frac_copy_bw", "peak_mib",
                "speedup_vs_eager", "speedup_vs_compile"}
    for row in doc["rows"]:
        assert expected <= row.keys()
        assert math.isfinite(row["ms"]) and row["ms"] > 0
        assert math.isfinite(row["gbps"]) and row["gbps"] > 0
    assert {r["op"] for r in doc["rows"]} == set(norm_bench.OPS)
    assert {r["mode"] for r in doc["rows"]} == set(norm_bench.MODES)
    assert {"fastlm-torch", runner.EAGER} <= {r["impl"] for r in doc["rows"]}
    assert "| op | mode | impl |" in md_path.read_text()
    assert "| op | mode | impl |" in capsys.readouterr().out
