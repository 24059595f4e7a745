"""csrc/mma.cuh, the tensor-core primitives with documented lane layouts (ldmatrix .x4 and
.x4.trans, mma.sync m16n8k16 with float32 accumulators) that step 1 of the FlashAttention-2
design builds on (docs/ARCHITECTURE.md): the CPU emulator's implementation of their layouts
is checked against a matrix product, the hazard checker sees their shared-memory reads, and
nvcc accepts their PTX for sm_80 and sm_90 (running it is a GPU's part)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from fastlm import cuda_build

from .cuda_emulator import emulate

# One warp: D1 = A B with B given n-major (Bt, as K is in Q K^T: ldmatrix_x4), D2 = A B with B
# given k-major (ldmatrix_x4_trans, as V is in P V); two 8-column blocks each; C = bias.
KERNEL = r"""
#include <cstdint>
#include <stdexcept>
#include <cuda_runtime.h>
#include "mma.cuh"

namespace fastlm {
namespace {
template <typename T>
__global__ void mma_probe_kernel(const T* a, const T* bt, const T* b, const float* bias, float* d1, float* d2,
                                 int sync) {
  __shared__ __align__(16) T sA[16 * 24];  // rows padded to 24 elements (48 bytes: 16-byte aligned rows)
  __shared__ __align__(16) T sBt[16 * 24];
  __shared__ __align__(16) T sB[16 * 24];
  const int lane = threadIdx.x;
  for (int e = lane; e < 256; e += 32) {
    sA[(e / 16) * 24 + e % 16] = a[e];
    sBt[(e / 16) * 24 + e % 16] = bt[e];
    sB[(e / 16) * 24 + e % 16] = b[e];
  }
  if (sync) __syncwarp();
  unsigned ra[4], rbt[4], rb[4];
  // A: lanes 0-15 rows 0-15 at column 0, lanes 16-31 rows 0-15 at column 8
  mma::ldmatrix_x4(ra, sA + (lane % 16) * 24 + (lane / 16) * 8);
  // Bt (n-major): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
  mma::ldmatrix_x4(rbt, sBt + ((lane / 16) * 8 + lane % 8) * 24 + ((lane / 8) % 2) * 8);
  // B (k-major): matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
  mma::ldmatrix_x4_trans(rb, sB + (lane % 16) * 24 + (lane / 16) * 8);
  const int g = lane / 4, t = lane % 4;
  for (int nb = 0; nb < 2; ++nb) {
    const float c[4] = {bias[nb * 8 + 2 * t], bias[nb * 8 + 2 * t + 1], bias[nb * 8 + 2 * t],
                        bias[nb * 8 + 2 * t + 1]};
    const unsigned b1[2] = {rbt[2 * nb], rbt[2 * nb + 1]};
    const unsigned b2[2] = {rb[2 * nb], rb[2 * nb + 1]};
    float o1[4], o2[4];
    mma::mma_16816<T>(o1, ra, b1, c);
    mma::mma_16816<T>(o2, ra, b2, c);
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = nb * 8 + 2 * t + i % 2;
      d1[row * 16 + col] = o1[i];
      d2[row * 16 + col] = o2[i];
    }
  }
}
}  // namespace

void mma_probe(int dtype, std::uintptr_t a, std::uintptr_t bt, std::uintptr_t b, std::uintptr_t bias,
               std::uintptr_t d1, std::uintptr_t d2, int sync);

void mma_probe(int dtype, std::uintptr_t a, std::uintptr_t bt, std::uintptr_t b, std::uintptr_t bias,
               std::uintptr_t d1, std::uintptr_t d2, int sync) {
  if (dtype == 1) {
    mma_probe_kernel<__half><<<1, 32, 0, 0>>>(reinterpret_cast<const __half*>(a), reinterpret_cast<const __half*>(bt),
        reinterpret_cast<const __half*>(b), reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(d1),
        reinterpret_cast<float*>(d2), sync);
  } else {
    mma_probe_kernel<__nv_bfloat16><<<1, 32, 0, 0>>>(reinterpret_cast<const __nv_bfloat16*>(a),
        reinterpret_cast<const __nv_bfloat16*>(bt), reinterpret_cast<const __nv_bfloat16*>(b),
        reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(d1), reinterpret_cast<float*>(d2), sync);
  }
}
}  // namespace fastlm
"""

HEADER = ("void mma_probe(int dtype, std::uintptr_t a, std::uintptr_t bt, std::uintptr_t b, std::uintptr_t bias, "
          "std::uintptr_t d1, std::uintptr_t d2, int sync);")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    emulate.require_compiler()
    lib = emulate.build(tmp_path_factory.mktemp("mma"), entry_points=("mma_probe",), text=KERNEL, header=HEADER,
                        name="mma_probe")
    return emulate.load(lib)


def _run(probe, dtype, sync=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(16, 16, generator=g).to(dtype) for _ in range(2))
    bias = torch.randn(16, generator=g)
    bt = b.t().contiguous()
    d1, d2 = (torch.full((16, 16), float("nan")) for _ in range(2))
    probe.mma_probe(1 if dtype == torch.float16 else 2, a.data_ptr(), bt.data_ptr(), b.data_ptr(), bias.data_ptr(),
                    d1.data_ptr(), d2.data_ptr(), int(sync))
    want = a.double() @ b.double() + bias.double()
    return d1, d2, want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_emulated_layouts_multiply(probe, dtype, seed):
    """ldmatrix (both forms) feeding mma.sync gives A B + C: the A, B and C/D layouts, the
    half order within a register and the two 8-column blocks all line up (a wrong lane map
    permutes or mixes elements, which a random product shows)."""
    d1, d2, want = _run(probe, dtype, seed=seed)
    torch.testing.assert_close(d1.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d2.double(), want, rtol=1e-5, atol=1e-5)


def test_a_missing_syncwarp_before_ldmatrix_is_a_hazard(probe):
    """The lanes fill the tiles and ldmatrix reads rows other lanes wrote: without the
    __syncwarp between, the checker fails the launch."""
    with pytest.raises(RuntimeError, match="read-after-write|RAW|hazard"):
        _run(probe, torch.float16, sync=False)


def test_nvcc_accepts_the_ptx(tmp_path):
    """The inline PTX of csrc/mma.cuh assembles for sm_80 and sm_90 with the build's flags
    (warnings as errors)."""
    src = tmp_path / "mma_probe.cu"
    src.write_text(KERNEL)
    nvcc = cuda_build._nvcc()
    for arch in ("80", "90"):
        flags = [f for f in cuda_build.nvcc_flags((arch,)) if not f.startswith("-gencode")]
        done = subprocess.run([nvcc, *flags, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", str(src), "-o",
                               str(tmp_path / f"mma{arch}.o")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    cuobjdump = shutil.which("cuobjdump") or __import__("fastlm.bench.static_csrc", fromlist=["_tool"])._tool(
        "cuobjdump")
    sass = subprocess.run([cuobjdump, "-sass", str(tmp_path / "mma80.o")], capture_output=True, text=True).stdout
    assert "LDSM.16.M88.4" in sass and "LDSM.16.MT88.4" in sass and "HMMA.16816.F32" in sass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: runs in the GPU runbook "
                    "(benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_hardware_agrees_with_the_emulated_layouts(tmp_path, dtype):
    """The same probe on the GPU (nvcc, loaded with ctypes): the emulator's lane maps are the
    hardware's only if this gives A B + C too."""
    import ctypes
    src = tmp_path / "mma_probe.cu"
    src.write_text(KERNEL + '\nextern "C" void probe_c(int d, std::uintptr_t a, std::uintptr_t bt, std::uintptr_t b, '
                   "std::uintptr_t bias, std::uintptr_t d1, std::uintptr_t d2) "
                   "{ fastlm::mma_probe(d, a, bt, b, bias, d1, d2, 1); }\n")
    major, minor = torch.cuda.get_device_capability()
    lib = tmp_path / "mma_probe.so"
    done = subprocess.run([cuda_build._nvcc(), "-O2", "-std=c++17", f"-gencode=arch=compute_{major}{minor},"
                           f"code=sm_{major}{minor}", f"-I{cuda_build.CSRC}", "-Xcompiler", "-fPIC", "-shared",
                           str(src), "-o", str(lib)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    probe_c = ctypes.CDLL(str(lib)).probe_c
    probe_c.argtypes = [ctypes.c_int] + [ctypes.c_uint64] * 6
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(16, 16, generator=g).to(dtype).cuda() for _ in range(2))
    bias = torch.randn(16, generator=g).cuda()
    bt = b.t().contiguous()
    d1, d2 = (torch.full((16, 16), float("nan"), device="cuda") for _ in range(2))
    torch.cuda.synchronize()
    probe_c(1 if dtype == torch.float16 else 2, a.data_ptr(), bt.data_ptr(), b.data_ptr(), bias.data_ptr(),
            d1.data_ptr(), d2.data_ptr())
    torch.cuda.synchronize()
    want = a.double() @ b.double() + bias.double()
    torch.testing.assert_close(d1.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d2.double(), want, rtol=1e-4, atol=1e-4)
