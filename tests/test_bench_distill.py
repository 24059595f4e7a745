"""The "distill" benchmark suite (fastlm/bench/distill.py): its torch forms compute what fastlm's
ops compute, its counts, and one end-to-end run through ``fastlm.bench.main`` on tiny CPU shapes.
The pytest-benchmark cases are in benchmarks/bench_distill.py."""

import json
import math

import pytest
import torch

import fastlm
from fastlm.bench import distill, main, runner

ALL_NOTES_BAD = ("failed", "differs", "stopped early")


def _logprobs(rows, vocab, dtype=torch.float64, scale=2.0):
    return torch.log_softmax(scale * torch.randn(rows, vocab, dtype=dtype), dim=-1)


@pytest.mark.parametrize("rows,vocab", [(1, 2), (17, 113)])
def test_eager_jsd_is_fastlm_jsd(rows, vocab):
    """The timed torch composition is the same loss and gradient as fastlm.jsd (float64, with
    ignored rows): otherwise the suite would compare two different things."""
    torch.manual_seed(rows)
    t = _logprobs(rows, vocab)
    label = torch.randint(0, vocab, (rows,))
    label[::3] = distill.IGNORE_INDEX
    s1 = _logprobs(rows, vocab).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    ours = fastlm.jsd(s1, t, label, beta=distill.BETA)
    theirs = distill.eager_jsd(s2, t, label)
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-9)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-6, atol=1e-9)


def test_eager_linear_jsd_is_fastlm_linear_jsd():
    torch.manual_seed(0)
    n, h, ht, v = 19, 8, 12, 37
    x = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(v, h, dtype=torch.float64) / h ** 0.5).requires_grad_()
    xt, wt = torch.randn(n, ht, dtype=torch.float64), torch.randn(v, ht, dtype=torch.float64) / ht ** 0.5
    label = torch.randint(0, v, (n,))
    label[[0, 5, 6]] = distill.IGNORE_INDEX
    ours = fastlm.linear_jsd(x, w, xt, wt, label, beta=distill.BETA)
    theirs = distill.eager_linear_jsd(x, w, xt, wt, label)
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-9)
    g_ours = torch.autograd.grad(ours, (x, w))
    g_theirs = torch.autograd.grad(theirs, (x, w))
    for a, b in zip(g_theirs, g_ours):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_counts():
    # kl_div / jsd: two (R, V) inputs read, plus the student's gradient written.
    assert distill.rows_bytes("fwd", 4, 10, torch.bfloat16) == 2 * 4 * 10 * 2
    assert distill.rows_bytes("fwd+bwd", 4, 10, torch.float32) == 3 * 4 * 10 * 4
    # linear_jsd: both models' logits forward, the student's dx and dW backward.
    assert distill.linear_jsd_flops("fwd", 2, 3, 5, 7) == 2 * 2 * 7 * (3 + 5)
    assert distill.linear_jsd_flops("fwd+bwd", 2, 3, 5, 7) == 2 * 2 * 7 * (3 + 5) + 4 * 2 * 3 * 7
    assert distill.linear_jsd_bytes("fwd", 2, 3, 5, 7, torch.bfloat16) == (2 * 3 + 7 * 3 + 2 * 5 + 7 * 5) * 2
    assert distill.linear_jsd_bytes("fwd+bwd", 2, 3, 5, 7, torch.float32) == \
        (2 * 3 + 7 * 3 + 2 * 5 + 7 * 5 + 2 * 3 + 7 * 3) * 4


def test_fwd_mode_builds_no_graph():
    """"fwd" is the loss alone: under no_grad, so fastlm.linear_jsd forms no gradient in it."""
    x, w = torch.randn(5, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    xt, wt = torch.randn(5, 6), torch.randn(9, 6)
    for impl in ("fastlm-torch", runner.EAGER):
        forward = distill._forward("linear_jsd", impl, {})
        (loss,) = distill._call("fwd", lambda: forward(x, w, xt, wt, None), [x, w])()
        assert loss.dim() == 0 and not loss.requires_grad and torch.isfinite(loss)


def _run(tmp_path, *args):
    # On CPU wherever it runs (the GPU's correctness stage too): tiny shapes, no compile.
    assert main(["distill", "--device", "cpu", "--compile", "off", "--out", str(tmp_path), *args]) == 0
    doc = json.loads((tmp_path / "distill.json").read_text())
    assert not [n for n in doc["notes"] if any(bad in n for bad in ALL_NOTES_BAD)], doc["notes"]
    return doc


def test_main_quick_writes_json_and_markdown(tmp_path):
    doc = _run(tmp_path, "--quick")
    assert doc["suite"] == "distill"
    rows = doc["rows"]
    cases = {(r["op"], r["mode"], r["impl"]) for r in rows}
    assert cases == {(op, mode, impl) for op in distill.OPS for mode in distill.MODES
                     for impl in ("fastlm-torch", runner.EAGER)}
    dtype = torch.float32
    for row in rows:
        assert math.isfinite(row["ms"]) and row["ms"] > 0, row
        assert math.isfinite(row["gbps"]) and row["gbps"] > 0, row
        assert 0 < row["frac_copy_bw"] and math.isfinite(row["frac_copy_bw"])
        assert row["speedup_vs_eager"] > 0
        if row["op"] == "linear_jsd":
            n, h, ht, v = distill.CPU_LINEAR[0]
            assert (row["rows"], row["hidden"], row["teacher_hidden"], row["width"]) == (n, h, ht, v)
            flops = distill.linear_jsd_flops(row["mode"], n, h, ht, v)
            assert row["tflops"] == pytest.approx(flops / (row["ms"] * 1e-3) / 1e12)
            assert 0 < row["frac_matmul"] and math.isfinite(row["frac_matmul"])
            assert row["bytes"] == distill.linear_jsd_bytes(row["mode"], n, h, ht, v, dtype)
        else:
            r, v = distill.CPU_ROWS[0]
            assert (row["rows"], row["width"]) == (r, v)
            assert row.get("tflops") is None
            assert row["bytes"] == distill.rows_bytes(row["mode"], r, v, dtype)
            assert row["gbps"] == pytest.approx(row["bytes"] / (row["ms"] * 1e-3) / 1e9)
    table = (tmp_path / "distill.md").read_text()
    assert table.startswith("## distill")
    assert "| op | mode | impl |" in table and "| TFLOP/s |" in table and "| GB/s |" in table
    assert "teacher hidden" in table
    for op in distill.OPS:
        assert f"| {op} | fwd+bwd |" in table


def test_main_picks_ops_modes_and_shapes(tmp_path):
    """--ops, --modes, --rows and --widths reach the suite: odd sizes, one op, one mode."""
    doc = _run(tmp_path, "--ops", "jsd", "linear_jsd", "--modes", "fwd+bwd", "--rows", "17", "--widths", "113",
               "--reps", "2")
    rows = doc["rows"]
    assert {r["op"] for r in rows} == {"jsd", "linear_jsd"} and {r["mode"] for r in rows} == {"fwd+bwd"}
    assert {(r["rows"], r["width"]) for r in rows} == {(17, 113)}
    assert {r["hidden"] for r in rows if r["op"] == "linear_jsd"} == {distill.CPU_LINEAR[0][1]}
    assert all(r["ms"] > 0 and math.isfinite(r["ms"]) for r in rows)


def test_main_notes_the_missing_bwd_mode(tmp_path):
    doc = _run(tmp_path, "--quick", "--ops", "kl_div", "--modes", "bwd")
    assert doc["rows"] == []
    assert any('no "bwd" mode' in n for n in doc["notes"]), doc["notes"]


@pytest.mark.parametrize("op", distill.OPS)
def test_triton_impl_matches_eager(op, device):
    """What the suite times as fastlm-triton (on CPU under the Triton interpreter; tiny) runs
    with the suite's arguments and agrees with the torch form, loss and gradients."""
    rows, vocab = 5, 37
    label = torch.tensor([1, distill.IGNORE_INDEX, 3, 4, 5], device=device)
    if op == "linear_jsd":
        x = torch.randn(rows, 16, device=device, requires_grad=True)
        w = torch.randn(vocab, 16, device=device, requires_grad=True)
        xt, wt = torch.randn(rows, 24, device=device), torch.randn(vocab, 24, device=device)
        args, params = (x, w, xt, wt, label), [x, w]
    else:
        s = torch.log_softmax(2 * torch.randn(rows, vocab, device=device), -1).requires_grad_()
        t = torch.log_softmax(2 * torch.randn(rows, vocab, device=device), -1)
        args, params = ((s, t.exp()) if op == "kl_div" else (s, t, label)), [s]
    check = distill._check(torch.float32)
    for mode in distill.MODES:
        ours = distill._call(mode, lambda: distill._forward(op, "fastlm-triton", {})(*args), params)()
        theirs = distill._call(mode, lambda: distill._forward(op, runner.EAGER, {})(*args), params)()
        assert check("fastlm-triton", ours, theirs) is None, (op, mode)
