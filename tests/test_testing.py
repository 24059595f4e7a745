"""The tolerance rule itself (fastlm/testing.py), on cases built so the answer is known."""

from __future__ import annotations

import pytest
import torch

from fastlm.testing import cancellation_floor, compare, summation_floor


def _sequential_sum(rows: torch.Tensor) -> torch.Tensor:
    """Row sums in float32, one addition after another (a kernel's order, not torch's)."""
    acc = torch.zeros(rows.shape[0], dtype=torch.float32)
    for j in range(rows.shape[1]):
        acc = acc + rows[:, j]
    return acc


def test_a_sum_that_cancels_is_judged_by_its_terms():
    """Terms x and -x: the exact sum is 0, and so is the eager result that pairs them, so
    neither the reference's magnitude nor a multiple of the eager error leaves any room for
    the honest rounding of another summation order (the flaky BERT key-bias gradient of
    test_integrations_transformers, made deterministic). The cancellation floor does, and
    a wrong sum (a term left out) still fails."""
    x = torch.randn(4, 64) + 0.5
    terms = torch.cat([x, -x], dim=1)
    ref64 = terms.double().sum(1)
    eager = (x + (-x)).sum(1)
    zeros = torch.zeros(4)
    assert torch.equal(ref64, zeros.double()) and torch.equal(eager, zeros)
    order = torch.randperm(terms.shape[1])
    kernel = _sequential_sum(terms[:, order])
    assert kernel.abs().max() > 0  # the other order rounds
    old = compare(kernel, ref64, eager, "sum", atol=summation_floor(ref64, torch.float32, terms.shape[1]))
    assert not old.ok, old.message  # what made the test flaky: the floors scale with a reference of 0
    floor = cancellation_floor(terms.double(), terms, torch.float32, dim=1)
    c = compare(kernel, ref64, eager, "sum", atol=floor)
    assert c.ok, c.message
    assert floor < 1e-3 * x.abs().mean().item()  # still far below the terms
    wrong = _sequential_sum(terms[:, order[1:]])
    assert not compare(wrong, ref64, eager, "sum", atol=floor).ok


def test_cancellation_floor_counts_the_eager_errors_of_the_terms():
    t64 = torch.tensor([[1.0, -1.0], [3.0, -3.0]], dtype=torch.float64)
    eps = torch.finfo(torch.float32).eps
    assert cancellation_floor(t64, None, torch.float32, dim=1) == eps * 6.0
    eager = (t64 + torch.tensor([[1e-6, -2e-6], [0.0, 0.0]], dtype=torch.float64)).float()
    errors = (eager.double() - t64).abs().sum(1)
    assert errors[0] > 2e-6 and errors[1] == 0
    got = cancellation_floor(t64, eager, torch.float32, dim=1)
    assert got == pytest.approx(max(eps * 2 + 2 * errors[0].item(), eps * 6), rel=1e-12)
    assert cancellation_floor(t64[:, :0], None, torch.float32, dim=1) == 0.0
