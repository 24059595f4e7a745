"""The attention benchmark suite at its CPU sizes: every implementation gets a row for every
case (or a note saying why not), and the TFLOP/s follow FlashAttention's count."""

import math

import pytest
import torch

from fastlm.bench import attention as attn_bench
from fastlm.bench import runner

# Fixed ceilings instead of measured ones, so frac_matmul can be checked exactly.
CEILINGS = {"copy_gbps": 10.0, "matmul_tflops": 0.05, "matmul_dtype": "fp32"}


@pytest.fixture(scope="module")
def cpu_run():
    config = runner.Config(device=torch.device("cpu"), dtype=torch.float32, reps=2, warmup=1)
    harness = runner.Harness(config, CEILINGS)
    attn_bench.run(config, harness)
    return config, harness


def test_cpu_shape_is_tiny():
    config = runner.Config(device=torch.device("cpu"), dtype=torch.float32)
    assert attn_bench.shapes(config) == [(1, 64, 2, 32)]


def test_every_implementation_has_a_row_or_a_reason(cpu_run):
    config, harness = cpu_run
    impls = attn_bench.implementations(config, runner.Harness(config, CEILINGS))
    assert {"fastlm-torch", runner.EAGER, "sdpa-math"} <= set(impls)
    cases = {(r["op"], r["mode"]) for r in harness.rows}
    assert cases == {(op, mode) for op in ("attention", "attention causal") for mode in attn_bench.MODES}
    for op, mode in cases:
        timed = {r["impl"] for r in harness.rows if (r["op"], r["mode"]) == (op, mode)}
        for name in impls:
            if name in ("fastlm-torch", runner.EAGER, "sdpa-math"):
                assert name in timed, (op, mode, name, harness.notes)
            elif name not in timed:  # an SDPA backend without a CPU kernel: left out, with torch's reason
                assert name in attn_bench.SDPA, (op, mode, name)
                causal = " causal" if op.endswith("causal") else ""
                assert any(n.startswith(f"{name} left out at B=1 L=64 H=2 D=32{causal}: no kernel")
                           for n in harness.notes), harness.notes
    assert not [n for n in harness.notes if "failed" in n or "differs" in n], harness.notes


def test_rows_report_tflops_and_fraction_of_matmul_peak(cpu_run):
    _, harness = cpu_run
    for row in harness.rows:
        assert (row["rows"], row["width"], row["heads"], row["hidden"], row["dtype"]) == (1, 64, 2, 32, "fp32")
        assert math.isfinite(row["ms"]) and row["ms"] > 0
        assert math.isfinite(row["tflops"]) and row["tflops"] > 0
        assert row["frac_matmul"] == pytest.approx(row["tflops"] / CEILINGS["matmul_tflops"])


@pytest.mark.parametrize("op, mode, flops", [
    # B=1, H=2, L=S=64, D=32: forward 4 * 1 * 2 * 64 * 64 * 32 = 1048576 flops.
    ("attention", "fwd", 1048576),
    ("attention", "bwd", 2621440),            # 2.5x the forward
    ("attention", "fwd+bwd", 3670016),        # 3.5x the forward
    ("attention causal", "fwd", 524288),      # half of the full forward
    ("attention causal", "fwd+bwd", 1835008),
])
def test_tflops_count_flops_as_flashattention(cpu_run, op, mode, flops):
    _, harness = cpu_run
    rows = [r for r in harness.rows if (r["op"], r["mode"]) == (op, mode)]
    assert rows
    for row in rows:
        assert row["tflops"] * 1e12 * row["ms"] * 1e-3 == pytest.approx(flops)


def test_flops_on_a_gpu_shape():
    # seqlen 2048, head dim 128: B = 16384 / 2048 = 8, H = 2048 / 128 = 16.
    full = 4 * 8 * 16 * 2048 * 2048 * 128  # 2^38, about 275 GFLOP
    assert attn_bench.attention_flops("fwd", 8, 16, 2048, 2048, 128, False) == full == 274877906944
    assert attn_bench.attention_flops("fwd+bwd", 8, 16, 2048, 2048, 128, True) == 3.5 * full / 2


def test_materialising_implementations_skip_what_would_not_fit():
    free = 78 * 2 ** 30  # an H100's free memory
    # seqlen 16384: B=1, H=32 -> 32 GiB per float32 copy of the scores: left out.
    assert attn_bench.materialised_bytes(1, 32, 16384) > free // 2
    # seqlen 2048: B=8, H=32 -> 4 GiB per copy: runs.
    assert attn_bench.materialised_bytes(8, 32, 2048) < free // 2


@pytest.mark.parametrize("causal", [False, True])
def test_fastlm_triton_callable_matches_eager(causal):
    # On CPU the suite does not time the interpreter; this checks its fastlm-triton callable
    # runs forward and backward under the interpreter and agrees with eager.
    from fastlm.backend import unavailable_reason

    why_not = unavailable_reason("triton", "cpu")
    if why_not:
        pytest.skip(why_not)
    q, k, v = (torch.randn(1, 64, 2, 32, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    ours = attn_bench._call("fwd+bwd", lambda: attn_bench._forward("fastlm-triton", causal, {})(q, k, v),
                            [q, k, v], dout)()
    eager = attn_bench._call("fwd+bwd", lambda: attn_bench._eager(q, k, v, causal), [q, k, v], dout)()
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sdpa_reasons_keep_what_the_pinned_backend_lacks():
    # What torch warns on CUDA before "No available kernel" when only cuDNN is allowed.
    messages = [
        "Memory efficient kernel not used because: (Triggered internally at sdp_utils.cpp:900.)",
        "Memory Efficient attention has been runtime disabled. (Triggered internally at sdp_utils_cpp.h:550.)",
        "Flash attention kernel not used because: (Triggered internally at sdp_utils.cpp:902.)",
        "Flash attention has been runtime disabled. (Triggered internally at sdp_utils_cpp.h:540.)",
        "cuDNN attention kernel not used because: (Triggered internally at sdp_utils.cpp:904.)",
        "cuDNN attention requires head dim <= 128 (Triggered internally at sdp_utils.cpp:500.)",
    ]
    assert attn_bench.sdpa_reasons(messages) == ("cuDNN attention kernel not used because: "
                                                 "cuDNN attention requires head dim <= 128")
    assert attn_bench.sdpa_reasons(messages[:4]) == ""
