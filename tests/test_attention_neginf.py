"""Additive float masks holding -inf, through fastlm.scaled_dot_product_attention on both
backends, against torch's SDPA math in float64, forward and the gradients of q, k and v.

The online softmax keeps a running max that starts at -inf; a key block whose every score is
-inf must leave it a clean 0 contribution, never exp(-inf - -inf) = NaN (the bug class of
issue 16 item 1, found in the cross-entropy kernels). Under the interpreter the kernels use
16 x 16 tiles, so with S = 53 keys the masks below make whole key blocks -inf: the first
block, a middle block, the last (partial) block; and sparsely every third key, and all keys
but one per query (a different one for each query). No query here loses every key: there
torch gives NaN and fastlm 0, on purpose (tests/test_attention.py covers that).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastlm

from . import test_attention as attn_tests
from .conftest import DEVICE

BACKENDS = ["torch", "triton"]
BLOCK = 16  # the interpreter's key block
B, H, L, S, E = 2, 2, 37, 3 * BLOCK + 5, 16


def _neg_mask(pattern, shape):
    """A float mask of ``shape`` (..., L, S): random finite biases, -inf where ``pattern`` says."""
    mask = torch.randn(shape, device=DEVICE)
    keys = torch.arange(S, device=DEVICE)
    if pattern == "first-block":
        hidden = keys < BLOCK
    elif pattern == "middle-block":
        hidden = (keys >= BLOCK) & (keys < 2 * BLOCK)
    elif pattern == "last-blocks":
        hidden = keys >= 2 * BLOCK
    elif pattern == "every-third":
        hidden = keys % 3 == 0
    elif pattern == "all-but-one":
        rows = shape[:-1]
        keep = torch.randint(0, S, rows, device=DEVICE)
        return mask.masked_fill(keys != keep[..., None], float("-inf"))
    else:
        raise ValueError(pattern)
    return mask.masked_fill(hidden.expand(shape), float("-inf"))


def _mixed_mask(shape):
    """Every pattern at once, a different one per query row (and per batch and head)."""
    patterns = ["first-block", "middle-block", "last-blocks", "every-third", "all-but-one"]
    masks = torch.stack([_neg_mask(p, shape) for p in patterns])
    which = torch.randint(0, len(patterns), shape[:-1], device=DEVICE)
    return torch.gather(masks, 0, which[None, ..., None].expand((1,) + shape))[0]


def _oracle(mask):
    def oracle(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    return oracle


def _ours(mask):
    return lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["first-block", "middle-block", "last-blocks", "every-third", "all-but-one"])
@pytest.mark.parametrize("mask_shape", ["2d", "4d"])
def test_neg_inf_mask_patterns(backend, pattern, mask_shape):
    shape = (L, S) if mask_shape == "2d" else (B, H, L, S)
    mask = _neg_mask(pattern, shape)
    inputs = attn_tests._sdpa_inputs(B, H, H, L, S, E)
    out = attn_tests.check(backend, _ours(mask), _oracle(mask), inputs)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_neg_inf_mask_mixed_rows(backend, dtype):
    """A different pattern per query, batch and head, with grouped heads too."""
    mask = _mixed_mask((B, 4, L, S))
    inputs = attn_tests._sdpa_inputs(B, 4, 2, L, S, E, dtype=dtype)
    ours = lambda q, k, v: fastlm.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731

    def oracle(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), enable_gqa=True)

    out = attn_tests.check(backend, ours, oracle, inputs)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_mask_with_large_scores(backend):
    """Scores in the tens after a fully -inf first block: the running max jumps from -inf
    straight to a large value, the rescaling factor of the empty past must be 0."""
    mask = _neg_mask("first-block", (L, S))
    q, k, v = attn_tests._sdpa_inputs(1, 2, 2, L, S, E)
    inputs = [q * 4, k * 4, v]
    # p = exp(s - lse) carries a relative rounding of about eps * |s|, |s| here in the tens:
    # the gradients' floor scales with it (seed 1 missed the 2 x eager rule by 2%).
    scores = (inputs[0].double() @ inputs[1].double().transpose(-1, -2)) * E ** -0.5 + mask.double()
    s_max = scores[torch.isfinite(scores)].abs().max().item()
    attn_tests.check(backend, _ours(mask), _oracle(mask), inputs,
                     grad_rel_floor=4 * torch.finfo(torch.float32).eps * s_max)
