"""The bridge to fastlm's CUDA C++ extension (fastlm._C, built from csrc/ by fastlm.cuda_build).

The extension takes raw device pointers, sizes, strides and a stream, so it links no
libtorch and one build serves every torch version. This module turns tensors into those
arguments: ``addr(t)`` (0 for None), ``dtype_code``, ``stream(t)`` (torch's current stream on
t's device, so the kernels order with torch's own work). Argument checks happen before, in
the op files, exactly as for the Triton backend.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

ABI = 3  # must equal fastlm._C.ABI (csrc/bindings.cpp)
_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def load():
    """The extension module; raises ImportError with the reason if it cannot be used."""
    from fastlm import _C  # noqa: PLC0415

    if getattr(_C, "ABI", None) != ABI:
        raise ImportError(f"fastlm._C was built for ABI {getattr(_C, 'ABI', None)}, this fastlm needs {ABI}: "
                          f"rebuild it with python -m fastlm.cuda_build")
    runtime, driver = _C.cuda_runtime_version(), _C.cuda_driver_version()
    why = runtime_mismatch(runtime, driver)
    if why is None and hasattr(_C, "SASS_ARCHS"):
        import torch  # noqa: PLC0415
        if torch.cuda.is_available():
            why = jit_mismatch(torch.cuda.get_device_capability(), list(_C.SASS_ARCHS), _C.PTX_ARCH, runtime, driver)
    if why:
        raise ImportError(why)
    return _C


def jit_mismatch(capability: tuple[int, int], sass_archs: list[int], ptx_arch: int, runtime: int,
                 driver: int) -> Optional[str]:
    """Why the device of ``capability`` cannot run the module (None if it can). Machine code
    for sm_XY runs on devices of the same major and a minor >= Y; any other device JIT-compiles
    the module's PTX (compute_``ptx_arch``), which needs a device at least that new and a
    driver at least as new as the runtime that wrote the PTX: minor-version compatibility
    does not cover the JIT (an older driver fails with "unsupported PTX version")."""
    major, minor = capability
    if any(a // 10 == major and a % 10 <= minor for a in sass_archs):
        return None
    name = f"sm_{major}{minor}"
    built = ", ".join(f"sm_{a}" for a in sass_archs)
    if major * 10 + minor < ptx_arch:
        return f"fastlm._C has machine code for {built} and PTX for compute_{ptx_arch}: none runs on this {name} device"
    if driver < runtime:
        return (f"fastlm._C has no machine code for this {name} device ({built}): its compute_{ptx_arch} PTX must be "
                f"JIT-compiled, which needs a driver for CUDA {_version(runtime)} or newer (this one supports "
                f"{_version(driver)}). Rebuild for the device: FASTLM_CUDA_ARCHS={major}{minor} python -m "
                f"fastlm.cuda_build")
    return None


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def runtime_mismatch(runtime: int, driver: int) -> Optional[str]:
    """Why a module carrying CUDA runtime ``runtime`` (cudaRuntimeGetVersion, e.g. 13000) cannot
    run under a driver supporting CUDA ``driver`` (cudaDriverGetVersion; 0: none), or None.
    fastlm._C links the runtime statically from the nvcc that built it; CUDA's minor-version
    compatibility lets it run on any driver of the same major version or newer, never on an
    older major (a 13.x runtime needs a CUDA 13 driver, r580 or newer): there the first launch
    fails with a misleading error, so the module is refused when it loads."""
    if driver < 0:
        return "cudaDriverGetVersion failed: the CUDA driver could not be queried"
    if driver == 0:
        return "no CUDA driver is installed (cudaDriverGetVersion reports none)"
    if driver // 1000 < runtime // 1000:
        import torch  # noqa: PLC0415
        matching = f" (torch was built with CUDA {torch.version.cuda})" if torch.version.cuda else ""
        return (f"fastlm._C carries the CUDA {_version(runtime)} runtime (linked statically), which needs a driver "
                f"for CUDA {runtime // 1000}.x; this machine's driver supports CUDA {_version(driver)}. Rebuild it "
                f"with a toolkit of CUDA {driver // 1000}.x or older: python -m fastlm.cuda_build prefers the nvcc "
                f"matching torch's CUDA version{matching}, FASTLM_NVCC=/path/to/nvcc picks one")
    return None


def addr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def dtype_code(dtype: torch.dtype) -> int:
    return _CODES[dtype]


def device_of(t: torch.Tensor):
    """The kernels launch on the CUDA runtime's current device: make it t's for the call
    (a no-op for CPU tensors, which only the CPU emulator in tests/cuda_emulator passes)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream
