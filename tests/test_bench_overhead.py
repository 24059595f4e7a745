"""The overhead benchmark suite on CPU with a handful of calls: a row per public op and mode
with positive times, fastlm's extra time and ratio over torch, the goal column, and the
large cases' peak memory (the CPU allocator's peak, read from the profiler)."""

import json
import pytest
import torch

import fastlm
from fastlm.bench import overhead
from fastlm.bench import runner

CEILINGS = {"copy_gbps": 10.0, "matmul_tflops": 0.05, "matmul_dtype": "fp32"}

# Every public op of fastlm (rotary_cos_sin builds rotary's tables and is not an op).
PUBLIC_OPS = {"layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "cross_entropy", "cross_entropy_with_stats",
              "layer_norm_fn", "linear_cross_entropy", "linear_cross_entropy_with_stats",
              "scaled_dot_product_attention", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache",
              "linear", "feed_forward", "rotary", "apply_rotary_emb",
              "apply_rotary_pos_emb", "qk_norm_rotary", "kl_div", "jsd", "linear_jsd"}


def _run(**kwargs):
    config = runner.Config(device=torch.device("cpu"), dtype=torch.float32, quick=True, warmup=1, **kwargs)
    harness = runner.Harness(config, CEILINGS)
    overhead.run(config, harness)
    return harness


@pytest.fixture(scope="module")
def tiny():
    return _run(calls=3, ops=["tiny"])


def test_public_ops_are_all_covered():
    ops = {name for name in fastlm.__all__ if callable(getattr(fastlm, name))
           and getattr(getattr(fastlm, name), "__module__", "").startswith("fastlm.ops.")} - {"rotary_cos_sin"}
    assert ops == PUBLIC_OPS


def test_a_row_per_op_mode_and_implementation(tiny):
    harness = tiny
    assert not [n for n in harness.notes if "failed" in n or "differs" in n], harness.notes
    cases = {(r["op"], r["mode"]) for r in harness.rows}
    names = {op.split(" ")[0] for op, _ in cases}
    assert names == PUBLIC_OPS
    # The extras get their own rows: cross_entropy's z_loss/softcap, linear's activation, two FFNs.
    assert {"cross_entropy z_loss+softcap", "linear gelu_tanh", "feed_forward gelu_tanh",
            "feed_forward swiglu"} <= {op for op, _ in cases}
    for op, _ in cases:
        modes = {m for o, m in cases if o == op}
        assert modes == ({"fwd"} if op == "flash_attn_with_kvcache" else {"fwd", "fwd+bwd"}), op
    assert any("flash_attn_with_kvcache: no fwd+bwd row" in n for n in harness.notes)
    for case in cases:
        impls = {r["impl"] for r in harness.rows if (r["op"], r["mode"]) == case}
        assert impls == {overhead.FASTLM, runner.EAGER}, case


def test_times_extra_and_ratio(tiny):
    base = {(r["op"], r["mode"]): r["us_per_call"] for r in tiny.rows if r["impl"] == runner.EAGER}
    for row in tiny.rows:
        assert row["us_per_call"] > 0 and row["ms"] == pytest.approx(row["us_per_call"] / 1e3)
        assert row["calls"] == 3 and row["rounds"] == overhead.ROUNDS == len(row["us_rounds"])
        assert row["group"] == "tiny" and row["peak_mib"] is None
        if row["impl"] == overhead.FASTLM:
            torch_us = base[(row["op"], row["mode"])]
            assert row["extra_us"] == pytest.approx(row["us_per_call"] - torch_us)
            assert row["ratio"] == pytest.approx(row["us_per_call"] / torch_us)
            assert row["goal"] == "met" or row["goal"].startswith("missed: ")
        else:
            assert "extra_us" not in row and "goal" not in row


def test_goal_notes_name_the_row():
    harness = runner.Harness(runner.Config(device=torch.device("cpu"), dtype=torch.float32), CEILINGS)
    config = harness.config
    fwd = {"mode": "fwd", "impl": "fastlm", "extra_us": 12.0, "ratio": 1.1}
    assert overhead._goal(fwd, "tiny", config, harness, "layer_norm fwd 4x64", {}) == "missed: +12.0 us > 10 us"
    assert harness.notes == ["goal missed: layer_norm fwd 4x64 fastlm: +12.0 us > 10 us"]
    both = {"mode": "fwd+bwd", "impl": "fastlm", "extra_us": 20.0, "ratio": 1.1}
    assert overhead._goal(both, "tiny", config, harness, "x", {}) == "met"  # 25 us allowed with the backward
    large = {"mode": "fwd", "impl": "fastlm", "extra_us": 900.0, "ratio": 1.05}
    assert overhead._goal(large, "large", config, harness, "ce", {"fastlm": 100.0, "torch-eager": 100.0}) == "met"
    assert overhead._goal(large, "large", config, harness, "ce", {"fastlm": 300.0, "torch-eager": 100.0}) \
        == "missed: peak 300 MiB > torch's 100 MiB"


def test_large_cases_report_peak_memory():
    harness = _run(calls=2, ops=["large"], rows=[64], widths=[256], modes=["fwd"])
    assert not [n for n in harness.notes if "failed" in n or "differs" in n], harness.notes
    assert {(r["op"], r["impl"]) for r in harness.rows} == {
        (op, impl) for op in ("layer_norm", "rms_norm", "cross_entropy") for impl in (overhead.FASTLM, runner.EAGER)}
    for row in harness.rows:
        assert row["group"] == "large" and (row["rows"], row["width"]) == (64, 256)
        assert row["peak_mib"] is not None and row["peak_mib"] > 0 and row["us_per_call"] > 0
    # torch's layer_norm returns y (64 KiB) and allocates mean and rstd (256 B each) on the side.
    eager_ln = next(r for r in harness.rows if r["op"] == "layer_norm" and r["impl"] == runner.EAGER)
    assert 64 * 256 * 4 / runner.MiB <= eager_ln["peak_mib"] <= 2 * 64 * 256 * 4 / runner.MiB


def test_ops_filter_selects_by_name():
    config = runner.Config(device=torch.device("cpu"), dtype=torch.float32, quick=True, ops=["cross_entropy"])
    assert {(c.op, c.group) for c in overhead.cases_for(config)} == {
        ("cross_entropy", "tiny"), ("cross_entropy z_loss+softcap", "tiny"), ("cross_entropy", "large")}
    config.ops = ["large", "rms_norm"]
    assert [(c.op, c.shape) for c in overhead.cases_for(config)] == [("rms_norm", "2048x4096")]


def test_cpu_peak_memory_counts_temporaries_and_outputs():
    n = 1 << 18  # 1 MiB of float32

    def fn():
        tmp = torch.randn(4 * n)  # 4 MiB, freed before the return
        out = torch.empty(n)
        out.copy_(tmp[:n])
        del tmp
        return out
    assert runner.cpu_peak_memory_mib(fn) == pytest.approx(5.0, abs=0.01)
    assert runner.cpu_peak_memory_mib(lambda: torch.empty(n)) == pytest.approx(1.0, abs=0.01)


def test_cli_registers_the_suite():
    from fastlm.bench import SUITES, build_parser

    assert SUITES["overhead"] == "fastlm.bench.overhead"
    args = build_parser().parse_args(["overhead", "--calls", "7", "--threads", "1", "--ops", "tiny"])
    assert (args.calls, args.threads, args.ops) == (7, 1, ["tiny"])


def test_readme_host_section_from_committed_cpu_runs(tmp_path):
    """The README's host-overhead section is generated from the newest committed CPU runs of
    the overhead and model suites (fastlm.bench.report), and the README carries its markers."""
    from pathlib import Path

    from fastlm.bench import report

    env = {"device_type": "cpu", "device": "test cpu", "date": "2026-12-01T00:00:00", "torch": "x",
           "cpu_count": 2, "torch_threads": 1}
    old = dict(env, date="2026-11-01T00:00:00")
    rows = [{"op": "layer_norm", "mode": "fwd", "impl": "torch-eager", "group": "tiny", "shape": "4x64",
             "us_per_call": 3.5, "peak_mib": None},
            {"op": "layer_norm", "mode": "fwd", "impl": "fastlm", "group": "tiny", "shape": "4x64",
             "us_per_call": 4.25, "peak_mib": None}]
    for name, e in (("host-new", env), ("host-old", old)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "overhead.json").write_text(json.dumps({"suite": "overhead", "environment": e,
                                                                    "rows": rows if e is env else rows[:1]}))
    (tmp_path / "host-new" / "model.json").write_text(json.dumps({"suite": "model", "environment": env, "rows": [
        {"op": "tiny-gpt-decode", "mode": "greedy decode", "impl": "fastlm-torch", "tokens_per_s": 1234.0}]}))
    text = report.host_section(tmp_path)
    assert "| layer_norm | 4x64 | fwd | 3.5 | 4.2 | +0.8 | 1.21x |" in text
    assert "host-new" in text and "host-old" not in text
    assert "| tiny-gpt-decode | greedy decode | fastlm-torch | 1,234 |" in text
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert report.HOST_BEGIN in readme and report.HOST_END in readme
