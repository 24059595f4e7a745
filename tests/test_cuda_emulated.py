"""The CUDA C++ attention kernels (csrc/attention.cu) run on the CPU under an emulator
(tests/cuda_emulator), through the whole op path: fastlm.flash_attn_func and SDPA with the
"cuda" backend, the custom ops, autograd and the _cuda_* helpers of fastlm/ops/attention.py,
on CPU tensors, judged against the float64 oracle with tests/test_attention.py's rule.
csrc/cross_entropy.cu runs the same way through fastlm.cross_entropy (the last section),
judged by tests/test_cross_entropy.py's rule.

This checks the kernels' logic (tiles, edges, masks, barriers, shared-memory layout and the
documented wmma rules); the hardware itself is the GPU runbook's part (test_cuda_backend.py).
Each CUDA thread is an OS thread here, so the shapes are small; the tiles are 64 rows, so
63, 64, 65, 127, 129 are their edges. FASTLM_EMULATOR_ASAN=1 builds with AddressSanitizer;
python must then start with it loaded: LD_PRELOAD="$(g++ -print-file-name=libasan.so)
$(g++ -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 (libstdc++ too, or
AddressSanitizer cannot intercept C++ exceptions thrown in the library).
"""

from __future__ import annotations

import os

import pytest
import torch

import fastlm
from fastlm import backend as backend_mod
from fastlm.ops import _cuda

from . import test_attention as attn_tests
from .cuda_emulator import emulate

_why_not = emulate.compiler_error()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=f"the CUDA emulator cannot be built: {_why_not}")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    sanitize = os.environ.get("FASTLM_EMULATOR_ASAN", "0") == "1"
    return emulate.load(emulate.build(tmp_path_factory.mktemp("cuda_emulator"), sanitize=sanitize))


def _route_cuda_to(lib, monkeypatch):
    """Make the "cuda" backend run CPU tensors through the emulated library ``lib``."""
    real = backend_mod.unavailable_reason
    monkeypatch.setattr(backend_mod, "unavailable_reason",
                        lambda name, device_type: None if name == "cuda" else real(name, device_type))
    monkeypatch.setattr(_cuda, "load", lambda: lib)
    monkeypatch.setattr(_cuda, "stream", lambda t: 0)
    return lib


@pytest.fixture
def cuda_on_cpu(emulated, monkeypatch):
    """The "cuda" backend on the emulated attention kernels."""
    return _route_cuda_to(emulated, monkeypatch)


def _flash(**options):
    return lambda q, k, v: fastlm.flash_attn_func(q, k, v, **options)


CASES = [
    # (B, L, S, H, Hk, D, dtype, options)
    (1, 65, 65, 2, 2, 64, torch.float16, {"causal": True}),
    (1, 63, 129, 2, 1, 128, torch.float16, {"causal": True}),
    (1, 129, 63, 2, 2, 64, torch.float16, {"causal": True}),  # bottom-right: 66 queries see nothing
    (1, 64, 127, 4, 2, 64, torch.bfloat16, {}),
    (1, 1, 65, 3, 1, 64, torch.float16, {"causal": True}),
    (1, 65, 1, 1, 1, 64, torch.float16, {}),
    (1, 130, 130, 1, 1, 64, torch.float16, {"window_size": (5, 3)}),
    (1, 100, 77, 2, 1, 128, torch.bfloat16, {"causal": True, "softmax_scale": 0.37}),
    (1, 70, 65, 2, 1, 32, torch.float16, {"causal": True}),
    (1, 65, 70, 1, 1, 96, torch.bfloat16, {"causal": True}),
]


@pytest.mark.parametrize("B,L,S,H,Hk,D,dtype,options", CASES,
                         ids=[f"{c[1]}x{c[2]}-h{c[3]}/{c[4]}-d{c[5]}-{str(c[6])[6:]}-{attn_tests._ids(c[7])}"
                              for c in CASES])
def test_flash_attn_func(cuda_on_cpu, B, L, S, H, Hk, D, dtype, options):
    inputs = attn_tests.qkv(B, L, S, H, Hk, D, dtype=dtype)
    attn_tests.check("cuda", _flash(**options), attn_tests._oracle_flash(options), inputs)


def test_sdpa_causal_top_left(cuda_on_cpu):
    inputs = attn_tests.qkv(1, 129, 65, 2, 2, 64, dtype=torch.float16)

    def ours(q, k, v):
        out = fastlm.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        return out.transpose(1, 2)

    attn_tests.check("cuda", ours, lambda q, k, v: attn_tests.naive(q, k, v, bottom_right=False, causal=True), inputs)


def test_views_of_packed_qkv_and_copied_layouts(cuda_on_cpu):
    packed = torch.randn(2, 65, 3, 2, 64).to(torch.float16)
    views = [packed[:, :, i] for i in range(3)]
    attn_tests.check("cuda", _flash(causal=True), attn_tests._oracle_flash({"causal": True}), views)
    q = torch.randn(1, 65, 2, 65).to(torch.float16)[..., 1:]  # row stride of 65 elements: copied
    k = torch.randn(1, 64, 2, 65).to(torch.float16).permute(0, 3, 2, 1)  # D not unit-stride: copied
    v = torch.randn(1, 65, 2, 64).to(torch.float16)
    attn_tests.check("cuda", _flash(), attn_tests._oracle_flash({}), [q, k, v])


def test_lse_and_rows_that_see_nothing(cuda_on_cpu):
    q, k, v = attn_tests.qkv(1, 100, 30, 1, 1, 64, dtype=torch.float16)
    with fastlm.use_backend("cuda"):
        out, lse = fastlm.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert torch.isinf(lse[..., :70]).all() and (lse[..., :70] > 0).all()
    assert torch.isfinite(lse[..., 70:]).all()
    assert torch.equal(out[:, :70], torch.zeros_like(out[:, :70]))


def test_unsupported_cases_raise_before_reaching_the_kernels(cuda_on_cpu):
    q, k, v = attn_tests.qkv(1, 16, 16, 2, 2, 64, dtype=torch.float16)
    with fastlm.use_backend("cuda"), pytest.raises(fastlm.BackendUnavailableError, match="dropout"):
        fastlm.flash_attn_func(q, k, v, dropout_p=0.5)
    with pytest.raises(RuntimeError, match="head dim 80"):  # the kernels' own check, below the op's
        cuda_on_cpu.attention_fwd(1, q.data_ptr(), k.data_ptr(), v.data_ptr(), q.data_ptr(), q.data_ptr(),
                                  1, 16, 16, 2, 2, 80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.1, True, -1, 0, 0)


# ----------------------------------------------------------------------------- cross-entropy (csrc/cross_entropy.cu)

@pytest.fixture(scope="module")
def emulated_ce(tmp_path_factory):
    sanitize = os.environ.get("FASTLM_EMULATOR_ASAN", "0") == "1"
    lib = emulate.build(tmp_path_factory.mktemp("cuda_emulator_ce"), "cross_entropy.cu",
                        ("cross_entropy_fwd", "cross_entropy_bwd"), sanitize=sanitize)
    return emulate.load(lib)


@pytest.fixture
def ce_cuda_on_cpu(emulated_ce, monkeypatch):
    """The "cuda" backend on the emulated cross-entropy kernels."""
    return _route_cuda_to(emulated_ce, monkeypatch)


_CE_THREADS = 512  # kThreads of csrc/cross_entropy.cu: thread i reads classes i, i + 512, ...
_CE_CLASSES = 2 * _CE_THREADS + 77  # two full strides and a partial one


def _ce_rows_neg_inf():
    """Rows -inf in every pattern the per-thread online softmax meets: each thread's first
    element (the first stride), only class 0, a middle stride, every third class, all but
    the target, and the target itself (torch: inf)."""
    from . import test_cross_entropy as ce_tests
    c, n = _CE_CLASSES, 7
    x = ce_tests.logits(n, c)
    t = torch.randint(_CE_THREADS, 2 * _CE_THREADS, (n,))
    x[0, :_CE_THREADS] = float("-inf")
    x[1, 0] = float("-inf")
    x[2, _CE_THREADS:2 * _CE_THREADS] = float("-inf")
    t[2] = 3
    x[3, ::3] = float("-inf")
    t[3] = 3 * 200 + 1
    x[4] = float("-inf")
    x[4, t[4]] = 1.5
    x[5, :_CE_THREADS] = float("-inf")
    t[5] = 100  # the target is -inf
    return x, t


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 5.0, "ignore_index": 7}],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_cross_entropy_matches_torch(ce_cuda_on_cpu, options):
    from . import test_cross_entropy as ce_tests
    n, c = 9, _CE_CLASSES
    t = ce_tests.targets(n, c, ignore_index=options.get("ignore_index", -100))
    ce_tests.check("cuda", ce_tests.logits(n, c), t, reduction="none", **options)
    ce_tests.check("cuda", ce_tests.logits(n, c).half(), t, **options)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-2}, {"softcap": 3.0}],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_cross_entropy_neg_inf_logits(ce_cuda_on_cpu, options):
    """A thread whose first strided element is -inf kept m = -inf and then added
    exp(-inf - -inf) = NaN (x[:, 0] = -inf was enough): now torch's result, or torch's own
    inf/NaN pattern where it has one (label smoothing over -inf logits)."""
    from . import test_cross_entropy as ce_tests
    x, t = _ce_rows_neg_inf()
    ce_tests.check("cuda", x, t, reduction="none", **options)
    if not options:
        ce_tests.check("cuda", x, t, reduction="mean")


def test_cross_entropy_issue_example(ce_cuda_on_cpu):
    """The issue's example for the CUDA kernel: x[:, 0] = -inf."""
    from . import test_cross_entropy as ce_tests
    x = torch.randn(4, 700)
    x[:, 0] = float("-inf")
    loss, grad = ce_tests.check("cuda", x, torch.tensor([1, 5, 513, 699]), reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_cross_entropy_nan_logit_reaches_the_row(ce_cuda_on_cpu):
    """A NaN logit makes torch's loss NaN. A thread that held only -inf and NaN kept m = -inf
    and its NaN sum was dropped as if the thread had seen nothing: with one element per
    thread (C <= the block) any non-target NaN vanished."""
    from . import test_cross_entropy as ce_tests
    x = torch.randn(4, 300)
    x[:, 7] = float("nan")  # one element per thread: that thread's max stays -inf
    x[1, 7 + _CE_THREADS if 7 + _CE_THREADS < 300 else 8] = float("-inf")
    x[2, :] = float("-inf")
    x[2, [3, 7]] = torch.tensor([1.0, float("nan")])
    ce_tests.check("cuda", x, torch.tensor([1, 2, 3, 299]), reduction="none")
