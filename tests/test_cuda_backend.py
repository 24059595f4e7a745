"""The CUDA C++ backend ("cuda") on a GPU: the ops it covers against the float64 oracles of
their own test files, with the checks reused from there. Runs in the GPU runbook after
``python -m fastlm.cuda_build`` (benchmarks/gpu_check.sh builds it); skipped on CPU.
The norms run the whole of tests/test_norm.py with "cuda" as a backend parameter.
"""

from __future__ import annotations

import pytest
import torch

import fastlm

from . import test_cross_entropy as ce_tests
from . import test_linear_cross_entropy as lce_tests  # noqa: F401  (its check is used below)
from .conftest import DEVICE

pytestmark = pytest.mark.gpu

CUDA_OPTIONS = [
    {},
    {"ignore_index": 3},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"reduction": "sum", "label_smoothing": 0.2, "z_loss": 1e-4, "softcap": 30.0},
    {"reduction": "none"},
]


def test_cuda_backend_is_built():
    info = fastlm.available_backends()["cuda"]
    assert info.available, info.reason


@pytest.mark.parametrize("options", CUDA_OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 17, 511, 512, 513, 50257, 128256])
def test_cross_entropy(options, dtype, vocab):
    rows = 64
    x = (torch.randn(rows, vocab, device=DEVICE) * 3).to(dtype)
    t = torch.randint(0, vocab, (rows,), device=DEVICE)
    t[::7] = options.get("ignore_index", -100)
    ce_tests.check("cuda", x, t, **options)


def test_cross_entropy_strided_and_int32_targets():
    x = torch.randn(40, 2 * 1000, device=DEVICE)[:, ::2]
    t = torch.randint(0, 1000, (40,), device=DEVICE, dtype=torch.int32)
    ce_tests.check("cuda", x, t, label_smoothing=0.1)


def test_cross_entropy_weights_and_soft_targets_name_the_triton_backend():
    x = torch.randn(8, 10, device=DEVICE)
    with fastlm.use_backend("cuda"), pytest.raises(fastlm.BackendUnavailableError, match="weights"):
        fastlm.cross_entropy(x, torch.randint(0, 10, (8,), device=DEVICE), weight=torch.rand(10, device=DEVICE))
    with fastlm.use_backend("cuda"), pytest.raises(fastlm.BackendUnavailableError, match="probability"):
        fastlm.cross_entropy(x, torch.softmax(torch.randn(8, 10, device=DEVICE), -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_in_place_gradient(dtype):
    """The fused lm-head writes the loss gradient over its chunk of logits (in place)."""
    tokens, hidden, vocab = 1000, 256, 5000
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=DEVICE) / hidden ** 0.5).to(dtype).requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,), device=DEVICE)
    with fastlm.use_backend("cuda"):
        loss = fastlm.linear_cross_entropy(x, w, t, label_smoothing=0.1, chunk_size=256)
        dx, dw = torch.autograd.grad(loss, [x, w])
    with fastlm.use_backend("torch"):
        ref = fastlm.linear_cross_entropy(x.double(), w.double(), t, label_smoothing=0.1)
        rdx, rdw = torch.autograd.grad(ref, [x, w])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), rdx.double(), rtol=tol, atol=tol * rdx.abs().max().item())
    torch.testing.assert_close(dw.double(), rdw.double(), rtol=tol, atol=tol * rdw.abs().max().item())
