// A CPU emulation of the slice of CUDA that csrc/attention.cu and csrc/cross_entropy.cu use, for
// testing without a GPU
// (tests/cuda_emulator/emulate.py builds and loads it): every CUDA thread is an OS thread,
// __syncthreads / __syncwarp are barriers, warp shuffles go through a per-warp buffer, and
// each wmma fragment holds the whole 16 x 16 tile in every lane (the collective loads and
// stores are barriers, so no lane sees a half-written tile; the layout of real fragments,
// which CUDA leaves unspecified, cannot matter). A broken rule (misaligned wmma pointer,
// shared memory above the opt-in) is recorded and raised by the launch.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) alignas(n)

using std::max;
using std::min;

struct emu_dim3 { unsigned x = 0, y = 1, z = 1; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

struct __half { std::uint16_t x; };
struct __nv_bfloat16 { std::uint16_t x; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return static_cast<float>(f); }
inline __half __float2half_rn(float v) { _Float16 f = static_cast<_Float16>(v); __half h; std::memcpy(&h.x, &f, 2); return h; }
inline float __bfloat162float(__nv_bfloat16 b) { std::uint32_t u = std::uint32_t(b.x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {std::uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {std::uint16_t(u >> 16)};
}

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef struct CUstream_st* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {
constexpr int kMaxSmem = 166912;  // A100's opt-in limit per block (163 KiB); H100 allows 227 KiB
struct Block {
  std::unique_ptr<std::barrier<>> block_bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<float> shfl;
  unsigned char* smem = nullptr;
  std::vector<unsigned char> static_smem;  // the kernel's static __shared__ arrays
};
constexpr std::size_t kStaticSmem = 48 * 1024;  // CUDA's limit for static shared memory per block
inline thread_local std::size_t tl_static_offset = 0;
inline thread_local emu_dim3 tl_thread, tl_block, tl_blockdim, tl_griddim;
inline thread_local Block* tl_blk = nullptr;
inline cudaError_t last_error = cudaSuccess;
inline int max_dynamic_smem = 48 * 1024;
inline std::mutex error_mutex;
inline std::string first_error;  // the first broken rule of the current launch
inline void fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (first_error.empty()) first_error = what;
}
}  // namespace emu

#define threadIdx (emu::tl_thread)
#define blockIdx (emu::tl_block)
#define blockDim (emu::tl_blockdim)
#define gridDim (emu::tl_griddim)

namespace emu {
// A static `__shared__ T name[n];` (rewritten by emulate.py into a call of this): every thread
// of a block runs the kernel's declarations in the same order, so the k-th declaration gets
// the same slice of the block's buffer in each thread. (A declaration inside a loop would take
// a new slice per iteration: the kernels declare theirs at the top.)
template <typename T>
inline T* static_shared(std::size_t n) {
  const std::size_t offset = (tl_static_offset + 15) / 16 * 16;
  tl_static_offset = offset + n * sizeof(T);
  if (tl_static_offset > kStaticSmem) {
    fail("static shared memory above 48 KiB");
    return reinterpret_cast<T*>(tl_blk->static_smem.data());
  }
  return reinterpret_cast<T*>(tl_blk->static_smem.data() + offset);
}
}  // namespace emu

inline void __syncthreads() { emu::tl_blk->block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::tl_blk->warp_bars[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned mask, float v, int m) {
  if (mask != 0xffffffffu) emu::fail("shfl with a partial mask");
  auto* b = emu::tl_blk;
  const unsigned lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncwarp();
  b->shfl[w * 32 + lane] = v;
  __syncwarp();
  const float r = b->shfl[w * 32 + (lane ^ unsigned(m))];
  return r;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline cudaError_t cudaGetLastError() { cudaError_t e = emu::last_error; emu::last_error = cudaSuccess; return e; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated launch error"; }
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int v) {
  if (v > emu::kMaxSmem) return 1;
  emu::max_dynamic_smem = v;
  return cudaSuccess;
}

namespace emu {
template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), unsigned grid, unsigned block, int smem_bytes, cudaStream_t,
                   Args... args) {
  first_error.clear();
  if (smem_bytes > max_dynamic_smem) throw std::runtime_error("emulator: dynamic shared memory above the opt-in");
  if (block % 32 != 0) throw std::runtime_error("emulator: block not a multiple of 32");
  for (unsigned bid = 0; bid < grid; ++bid) {
    Block blk;
    blk.block_bar = std::make_unique<std::barrier<>>(block);
    for (unsigned w = 0; w < block / 32; ++w) blk.warp_bars.push_back(std::make_unique<std::barrier<>>(32));
    blk.shfl.assign(block, 0.0f);
    blk.smem = static_cast<unsigned char*>(std::aligned_alloc(128, ((smem_bytes + 127) / 128) * 128 + 128));
    std::memset(blk.smem, 0xff, smem_bytes);  // NaN in every type: unwritten shared memory shows
    blk.static_smem.assign(kStaticSmem, 0xff);
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block; ++t) {
      ts.emplace_back([&, t] {
        tl_thread.x = t;
        tl_block.x = bid;
        tl_blockdim.x = block;
        tl_griddim.x = grid;
        tl_blk = &blk;
        tl_static_offset = 0;
        kernel(args...);
      });
    }
    for (auto& th : ts) th.join();
    std::free(blk.smem);
  }
  if (!first_error.empty()) throw std::runtime_error("emulator: " + first_error);
  // (a kernel whose threads return early before a barrier would deadlock here; on the real
  // hardware that is undefined behaviour as well)
}
inline unsigned char* shared_memory() { return tl_blk->smem; }
}  // namespace emu

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emulated: m16n16k16 only");
  float v[16][16];
};

inline float elem(float x) { return x; }
inline float elem(__half x) { return __half2float(x); }
inline float elem(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename P>
inline void check_ptr(const P* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) emu::fail(std::string(what) + ": pointer not 256-bit aligned");
  if ((ldm * sizeof(P)) % 16 != 0) emu::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

template <typename Use, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const P* p, unsigned ldm) {
  static_assert(std::is_same<T, P>::value, "fragment element type and pointer type differ");
  check_ptr(p, ldm, "load_matrix_sync");
  __syncwarp();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = elem(std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r]);
  __syncwarp();
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  check_ptr(p, ldm, "load_matrix_sync (accumulator)");
  __syncwarp();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  __syncwarp();
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  check_ptr(p, ldm, "store_matrix_sync");
  __syncwarp();
  if ((threadIdx.x & 31) == 0) {
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
  }
  __syncwarp();
}

template <typename F>
inline void fill_fragment(F& f, float x) {
  for (auto& row : f.v)
    for (auto& e : row) e = x;
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[r][n];
      for (int k = 0; k < 16; ++k) acc += a.v[r][k] * b.v[k][n];
      out[r][n] = acc;
    }
  std::memcpy(d.v, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda
