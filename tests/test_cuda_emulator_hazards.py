"""The CUDA emulator's shared-memory hazard checker (tests/cuda_emulator), on small kernels.

The emulator must be stricter than the hardware: a missing barrier has to fail here even
when the OS threads happen to run in an order that hides it. Each case below is a kernel
with and without the barrier that makes it correct: read-after-write, write-after-read and
write-after-write between threads of different warps (no __syncthreads) and of one warp (no
__syncwarp), a warp shuffle (which orders no memory), and wmma fragments (whose elements
belong to single lanes: another lane's reads of a stored tile need a __syncwarp). Where the
order of two accesses matters for the test, a global spin flag (which the model does not
count as ordering) forces it. Also: the accesses that are legal without a barrier stay
silent (a lane's own elements of an accumulator loaded, multiplied and stored in place;
adjacent 16-bit elements written by two lanes), a missing __syncwarp taken out of
csrc/attention.cu is caught there, and the device attributes, bit casts and int64 entry
points of the shim work.
"""

from __future__ import annotations

import re

import pytest
import torch

import fastlm

from . import test_attention as attn_tests
from .cuda_emulator import emulate
from .test_cuda_emulated import _route_cuda_to

KERNELS = r"""
#include <mma.h>
#include <atomic>

namespace fastlm {
namespace wmma = nvcuda::wmma;

// A flag in global memory: makes thread `first`'s access happen before thread `second`'s in
// wall-clock time without ordering them in the model (as on the GPU, where it has no fence).
static std::atomic<int> flag{0};
__device__ void spin_until_set() { while (flag.load() == 0) std::this_thread::yield(); }

// Thread a accesses word `word` (write when wa), then thread b (write when wb); between them
// `order`: 0 none (the spin flag only), 1 __syncthreads, 2 __syncwarp (a and b in one warp),
// 3 a warp shuffle. out[0] gets what a read saw.
__global__ void pair_kernel(float* out, int a, int b, int wa, int wb, int order) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x;
  if (t == 0) s[0] = 1.0f;
  __syncthreads();  // (a first write, ordered before everything below)
  if (t == a) {
    if (wa) s[0] = 2.0f; else out[0] = s[0];
    if (order == 0) flag.store(1);
  }
  if (order == 1) __syncthreads();
  if (order == 2) __syncwarp();
  if (order == 3) out[1 + t] = __shfl_xor_sync(0xffffffffu, float(t), 1);
  if (t == b) {
    if (order == 0) spin_until_set();
    if (wb) s[0] = 3.0f; else out[0] = s[0];
  }
}

void pair(std::uintptr_t out, int a, int b, int wa, int wb, int order, int threads) {
  flag.store(0);
  pair_kernel<<<1, threads, 1024, 0>>>(reinterpret_cast<float*>(out), a, b, wa, wb, order);
  check_launch("pair");
}

// One warp stores an accumulator tile (value 1 + row) to shared memory, then lane l reads row
// l / 2 (elements other lanes stored): correct only with the __syncwarp.
__global__ void fragment_store_kernel(float* out, int sync) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* tile = reinterpret_cast<float*>(smem);
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < 256; e += 32) tile[e] = 1.0f + e / 16;
  __syncwarp();
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(acc, tile, 16, wmma::mem_row_major);
  __syncwarp();  // everyone's elements are read before the tile is written again
  wmma::store_matrix_sync(tile, acc, 16, wmma::mem_row_major);
  if (sync) __syncwarp();
  float sum = 0.0f;
  for (int c = 0; c < 16; ++c) sum += tile[(lane / 2) * 16 + c];
  out[lane] = sum;
}

// A lane overwrites a tile element right after the warp loaded the tile into a fragment:
// another lane read it in load_matrix_sync, so without the __syncwarp it is a hazard.
__global__ void fragment_load_kernel(float* out, int sync) {
  extern __shared__ __align__(128) unsigned char smem[];
  __half* tile = reinterpret_cast<__half*>(smem);
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < 256; e += 32) tile[e] = __float2half_rn(float(e % 7));
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::load_matrix_sync(a, tile, 16);
  if (sync) __syncwarp();
  if (lane == 0) {
    for (int e = 0; e < 256; ++e) tile[e] = __float2half_rn(0.0f);
  }
  out[lane] = a.v[3][5];
}

// The in-place accumulator of attention's forward: each lane reads and writes back only its
// own elements, so load, mma, store over the same addresses need no barrier; repeated four
// times. out: the tile (every element 4 * 16 * 2 * 1 = 128 more than it started).
__global__ void fragment_in_place_kernel(float* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* acc_tile = reinterpret_cast<float*>(smem);
  __half* a_tile = reinterpret_cast<__half*>(smem + 1024);
  __half* b_tile = reinterpret_cast<__half*>(smem + 1536);
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < 256; e += 32) {
    acc_tile[e] = float(e);
    a_tile[e] = __float2half_rn(2.0f);
    b_tile[e] = __float2half_rn(1.0f);
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::load_matrix_sync(fa, a_tile, 16);
  wmma::load_matrix_sync(fb, b_tile, 16);
  for (int rep = 0; rep < 4; ++rep) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, acc_tile, 16, wmma::mem_row_major);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(acc_tile, acc, 16, wmma::mem_row_major);
  }
  __syncwarp();
  for (int e = lane; e < 256; e += 32) out[e] = acc_tile[e];
}

// Lanes write adjacent 16-bit elements (each its own 2 bytes), then (after a __syncwarp) lane 0
// reads them all: no hazard. With `overlap`, lane 1 also writes a 4-byte word over lanes 0 and
// 1's elements: a write-after-write.
__global__ void halves_kernel(float* out, int overlap) {
  extern __shared__ __align__(128) unsigned char smem[];
  __half* h = reinterpret_cast<__half*>(smem);
  const int lane = threadIdx.x & 31;
  h[lane] = __float2half_rn(float(lane));
  if (overlap && lane == 1) *reinterpret_cast<unsigned*>(h) = 0u;
  __syncwarp();
  if (lane == 0) {
    float s = 0.0f;
    for (int e = 0; e < 32; ++e) s += __half2float(h[e]);
    out[0] = s;
  }
}

// Reads one float past the launch's dynamic shared memory.
__global__ void past_the_end_kernel(float* out, int bytes) {
  extern __shared__ __align__(128) unsigned char smem[];
  const float* s = reinterpret_cast<const float*>(smem);
  if (threadIdx.x == 0) out[0] = s[bytes / 4];
}

void fragments(std::uintptr_t out, int which, int sync) {
  float* o = reinterpret_cast<float*>(out);
  if (which == 0) {
    fragment_store_kernel<<<1, 32, 1024, 0>>>(o, sync);
  } else if (which == 1) {
    fragment_load_kernel<<<1, 32, 1024, 0>>>(o, sync);
  } else if (which == 2) {
    fragment_in_place_kernel<<<1, 32, 2048, 0>>>(o);
  } else {
    halves_kernel<<<1, 32, 1024, 0>>>(o, sync);
  }
  check_launch("fragments");
}

void past_the_end(std::uintptr_t out, int bytes) {
  past_the_end_kernel<<<1, 32, bytes, 0>>>(reinterpret_cast<float*>(out), bytes);
  check_launch("past_the_end");
}

// common.cuh's block_sum, its leading __syncthreads optional: called twice, the second call's
// writes of the static scratch race with the first call's reads without it.
__device__ float block_sum_guarded(float v, float* scratch, int guard) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (guard) __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

__global__ void block_sum_kernel(float* out, int guard) {
  __shared__ float scratch[32];
  const float a = block_sum_guarded(1.0f, scratch, guard);
  const float b = block_sum_guarded(2.0f, scratch, guard);
  if (threadIdx.x == 0) {
    out[0] = a;
    out[1] = b;
  }
}

// A wmma tile in static shared memory declared with __align__(32) after a 12-byte array (so the
// alignment is what places it): loaded and stored back in place, then read by every lane.
__global__ void static_tile_kernel(float* out) {
  __shared__ float pad[3];
  __shared__ __align__(32) float tile[256];
  const int lane = threadIdx.x & 31;
  if (lane < 3) pad[lane] = 0.0f;
  for (int e = lane; e < 256; e += 32) tile[e] = float(e);
  __syncwarp();
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(acc, tile, 16, wmma::mem_row_major);
  wmma::store_matrix_sync(tile, acc, 16, wmma::mem_row_major);
  __syncwarp();
  for (int e = lane; e < 256; e += 32) out[e] = tile[e] + pad[0];
  out[256] = float(reinterpret_cast<std::uintptr_t>(tile) % 32);
}

void statics(std::uintptr_t out, int which, int guard) {
  float* o = reinterpret_cast<float*>(out);
  if (which == 0) {
    block_sum_kernel<<<1, 64, 0, 0>>>(o, guard);
  } else {
    static_tile_kernel<<<1, 32, 0, 0>>>(o);
  }
  check_launch("statics");
}

// The device attribute a launcher sizes its tiles by, and the opt-in it asks for.
std::int64_t smem_optin() {
  int device = -1, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return -1;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return -2;
  return value;
}
std::int64_t compute_capability() {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
  return major * 10 + minor;
}
std::int64_t opt_in(int bytes) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(past_the_end_kernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) == cudaSuccess;
}
// The 16 bits of x as float16 (bf16 = 0) or bfloat16 (1), through the bit casts and back.
std::int64_t bits(double x, int bf16) {
  if (bf16) {
    const unsigned short u = __bfloat16_as_ushort(__float2bfloat16_rn(static_cast<float>(x)));
    return __bfloat16_as_ushort(__ushort_as_bfloat16(u)) == u ? u : -1;
  }
  const unsigned short u = __half_as_ushort(__float2half_rn(static_cast<float>(x)));
  return __half_as_ushort(__ushort_as_half(u)) == u ? u : -1;
}
}  // namespace fastlm
"""

ENTRY_POINTS = ("pair", "fragments", "statics", "past_the_end", "smem_optin", "compute_capability", "opt_in", "bits")


@pytest.fixture(autouse=True)
def _emulator_available():
    emulate.require_compiler()


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    emulate.require_compiler()
    text = '#include "common.cuh"\n' + KERNELS
    built = emulate.load(emulate.build(tmp_path_factory.mktemp("hazards"), text=text, entry_points=ENTRY_POINTS,
                                       name="hazards"))
    assert built.hazards  # build()'s default
    return built


def _out(n=64):
    return torch.full((n,), float("nan"))


def _pair(lib, a, b, wa, wb, order, threads=64):
    out = _out(threads + 1)
    lib.pair(out.data_ptr(), a, b, wa, wb, order, threads)
    return out


EITHER = r"\((read-after-write|write-after-read)\)"
KINDS = {"read-after-write": (1, 0), "write-after-read": (0, 1), "write-after-write": (1, 1)}


@pytest.mark.parametrize("kind", list(KINDS))
def test_unordered_pair_of_warps_fails(lib, kind):
    """Thread 0 then thread 40 (another warp) with no __syncthreads between: the kind, both
    threads, the offset and the barrier counts are named."""
    wa, wb = KINDS[kind]
    with pytest.raises(RuntimeError) as info:
        _pair(lib, 0, 40, wa, wb, order=0)
    msg = str(info.value)
    assert f"shared-memory hazard ({kind})" in msg, msg
    assert "dynamic shared byte offset 0" in msg and "thread 0 (warp 0, lane 0, after 1 __syncthreads" in msg, msg
    assert "thread 40 (warp 1, lane 8, after 1 __syncthreads" in msg, msg
    assert "pair_kernel" in msg or "[code+0x" in msg, msg  # addr2line names the kernel where installed


@pytest.mark.parametrize("kind", list(KINDS))
def test_syncthreads_orders_the_pair(lib, kind):
    wa, wb = KINDS[kind]
    out = _pair(lib, 0, 40, wa, wb, order=1)
    if not wa:
        assert out[0].item() == 1.0
    elif not wb:
        assert out[0].item() == 2.0


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_warp_needs_syncwarp(lib, kind):
    wa, wb = KINDS[kind]
    with pytest.raises(RuntimeError, match=re.escape(f"({kind})")):
        _pair(lib, 3, 17, wa, wb, order=0)
    _pair(lib, 3, 17, wa, wb, order=2)


def test_syncwarp_does_not_order_other_warps(lib):
    with pytest.raises(RuntimeError, match=EITHER):  # (thread 33 may run first)
        _pair(lib, 3, 33, 1, 0, order=2)


def test_shuffle_does_not_order_shared_memory(lib):
    """A value passed through __shfl_xor_sync does not publish shared memory (the shim's
    own barrier inside the shuffle is not counted); the shuffle still works."""
    with pytest.raises(RuntimeError, match=r"\(read-after-write\)"):
        _pair(lib, 0, 1, 1, 0, order=3, threads=32)
    out = _pair(lib, 0, 1, 0, 0, order=3, threads=32)  # two reads: no hazard
    assert torch.equal(out[1:33], torch.arange(32).float().reshape(16, 2).flip(1).reshape(-1))


def test_reads_of_one_word_by_many_threads_are_no_hazard(lib):
    out = _pair(lib, 5, 50, 0, 0, order=0)
    assert out[0].item() == 1.0


def test_reading_a_stored_fragment_needs_syncwarp(lib):
    """store_matrix_sync writes each element from one lane only: a lane reading a row of the
    stored tile reads other lanes' elements, a read-after-write without the __syncwarp."""
    out = _out(32)
    with pytest.raises(RuntimeError, match=EITHER) as info:  # (a reader may run before the owner's store)
        lib.fragments(out.data_ptr(), 0, 0)
    assert "__syncwarp" in str(info.value)
    lib.fragments(out.data_ptr(), 0, 1)
    assert torch.equal(out, 16 * (1 + torch.arange(32) // 2).float())


def test_overwriting_a_loaded_fragment_needs_syncwarp(lib):
    """load_matrix_sync reads each element in one lane: lane 0 overwriting the tile right
    after the load races with the other lanes' reads (write-after-read)."""
    out = _out(32)
    with pytest.raises(RuntimeError, match=r"\(write-after-read\)"):
        lib.fragments(out.data_ptr(), 1, 0)
    lib.fragments(out.data_ptr(), 1, 1)
    assert torch.equal(out, torch.full((32,), float((3 * 16 + 5) % 7)))


def test_accumulator_in_place_needs_no_barrier(lib):
    """load, mma and store of an accumulator over the same addresses: each lane touches only
    its own elements, as on the hardware, so no __syncwarp is needed (attention's forward
    relies on it), and the arithmetic is right."""
    out = _out(256)
    lib.fragments(out.data_ptr(), 2, 0)
    assert torch.equal(out, torch.arange(256).float() + 4 * 16 * 2)


def test_adjacent_halves_of_two_lanes_are_no_hazard(lib):
    out = _out(1)
    lib.fragments(out.data_ptr(), 3, 0)
    assert out[0].item() == sum(range(32))
    with pytest.raises(RuntimeError, match=r"\(write-after-write\)"):  # a 4-byte store over lane 0's half
        lib.fragments(out.data_ptr(), 3, 1)


def test_static_shared_memory_is_checked(lib):
    """common.cuh's block_sum called twice needs its leading __syncthreads: the second call's
    write of the static scratch would race with the first call's reads."""
    out = _out(2)
    with pytest.raises(RuntimeError, match=EITHER) as info:
        lib.statics(out.data_ptr(), 0, 0)
    assert re.search(r"static shared byte offset [04] ", str(info.value)), str(info.value)  # scratch[0 or 1]
    lib.statics(out.data_ptr(), 0, 1)
    assert out.tolist() == [64.0, 128.0]


def test_static_shared_alignment_is_honoured(lib):
    """__shared__ __align__(32) places a static array as CUDA does (wmma needs 32 bytes)."""
    out = _out(257)
    lib.statics(out.data_ptr(), 1, 0)
    assert torch.equal(out[:256], torch.arange(256).float()) and out[256].item() == 0.0


def test_dynamic_shared_memory_past_the_launch_size_fails(lib):
    out = _out(1)
    with pytest.raises(RuntimeError, match="past the launch's 256 bytes of dynamic shared memory"):
        lib.past_the_end(out.data_ptr(), 256)


def test_device_attributes_and_the_opt_in(lib):
    """cudaDeviceGetAttribute reports an sm_80 with the opt-in set_smem_optin gives, and
    cudaFuncSetAttribute refuses more than it (the int64 entry points return their values)."""
    assert lib.compute_capability() == 80
    assert lib.smem_optin() == 166912  # sm_80's 163 KiB
    assert lib.opt_in(166912) == 1 and lib.opt_in(166913) == 0
    try:
        lib.set_smem_optin(232448)  # sm_90's 227 KiB
        assert lib.smem_optin() == 232448
        assert lib.opt_in(200000) == 1
        lib.set_smem_optin(100 * 1024)
        assert lib.opt_in(120 * 1024) == 0
    finally:
        lib.set_smem_optin(166912)
        assert lib.opt_in(48 * 1024) == 1


@pytest.mark.parametrize("x", [1.0, -2.5, 65504.0, 1e-7, 3.14159, float("inf"), -0.0])
def test_bit_casts(lib, x):
    as16 = torch.tensor(x, dtype=torch.float16).view(torch.int16).item() & 0xFFFF
    assert lib.bits(x, 0) == as16
    asbf = torch.tensor(x, dtype=torch.bfloat16).view(torch.int16).item() & 0xFFFF
    assert lib.bits(x, 1) == asbf


def test_missing_syncwarp_in_attention_is_caught(tmp_path, monkeypatch):
    """Take out the forward's __syncwarp between the score tile's store_matrix_sync and the
    lanes' reads of their rows (csrc/attention.cu): the checker fails the launch."""
    text = (emulate.CSRC / "attention.cu").read_text()
    start = text.index("attn_fwd_kernel(")
    gemm = text.index("warp_gemm_abt<", start)
    sync = text.index("__syncwarp();", gemm)
    assert sync - gemm < 300, "the forward's first __syncwarp no longer follows its first warp_gemm_abt"
    broken = text[:sync] + "/* __syncwarp(); taken out */" + text[sync + len("__syncwarp();"):]
    lib = emulate.load(emulate.build(tmp_path, text=broken, header=(emulate.CSRC / "kernels.h").read_text(),
                                     entry_points=("attention_fwd",), name="attention_no_syncwarp"))
    _route_cuda_to(lib, monkeypatch)
    q, k, v = attn_tests.qkv(1, 16, 16, 1, 1, 32, dtype=torch.float16)
    with fastlm.use_backend("cuda"), pytest.raises(RuntimeError, match=EITHER) as info:
        fastlm.flash_attn_func(q, k, v)
    assert "__syncwarp" in str(info.value)


def test_no_compiler_fails_unless_allowed(monkeypatch):
    """Without a compiler that can build the emulator its tests fail with the reason; with
    FASTLM_ALLOW_NO_EMULATOR=1 they skip with it (pytest -ra prints it in the CI log)."""
    monkeypatch.setattr(emulate, "compiler_error", lambda: "no host C++ compiler (g++)")
    monkeypatch.delenv(emulate.ALLOW_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception, match="no host C.. compiler"):
        emulate.require_compiler()
    monkeypatch.setenv(emulate.ALLOW_ENV, "1")
    with pytest.raises(pytest.skip.Exception, match="no host C.. compiler"):
        emulate.require_compiler()
    monkeypatch.setattr(emulate, "compiler_error", lambda: None)
    monkeypatch.delenv(emulate.ALLOW_ENV)
    emulate.require_compiler()
