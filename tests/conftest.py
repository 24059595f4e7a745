"""Test set-up: on a machine without CUDA the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before triton is imported; torch does not import triton on
its own, so deciding after ``import torch`` is safe (and asserted).
"""

import os
import sys
import zlib

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every kernel output starts as NaN, so an element a kernel fails to write fails the test.
os.environ["FASTLM_POISON"] = "1"

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: runs in the GPU runbook (benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    """A different, reproducible seed per test (FASTLM_TEST_SEED shifts them all)."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("FASTLM_TEST_SEED", "0"))) % 2**31
    torch.manual_seed(seed)
    yield
