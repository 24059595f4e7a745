"""Keeps the distillation benchmark suite ("distill": kl_div, jsd, linear_jsd) working: tiny CPU
cases under pytest-benchmark (run with --benchmark-enable to see figures). The suite's end-to-end
run, its counts and its torch forms are tested in tests/test_bench_distill.py.

Real figures come from ``python -m fastlm.bench distill`` on a GPU.
"""

import pytest
import torch

from fastlm.bench import distill, runner


@pytest.fixture
def bench(request):
    if not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.skip("pytest-benchmark is not installed or is disabled (-p no:benchmark)")
    return request.getfixturevalue("benchmark")


def _args(op: str):
    torch.manual_seed(0)
    if op == "linear_jsd":
        x, w = torch.randn(16, 8).requires_grad_(), torch.randn(40, 8).requires_grad_()
        label = torch.randint(0, 40, (16,))
        label[::4] = distill.IGNORE_INDEX
        return (x, w, torch.randn(16, 12), torch.randn(40, 12), label), [x, w]
    s = torch.log_softmax(torch.randn(16, 50), -1).requires_grad_()
    t = torch.log_softmax(torch.randn(16, 50), -1)
    if op == "kl_div":
        return (s, t.exp()), [s]
    label = torch.randint(0, 50, (16,))
    label[::4] = distill.IGNORE_INDEX
    return (s, t, label), [s]


@pytest.mark.parametrize("mode", distill.MODES)
@pytest.mark.parametrize("impl", ["fastlm-torch", runner.EAGER])
@pytest.mark.parametrize("op", distill.OPS)
def test_distill_case(bench, op, impl, mode):
    args, params = _args(op)
    forward = distill._forward(op, impl, {})
    out = bench(distill._call(mode, lambda: forward(*args), params))
    assert all(torch.isfinite(o).all() for o in out)
    if mode == "fwd":
        assert out[0].dim() == 0
    else:
        assert [o.shape for o in out] == [p.shape for p in params]
