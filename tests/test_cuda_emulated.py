"""The CUDA C++ kernels run on the CPU under an emulator (tests/cuda_emulator), through the
whole op path, on CPU tensors: csrc/attention.cu through fastlm.flash_attn_func and SDPA with
the "cuda" backend (custom ops, autograd, the _cuda_* helpers of fastlm/ops/attention.py),
judged against the float64 oracle with tests/test_attention.py's rule; csrc/cross_entropy.cu
through fastlm.cross_entropy (tests/test_cross_entropy.py's rule); csrc/norm.cu through
fastlm's layer norm and RMSNorm with and without the fused residual, forward and backward
(tests/test_norm.py's rule), including rows with -inf and NaN (torch's NaN pattern).

Every launch runs under the emulator's shared-memory hazard checker (a read and a write, or
two writes, of one location by two threads with no barrier between them fail the launch;
tests/test_cuda_emulator_hazards.py shows it at work). This checks the kernels' logic (tiles,
edges, masks, barriers, shared-memory layout and ordering, the documented wmma rules); the
hardware itself is the GPU runbook's part (test_cuda_backend.py). Each CUDA thread is an OS
thread here, so the shapes are small and sit on the kernels' edges: attention's tiles are 64
rows (63, 64, 65, 127, 129), cross_entropy.cu's block strides over 512 classes and
norm.cu's over 256 columns. Without a compiler that can build the emulator these tests fail
with the reason (FASTLM_ALLOW_NO_EMULATOR=1: they skip with it). FASTLM_EMULATOR_ASAN=1
builds with AddressSanitizer instead of the checker; python must then start with it loaded:
LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
ASAN_OPTIONS=detect_leaks=0 (libstdc++ too, or AddressSanitizer cannot intercept C++
exceptions thrown in the library).
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import backend as backend_mod
from fastlm.ops import _cuda

from . import test_attention as attn_tests
from .cuda_emulator import emulate



@pytest.fixture(autouse=True)
def _emulator_available():
    """No silent skip: without a compiler that can build the emulator these tests fail with
    the reason, or skip with it under FASTLM_ALLOW_NO_EMULATOR=1."""
    emulate.require_compiler()


def _sanitize() -> bool:
    """FASTLM_EMULATOR_ASAN=1: AddressSanitizer instead of the hazard checker (see above)."""
    return os.environ.get("FASTLM_EMULATOR_ASAN", "0") == "1"


_ATTENTION_ENTRY_POINTS = ("attention_fwd", "attention_bwd", "attention_smem_bytes", "attention_tile_cols")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return _emulated_source(tmp_path_factory, "attention.cu", _ATTENTION_ENTRY_POINTS)


def _route_cuda_to(lib, monkeypatch):
    """Make the "cuda" backend run CPU tensors through the emulated library ``lib``."""
    real = backend_mod.unavailable_reason
    monkeypatch.setattr(backend_mod, "unavailable_reason",
                        lambda name, device_type: None if name == "cuda" else real(name, device_type))
    monkeypatch.setattr(_cuda, "load", lambda: lib)
    monkeypatch.setattr(_cuda, "stream", lambda t: 0)
    return lib


class _Counting:
    """The emulated library, counting the calls of each entry point (so a test knows the
    kernels ran, not a fallback)."""

    def __init__(self, lib):
        self._lib, self.calls = lib, collections.Counter()

    def __getattr__(self, name):
        fn = getattr(self._lib, name)

        def call(*args):
            self.calls[name] += 1
            return fn(*args)
        return call


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


_SM86_OPTIN = 99 * 1024  # sm_86 / sm_89 / sm_120: the opt-in that takes the 32-row walked tiles


def test_tile_plan_matches_the_python_mirror(emulated):
    """attention_smem_bytes / attention_tile_cols (int64 entry points) against
    fastlm/ops/attention.py's mirror, which the op checks devices with."""
    from fastlm.ops import attention as attn_ops
    for code, kernel in enumerate(attn_ops.CUDA_ATTENTION_KERNELS):
        for d in (32, 64, 96, 128):
            for nc in (64, 32):
                mirror = attn_ops.cuda_attention_smem_bytes(kernel, d, nc)
                assert emulated.attention_smem_bytes(code, d, nc) == (-1 if mirror is None else mirror), (kernel, d, nc)
            for limit in (48 * 1024, _SM86_OPTIN, 166912, 232448):
                assert emulated.attention_tile_cols(code, d, limit) == attn_ops.cuda_attention_tile_cols(kernel, d, limit)


@pytest.fixture
def small_device(emulated):
    """The emulated device with sm_86's 99 KiB opt-in (cudaDeviceGetAttribute reports it)."""
    emulated.set_smem_optin(_SM86_OPTIN)
    yield emulated
    emulated.set_smem_optin(166912)


@pytest.mark.parametrize("D,dtype,options", [(128, torch.float16, {"window_size": (40, 7)}),
                                             (96, torch.bfloat16, {"causal": True})],
                         ids=["d128-float16-window", "d96-bfloat16-causal"])
def test_attention_on_32_row_tiles(small_device, cuda_on_cpu, D, dtype, options):
    """Under a 99 KiB opt-in the launchers take 32-row walked tiles for head dims 96 and 128
    (the plan reads the emulated device's attribute): forward and backward, checker on."""
    assert 32 in [small_device.attention_tile_cols(k, D, _SM86_OPTIN) for k in range(3)]
    inputs = attn_tests.qkv(1, 70, 97, 2, 1, D, dtype=dtype)
    attn_tests.check("cuda", _flash(**options), attn_tests._oracle_flash(options), inputs)


def test_attention_refuses_a_device_too_small(emulated, cuda_on_cpu):
    """Below every tile plan the launcher refuses with the device's figure (read from
    cudaDeviceGetAttribute) instead of launching."""
    q, k, v = attn_tests.qkv(1, 16, 16, 1, 1, 128, dtype=torch.float16)
    emulated.set_smem_optin(48 * 1024)
    try:
        with fastlm.use_backend("cuda"), pytest.raises(RuntimeError, match="this device allows 49152"):
            fastlm.flash_attn_func(q, k, v)
    finally:
        emulated.set_smem_optin(166912)


def test_the_environment_lowers_the_launchers_limit(emulated, cuda_on_cpu, monkeypatch):
    """FASTLM_CUDA_SMEM_LIMIT (how the GPU check runs the 99 KiB plan on an H200) is read by the
    C++ launcher itself at each launch."""
    q, k, v = attn_tests.qkv(1, 16, 16, 1, 1, 128, dtype=torch.float16)
    monkeypatch.setenv("FASTLM_CUDA_SMEM_LIMIT", str(48 * 1024))
    with fastlm.use_backend("cuda"), pytest.raises(RuntimeError, match="this device allows 49152"):
        fastlm.flash_attn_func(q, k, v)
    monkeypatch.setenv("FASTLM_CUDA_SMEM_LIMIT", "6e4")  # not digits: refused by name, as in Python
    with pytest.raises(RuntimeError, match="FASTLM_CUDA_SMEM_LIMIT must be a number of bytes"):
        emulated.attention_fwd(1, q.data_ptr(), k.data_ptr(), v.data_ptr(), q.data_ptr(), q.data_ptr(),
                               1, 16, 16, 1, 1, 128, 0, 128, 128, 0, 128, 128, 0, 128, 128, 0.1, True, -1, 0, 0)
    monkeypatch.setenv("FASTLM_CUDA_SMEM_LIMIT", str(_SM86_OPTIN))  # 32-row tiles at D = 128
    attn_tests.check("cuda", _flash(causal=True), attn_tests._oracle_flash({"causal": True}), [q, k, v])


def _layouts():
    """(name, q) layouts of a (B, L, H, 64) float16 tensor: strides of size-1 dims that are not
    multiples of 8 elements (never used: both sides must accept them), and the ones that break
    the kernels' 16-byte loads (both sides must refuse them: Python by copying)."""
    def strided(shape, stride, offset=0):
        base = torch.randn(4096 * 4).half()
        return base.as_strided(shape, stride, offset)
    return [
        ("contiguous", strided((2, 9, 2, 64), (9 * 128, 128, 64, 1))),
        ("B=1, batch stride 7", strided((1, 9, 2, 64), (7, 128, 64, 1))),
        ("H=1, head stride 3", strided((2, 9, 1, 64), (9 * 64, 64, 3, 1))),
        ("L=1, row stride 5", strided((2, 1, 2, 64), (128, 5, 64, 1))),
        ("B=2, batch stride 1160", strided((2, 9, 2, 64), (1160, 128, 64, 1))),
        ("B=2, batch stride 1155", strided((2, 9, 2, 64), (1155, 128, 64, 1))),
        ("row stride 132", strided((1, 9, 2, 64), (0, 132, 64, 1))),
        ("head stride 65", strided((1, 9, 2, 64), (0, 130, 65, 1))),
        ("address off by 2 bytes", strided((1, 9, 2, 64), (0, 128, 64, 1), offset=1)),
    ]


@pytest.mark.parametrize("name,q", _layouts(), ids=[n for n, _ in _layouts()])
def test_the_stride_rule_is_the_same_in_python_and_cpp(emulated, name, q):
    """fastlm/ops/attention.py's _cuda_ready passes a tensor through uncopied exactly when
    csrc/attention.cu's check_operand accepts it (a size-1 dimension's stride is ignored on
    both sides: the kernels never step along it)."""
    from fastlm.ops import attention as attn_ops
    python_accepts = attn_ops._cuda_ready(q) is q
    B, L, H, D = q.shape
    out = torch.empty(B, L, H, D, dtype=q.dtype)
    lse = torch.empty(B, H, L)
    try:
        emulated.attention_fwd(1, q.data_ptr(), q.data_ptr(), q.data_ptr(), out.data_ptr(), lse.data_ptr(),
                               B, L, L, H, H, D, *q.stride()[:3], *q.stride()[:3], *q.stride()[:3],
                               0.125, False, -1, -1, 0)
        cpp_accepts = True
    except RuntimeError as exc:
        assert "16-byte aligned" in str(exc), exc
        cpp_accepts = False
    assert python_accepts == cpp_accepts, (name, python_accepts, cpp_accepts)
    expect = name.startswith(("contiguous", "B=1", "H=1", "L=1", "B=2, batch stride 1160"))
    assert cpp_accepts == expect, name
    if cpp_accepts:  # and what it computed is attention over q, q, q
        ref = F.scaled_dot_product_attention(*(q.double().transpose(1, 2),) * 3, scale=0.125).transpose(1, 2)
        torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- cross-entropy (csrc/cross_entropy.cu)

def _emulated_source(tmp_path_factory, source: str, entry_points: tuple) -> emulate.Emulated:
    """csrc/<source>'s entry points built for the emulator, the hazard checker on (unless the
    AddressSanitizer mode is asked for)."""
    emulate.require_compiler()  # (fixtures of wider scope run before the autouse one)
    lib = emulate.load(emulate.build(tmp_path_factory.mktemp("cuda_emulator_" + source.split(".")[0]), source,
                                     entry_points, sanitize=_sanitize()))
    assert lib.hazards == (not _sanitize())  # the checker watches every launch
    return lib


@pytest.fixture(scope="module")
def emulated_ce(tmp_path_factory):
    return _emulated_source(tmp_path_factory, "cross_entropy.cu", ("cross_entropy_fwd", "cross_entropy_bwd"))


@pytest.fixture
def ce_cuda_on_cpu(emulated_ce, monkeypatch):
    """The "cuda" backend on the emulated cross-entropy kernels; each test must run them."""
    lib = _route_cuda_to(_Counting(emulated_ce), monkeypatch)
    yield lib
    assert lib.calls["cross_entropy_fwd"] > 0 and lib.calls["cross_entropy_bwd"] > 0, lib.calls


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


@pytest.mark.parametrize("classes", [1, _CE_THREADS - 1, _CE_THREADS, _CE_THREADS + 1])
def test_cross_entropy_block_edges(ce_cuda_on_cpu, classes):
    """Class counts at the block's stride (threads with one element, none, or a second)."""
    from . import test_cross_entropy as ce_tests
    t = ce_tests.targets(5, classes)
    ce_tests.check("cuda", ce_tests.logits(5, classes), t, reduction="none")
    ce_tests.check("cuda", ce_tests.logits(5, classes).to(torch.bfloat16), t, label_smoothing=0.1, softcap=4.0)


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


# ----------------------------------------------------------------------------- norms (csrc/norm.cu)

@pytest.fixture(scope="module")
def emulated_norm(tmp_path_factory):
    return _emulated_source(tmp_path_factory, "norm.cu", ("norm_fwd", "norm_bwd"))


@pytest.fixture
def norm_cuda_on_cpu(emulated_norm, monkeypatch):
    """The "cuda" backend on the emulated norm kernels; each test must run both."""
    lib = _route_cuda_to(_Counting(emulated_norm), monkeypatch)
    yield lib
    assert lib.calls["norm_fwd"] > 0 and lib.calls["norm_bwd"] > 0, lib.calls


_NORM_THREADS = 256  # kThreads of csrc/norm.cu: thread i takes columns i, i + 256, ... (one element at a time)
_NORM_WIDTHS = [1, 2, 113, _NORM_THREADS - 1, _NORM_THREADS, _NORM_THREADS + 1, 2 * _NORM_THREADS + 1]


def _norm_params(kind, n, dtype=torch.float32):
    from . import test_norm as norm_tests
    w = norm_tests.make(n, dtype)
    b = norm_tests.make(n, dtype) if kind == "layer" else None
    return w, b


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("n", _NORM_WIDTHS)
def test_norm_widths(norm_cuda_on_cpu, kind, n):
    """Forward and backward (input, weight and bias gradients) at the block stride's edges;
    6 rows over the backward's 4 programs, so partial weight sums cover several rows."""
    from . import test_norm as norm_tests
    x = norm_tests.make((6, n), torch.float32, shift=0.5)
    if n <= 2:  # (as tests/test_norm.py: keep x^2 away from eps)
        x = x.sign() * (x.abs() + 0.1)
    w, b = _norm_params(kind, n)
    norm_tests.check(kind, "cuda", x, weight=w, bias=b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind,affine", [("layer", "none"), ("layer", "both"), ("layer", "bias"), ("rms", "none"),
                                         ("rms", "weight")])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_norm_options(norm_cuda_on_cpu, kind, affine, residual, dtype):
    """Every dtype, with and without the fused residual (its stream returned and given a
    gradient of its own), weights in the input's dtype, one past the block stride."""
    from . import test_norm as norm_tests
    n = _NORM_THREADS + 1
    x = norm_tests.make((5, n), dtype, scale=2.0, shift=1.0)
    r = norm_tests.make((5, n), dtype) if residual else None
    w = norm_tests.make(n, dtype) if affine in ("weight", "both") else None
    b = norm_tests.make(n, dtype) if affine in ("bias", "both") else None
    ds = norm_tests.make((5, n), dtype) if residual else None
    norm_tests.check(kind, "cuda", x, residual=r, weight=w, bias=b, return_residual=residual, ds=ds)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_norm_strided_rows(norm_cuda_on_cpu, kind, dtype):
    """Rows of a wider tensor (row strides 300 and 520 for 257 columns, unit column stride:
    passed as views, not copied) for x, the residual, dy and the stream's gradient."""
    from . import test_norm as norm_tests
    n = _NORM_THREADS + 1
    x = norm_tests.make((7, 300), dtype)[:, 3:3 + n]
    r = norm_tests.make((7, 520), dtype)[:, 100:100 + n]
    dy = norm_tests.make((7, 300), dtype)[:, 40:40 + n]
    ds = norm_tests.make((7, 260), dtype)[:, 1:1 + n]
    assert x.stride() == (300, 1) and not x.is_contiguous()
    w, b = _norm_params(kind, n, dtype)
    norm_tests.check(kind, "cuda", x.detach(), residual=r.detach(), weight=w, bias=b, dy=dy, return_residual=True,
                     ds=ds)
    norm_tests.check(kind, "cuda", x.detach(), weight=w, bias=b, dy=dy)


def _norm_rows_nonfinite(n, dtype):
    """Rows with -inf and NaN where each pass of the kernel meets them: thread 0's first
    element, the last column (a later stride), one NaN, a +inf, a whole row of -inf; the
    first and last rows stay finite."""
    from . import test_norm as norm_tests
    x = norm_tests.make((7, n), dtype)
    x[1, 0] = float("-inf")
    x[2, n - 1] = float("-inf")
    x[3, n // 2] = float("nan")
    x[4, 1] = float("inf")
    x[5] = float("-inf")
    return x


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_norm_nonfinite_rows(norm_cuda_on_cpu, kind, residual, dtype):
    """torch's inf/NaN pattern in the output and every gradient (NaN exactly where torch's
    float64 F.layer_norm / F.rms_norm and their autograd give NaN, infinities alike), and the
    finite rows judged by the usual rule."""
    from . import test_cross_entropy as ce_tests
    from . import test_norm as norm_tests
    n = _NORM_THREADS + 1
    x = _norm_rows_nonfinite(n, dtype)
    r = norm_tests.make((7, n), dtype) if residual else None
    w, b = _norm_params(kind, n, dtype)
    dy = norm_tests.make((7, n), dtype)
    eps = 1e-5 if kind == "layer" else None
    y, grads = norm_tests.check(kind, "cuda", x, residual=r, weight=w, bias=b, eps=eps, dy=dy)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, r, w, b) if t is not None]
    x64, r64 = leaves[0], (leaves[1] if residual else None)
    w64, b64 = leaves[2 if residual else 1], (leaves[-1] if b is not None else None)
    eps64 = eps if eps is not None else torch.finfo(torch.float32).eps  # (fastlm's default, as torch's kernels)
    y64, _ = norm_tests.oracle(kind, x64, r64, (n,), w64, b64, eps64)
    g64 = torch.autograd.grad((y64 * dy.double()).sum(), leaves)
    assert torch.isnan(y64[3]).all() and torch.isfinite(y64[0]).all()  # the rows are as meant
    ce_tests.assert_same_nonfinite(y, y64, "output")
    names = [name for name, t in (("input", x), ("residual", r), ("weight", w), ("bias", b)) if t is not None]
    for name, g, g_ref in zip(names, grads, g64, strict=True):
        ce_tests.assert_same_nonfinite(g, g_ref, f"grad of {name}")
