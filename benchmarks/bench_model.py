"""Keeps the model benchmark suite working at its CPU size: its plain-PyTorch twin is the
same model as fastlm's GPT, a training step under pytest-benchmark (--benchmark-enable to see
figures), every implementation gets a row (or a note saying why not), and the losses of
implementations that share weights agree after the warm-up steps.

Real figures come from ``python -m fastlm.bench model`` on a GPU (benchmarks/gpu_check.sh)."""

import math

import pytest
import torch

from fastlm.bench import model as model_bench
from fastlm.bench import runner
from fastlm.models import GPT, GPTConfig

CEILINGS = {"copy_gbps": 10.0, "matmul_tflops": 0.05, "matmul_dtype": "fp32"}


@pytest.fixture
def bench(request):
    if not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.skip("pytest-benchmark is not installed or is disabled (-p no:benchmark)")
    return request.getfixturevalue("benchmark")


@pytest.mark.parametrize("impl", ["fastlm-torch", runner.EAGER])
def test_training_step(bench, impl):
    config = runner.Config(device=torch.device("cpu"), dtype=torch.float32)
    models = model_bench._models("gpt-tiny", 32, config, [impl])
    ids = torch.randint(0, model_bench.CPU_VOCAB, (2, 32))
    step = model_bench._step_fn(impl, models[impl], ids, config)
    first = step()
    later = bench(step)
    assert torch.isfinite(later) and later < first  # the same batch again: AdamW lowers its loss


def test_plain_twin_is_fastlm_gpt():
    cfg = GPTConfig(vocab_size=97, max_seq_len=24, n_layer=2, n_head=3, d_model=48)
    gpt = GPT(cfg).double()
    plain = model_bench.PlainGPT(97, 24, 2, 48, 3).double()
    plain.load_state_dict(gpt.state_dict(), strict=True)
    ids = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        ours = gpt(ids, labels=ids)["loss"]
        theirs = plain(ids, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)  # fastlm's loss accumulates in float32


def test_flop_count():
    # GPT-2 124M at T=1024: 6 N + 12 * 12 * 768 * 1024 per token (nanoGPT's estimate_mfu).
    n = 124_337_664 - 1024 * 768
    assert model_bench.model_flops_per_token(n, 12, 768, 1024) == 6 * n + 12 * 12 * 768 * 1024


@pytest.fixture(scope="module")
def cpu_run():
    config = runner.Config(device=torch.device("cpu"), dtype=torch.float32, reps=5, warmup=2)
    harness = runner.Harness(config, CEILINGS)
    model_bench.run(config, harness)
    return config, harness


def test_every_implementation_has_a_row_or_a_reason(cpu_run):
    config, harness = cpu_run
    impls = model_bench.implementations(config, runner.Harness(config, CEILINGS))
    assert {"fastlm-torch", runner.EAGER} <= set(impls)
    timed = {r["impl"] for r in harness.rows}
    assert timed == set(impls), (timed, harness.notes)
    assert any("fastlm-triton left out" in n for n in harness.notes)
    assert not [n for n in harness.notes if "failed" in n or "differs" in n or "non-finite" in n], harness.notes


def test_rows_carry_throughput_and_utilisation(cpu_run):
    _, harness = cpu_run
    rows = [r for r in harness.rows if r["op"] == "gpt-tiny"]  # the tiny-gpt-* cases: tests/test_bench_model.py
    assert rows
    for row in rows:
        assert (row["op"], row["rows"], row["width"], row["dtype"]) == ("gpt-tiny", 2, 64, "fp32")
        assert math.isfinite(row["ms"]) and row["ms"] > 0
        assert row["tokens_per_s"] == pytest.approx(2 * 64 / (row["ms"] * 1e-3))
        assert row["frac_matmul"] == pytest.approx(row["tflops"] / CEILINGS["matmul_tflops"])
        assert math.isfinite(row["loss_after_warmup"])
        # a random model's loss is near ln(vocab) at the start
        assert abs(row["loss_after_warmup"] - math.log(model_bench.CPU_VOCAB)) < 1.0


def test_losses_agree_where_weights_are_shared(cpu_run):
    _, harness = cpu_run
    loss = {r["impl"]: r["loss_after_warmup"] for r in harness.rows if r["op"] == "gpt-tiny"}
    assert loss["fastlm-torch"] == pytest.approx(loss[runner.EAGER], rel=1e-4)
