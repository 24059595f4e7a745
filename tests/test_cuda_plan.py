"""Where the CUDA C++ backend can run, decided on CPU (issue 24, items 1 and 2):

* the runtime/driver check of fastlm/ops/_cuda.py: fastlm._C links the CUDA runtime statically,
  and a runtime of a newer major version than the driver's is refused when the module loads,
  with the versions in the reason available_backends() reports;
* the attention kernels' tile plan (csrc/attention.cu; mirrored in fastlm/ops/attention.py)
  for the opt-in shared memory of sm_80, sm_86, sm_89, sm_90 and sm_100, and the refusal of a
  device that cannot run them. The mirror's agreement with the built module's own plan is in
  tests/test_cuda_build.py; the 32-row tiles run under the emulator in test_cuda_emulated.py.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fastlm import backend as backend_mod
from fastlm.errors import ArgumentError
from fastlm.ops import _cuda
from fastlm.ops import attention as attn_ops

# ----------------------------------------------------------------------------- runtime and driver


@pytest.mark.parametrize("runtime,driver,ok", [
    (13000, 13000, True), (13000, 13020, True),   # same major: minor-version compatibility
    (12080, 13000, True),                         # an older runtime on a newer driver
    (13000, 12080, False), (12040, 11080, False),  # a newer major than the driver's
    (13000, 0, False),                            # no driver
    (13000, -1, False),                           # the query failed
])
def test_runtime_against_driver(runtime, driver, ok):
    why = _cuda.runtime_mismatch(runtime, driver)
    assert (why is None) == ok, why
    if not ok and driver > 0:
        assert f"CUDA {runtime // 1000}.{runtime % 1000 // 10} runtime" in why
        assert f"supports CUDA {driver // 1000}.{driver % 1000 // 10}" in why and "FASTLM_NVCC" in why
    if driver == 0:
        assert "no CUDA driver" in why
    if driver < 0:
        assert "could not be queried" in why


@pytest.mark.parametrize("cap,ok", [
    ((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True),  # machine code (same major, minor >=)
    ((10, 0), "jit"), ((12, 0), "jit"),                              # Blackwell: the compute_90 PTX
    ((7, 5), False),                                                 # older than every target
])
@pytest.mark.parametrize("runtime,driver", [(13000, 13000), (13020, 13000), (12090, 13000)])
def test_devices_without_machine_code_need_a_driver_that_can_jit_the_ptx(cap, ok, runtime, driver):
    """sm_80 code runs on sm_86/89 (same major); sm_100/120 JIT-compile the compute_90 PTX, which
    an older driver than the runtime that wrote it cannot (minor-version compatibility does not
    cover the JIT); sm_75 runs neither."""
    why = _cuda.jit_mismatch(cap, [80, 90], 90, runtime, driver)
    if ok is True or (ok == "jit" and driver >= runtime):
        assert why is None, why
    elif ok == "jit":
        assert "JIT-compiled" in why and f"sm_{cap[0]}{cap[1]}" in why and "FASTLM_CUDA_ARCHS" in why
    else:
        assert "none runs on this sm_75 device" in why


@pytest.fixture
def fake_module(monkeypatch):
    """A stand-in fastlm._C whose versions a test sets; the caches that remember the real
    module's verdict are cleared before and after."""
    module = types.ModuleType("fastlm._C")
    module.ABI = _cuda.ABI
    module.versions = (13000, 13000)
    module.cuda_runtime_version = lambda: module.versions[0]
    module.cuda_driver_version = lambda: module.versions[1]
    monkeypatch.setitem(sys.modules, "fastlm._C", module)
    monkeypatch.setattr(backend_mod.importlib.util, "find_spec",
                        lambda name, *a, real=backend_mod.importlib.util.find_spec: (
                            object() if name == "fastlm._C" else real(name, *a)))
    _cuda.load.cache_clear()
    backend_mod._cuda_extension_error.cache_clear()
    yield module
    _cuda.load.cache_clear()
    backend_mod._cuda_extension_error.cache_clear()


def test_an_old_driver_makes_the_backend_unavailable_with_the_versions(fake_module):
    fake_module.versions = (13000, 12080)
    why = backend_mod.unavailable_reason("cuda", "cuda")
    assert why is not None and "does not load" in why and "CUDA 13.0 runtime" in why and "CUDA 12.8" in why
    with pytest.raises(ImportError, match="needs a driver for CUDA 13.x"):
        _cuda.load()


def test_a_matching_driver_loads(fake_module):
    fake_module.versions = (13000, 13010)
    assert _cuda.load() is fake_module
    assert backend_mod.unavailable_reason("cuda", "cuda") is None


def test_a_device_the_module_cannot_run_is_refused_at_load(fake_module, monkeypatch):
    fake_module.versions = (13020, 13000)
    fake_module.SASS_ARCHS, fake_module.PTX_ARCH = [80, 90], 90
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (10, 0))
    with pytest.raises(ImportError, match="no machine code for this sm_100 device"):
        _cuda.load()
    _cuda.load.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert _cuda.load() is fake_module


def test_an_old_module_is_refused_by_its_abi(fake_module):
    fake_module.ABI = _cuda.ABI - 1
    with pytest.raises(ImportError, match="rebuild it"):
        _cuda.load()


# ----------------------------------------------------------------------------- the tile plan

SM = {"sm_80": (8, 0), "sm_86": (8, 6), "sm_89": (8, 9), "sm_90": (9, 0), "sm_100": (10, 0)}
# Opt-in shared memory per block, from NVIDIA's tuning guides: A100 163 KiB, GA10x / AD10x
# 99 KiB, H100 and B200 227 KiB.
LIMITS = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024, "sm_100": 227 * 1024}


def test_the_limits_table_is_the_tuning_guides():
    for name, cap in SM.items():
        assert attn_ops.CUDA_SMEM_OPTIN[cap] == LIMITS[name], name


def test_shared_memory_of_each_kernel_by_hand():
    """Bytes at head dim 128, worked out from the layout in csrc/attention.cu: 16-bit tiles
    with rows of 136 elements (64-row own tile 17408 B, 64-row walked tile 17408 B, 32-row
    8704 B), float score rows of NC + 8, 16-bit probability rows of NC + 8, the forward's
    64 x 136 float accumulator (34816 B), 64 (dq) or NC (dkdv) floats each of lse and delta."""
    smem = attn_ops.cuda_attention_smem_bytes
    assert smem("forward", 128, 64) == 17408 * 3 + 64 * 72 * 4 + 64 * 72 * 2 + 34816 == 114688
    assert smem("dq", 128, 64) == 17408 * 4 + 2 * 64 * 72 * 4 + 64 * 72 * 2 + 512 == 116224
    assert smem("dkdv", 128, 64) == 17408 * 4 + 2 * 64 * 72 * 4 + 2 * 64 * 72 * 2 + 512 == 125440
    assert smem("forward", 128, 32) == 17408 + 2 * 8704 + 64 * 40 * 4 + 64 * 40 * 2 + 34816 == 84992
    assert smem("dq", 128, 32) == 2 * 17408 + 2 * 8704 + 2 * 64 * 40 * 4 + 64 * 40 * 2 + 512 == 78336
    assert smem("dkdv", 128, 32) == 2 * 17408 + 2 * 8704 + 2 * 64 * 40 * 4 + 2 * 64 * 40 * 2 + 256 == 83200
    assert smem("forward", 64, 32) is None and smem("forward", 80, 64) is None  # not built
    with pytest.raises(ValueError, match="kernel"):
        smem("backward", 64, 64)


# The walked-tile rows per (arch, head dim): (forward, dq, dkdv). 99 KiB devices take 32-row
# tiles where 64 rows do not fit: all three at 128, dK/dV at 96 (109056 B > 101376).
EXPECTED = {
    "sm_80": {32: (64, 64, 64), 64: (64, 64, 64), 96: (64, 64, 64), 128: (64, 64, 64)},
    "sm_86": {32: (64, 64, 64), 64: (64, 64, 64), 96: (64, 64, 32), 128: (32, 32, 32)},
    "sm_89": {32: (64, 64, 64), 64: (64, 64, 64), 96: (64, 64, 32), 128: (32, 32, 32)},
    "sm_90": {32: (64, 64, 64), 64: (64, 64, 64), 96: (64, 64, 64), 128: (64, 64, 64)},
    "sm_100": {32: (64, 64, 64), 64: (64, 64, 64), 96: (64, 64, 64), 128: (64, 64, 64)},
}


@pytest.mark.parametrize("arch", list(SM))
def test_tile_plan_per_architecture(arch):
    for d, want in EXPECTED[arch].items():
        got = tuple(attn_ops.cuda_attention_tile_cols(k, d, LIMITS[arch]) for k in attn_ops.CUDA_ATTENTION_KERNELS)
        assert got == want, (arch, d)
        assert attn_ops.cuda_device_reason(SM[arch], LIMITS[arch], d) is None, (arch, d)


def test_tile_plan_edges():
    """64 rows exactly at the limit, one byte less takes 32; below every variant: 0."""
    need = attn_ops.cuda_attention_smem_bytes("dkdv", 96, 64)
    assert attn_ops.cuda_attention_tile_cols("dkdv", 96, need) == 64
    assert attn_ops.cuda_attention_tile_cols("dkdv", 96, need - 1) == 32
    small = attn_ops.cuda_attention_smem_bytes("dkdv", 96, 32)
    assert attn_ops.cuda_attention_tile_cols("dkdv", 96, small - 1) == 0
    # head dims without 32-row variants: 64 rows or nothing
    need64 = attn_ops.cuda_attention_smem_bytes("forward", 64, 64)
    assert attn_ops.cuda_attention_tile_cols("forward", 64, need64 - 1) == 0


def test_devices_that_cannot_run_the_kernels_are_named():
    why = attn_ops.cuda_device_reason((7, 5), 64 * 1024, 64)
    assert "compute capability 7.5" in why and "sm_80" in why
    why = attn_ops.cuda_device_reason((8, 0), 80 * 1024, 128)  # a hypothetical 80 KiB part
    assert why is not None and "forward kernel at head dim 128 needs 84992 bytes" in why and "81920" in why
    assert attn_ops.cuda_device_reason((8, 0), 80 * 1024, 32) is None


def test_the_op_asks_the_device_only_for_cuda_tensors(monkeypatch):
    """The device test sits in _cuda_unsupported for CUDA tensors (CPU tensors are the
    emulator's, which has its own limit); its verdict reaches the reason with the Triton hint."""
    q = torch.randn(1, 4, 2, 128).half()
    assert attn_ops._cuda_unsupported(q, q, q, None, None, None, 0.0, 0.0) is None
    seen = []

    class FakeCuda:
        is_cuda = True
        dtype, shape = q.dtype, q.shape
        device = torch.device("cuda", 3)

    monkeypatch.setattr(attn_ops, "_cuda_device_unsupported", lambda idx, d: seen.append((idx, d)) or "too small")
    why = attn_ops._cuda_unsupported(FakeCuda(), q, q, None, None, None, 0.0, 0.0)
    assert seen == [(3, 128)] and why.startswith("too small") and "Triton backend" in why


def test_the_limit_can_be_lowered_by_the_environment(monkeypatch):
    """FASTLM_CUDA_SMEM_LIMIT lowers the plan's limit (never raises it), as the C++ launcher
    reads it: the GPU check runs the 99 KiB parts' 32-row tiles on an H200 with it."""
    monkeypatch.delenv("FASTLM_CUDA_SMEM_LIMIT", raising=False)
    assert attn_ops.cuda_smem_limit(232448) == 232448
    monkeypatch.setenv("FASTLM_CUDA_SMEM_LIMIT", "101376")
    assert attn_ops.cuda_smem_limit(232448) == 101376
    assert attn_ops.cuda_smem_limit(50000) == 50000
    monkeypatch.setattr(attn_ops, "_cuda_device_figures", lambda idx: ((9, 0), 232448))
    assert attn_ops._cuda_device_unsupported(0, 128) is None  # 32-row tiles fit 99 KiB
    monkeypatch.setenv("FASTLM_CUDA_SMEM_LIMIT", "70000")
    assert "needs" in attn_ops._cuda_device_unsupported(0, 128)
    monkeypatch.setenv("FASTLM_CUDA_SMEM_LIMIT", "0")  # 0: no lowering (as the C++ launcher reads it)
    assert attn_ops.cuda_smem_limit(232448) == 232448
    for junk in ("junk", "6e4", " 60000", "+60000", "60_000", "\u00b2", "\uff16\uff10", ""):
        monkeypatch.setenv("FASTLM_CUDA_SMEM_LIMIT", junk)
        with pytest.raises(ArgumentError, match="FASTLM_CUDA_SMEM_LIMIT must be a number of bytes"):
            attn_ops.cuda_smem_limit(232448)
