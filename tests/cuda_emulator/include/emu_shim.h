// A CPU emulation of the slice of CUDA that fastlm's csrc/*.cu kernels use, for testing without
// a GPU (tests/cuda_emulator/emulate.py builds and loads it). The model, meant to be stricter
// than the hardware, never looser:
//  * Every CUDA thread is an OS thread; blocks of a grid run one after another.
//  * `__syncthreads` / `__syncwarp` are barriers, and the only points that order shared-memory
//    accesses of different threads. Warp shuffles exchange values through a per-warp buffer
//    behind an internal barrier that orders nothing (the hardware does not promise that a
//    shuffle orders memory either).
//  * wmma fragments: each lane holds the whole 16 x 16 tile (every lane computes the same
//    mma_sync), but memory sees the hardware's division of labour: each element of a tile
//    belongs to one lane (a fixed, deliberately scrambled map, 8 elements per lane, the same
//    for every load and store of a fragment kind). load_matrix_sync reads only the calling
//    lane's elements (then the lanes pool them through a per-warp buffer, behind internal
//    barriers), store_matrix_sync writes only its elements. So a lane reading a tile element
//    that another lane stored, or storing over one that another lane still reads, without a
//    __syncwarp between, is a hazard below. The documented pointer alignment and `ldm` rules
//    are checked.
//  * Hazard checker (EMU_HAZARDS, on in emulate.build by default): the translation unit is
//    compiled with -fsanitize=kernel-address and call-mode instrumentation, so gcc calls
//    __asan_{load,store}{1,2,4,8,16,N}_noabort(address) before every memory access, and this
//    file defines those hooks (no sanitizer runtime is involved). Accesses outside the running
//    block's shared memory return at once. Inside, a shadow per 2-byte unit keeps the last
//    write and the last two reads (the latest, and the latest by another thread than it) as
//    (thread, block-barrier epoch, warp-barrier epoch); each thread counts the __syncthreads
//    and __syncwarp calls it has passed. Two accesses of different threads are ordered when
//    their block epochs differ, or when they are in one warp and their warp epochs differ;
//    an unordered conflicting pair (read-after-write, write-after-read, write-after-write)
//    is recorded and raised by the launch, naming both threads, their epochs and the byte
//    offset. Dynamic shared-memory accesses past the launch's size are errors too.
//    Limits: a race can lose a shadow update (a hazard may be missed, never invented); only
//    the last write and two reads per unit are kept; bytes of one 2-byte unit count as one
//    location (byte-wide stores to shared memory by different threads would read as a
//    conflict: no kernel here makes them); global memory is not checked; shared atomics are
//    not emulated.
// A broken rule (misaligned wmma pointer, shared memory above the opt-in, a hazard) is recorded
// (the first one wins) and raised by the launch.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
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

#define EMU_UNCHECKED __attribute__((no_sanitize_address))

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
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidDevice = 101;
typedef struct CUstream_st* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
// The values of CUDA's enum (driver_types.h), for code that prints or stores them.
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

namespace emu {
struct Block {
  std::unique_ptr<std::barrier<>> block_bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<float> shfl;
  std::vector<float> wmma_pool;  // 256 floats per warp: a tile's elements pooled by its lanes
  std::vector<unsigned> mma_pool;  // 320 words per warp: mma.sync's A, B, C registers of every lane
  unsigned char* smem = nullptr;
  unsigned char* static_smem = nullptr;  // the kernel's static __shared__ arrays (kStaticSmem bytes)
};
constexpr std::size_t kStaticSmem = 48 * 1024;  // CUDA's limit for static shared memory per block
inline int smem_optin = 166912;  // the opt-in limit per block: sm_80's 163 KiB (sm_90: 227 KiB)
inline thread_local std::size_t tl_static_offset = 0;
inline thread_local emu_dim3 tl_thread, tl_block, tl_blockdim, tl_griddim;
inline thread_local Block* tl_blk = nullptr;
// Barriers this thread has passed in the current block (the kernel's own, not the shim's).
inline thread_local std::uint32_t tl_block_epoch = 0, tl_warp_epoch = 0;
inline cudaError_t last_error = cudaSuccess;
inline int max_dynamic_smem = 48 * 1024;
inline std::mutex error_mutex;
inline std::string first_error;  // the first broken rule of the current launch
inline std::atomic<bool> failed{false};
inline void fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (first_error.empty()) first_error = what;
  failed.store(true, std::memory_order_relaxed);
}
// A code address as "[code+0x...]" (an offset in this library): emulate.py names the function.
inline std::string code_ref(const void* pc) {
  Dl_info info;
  if (pc == nullptr || dladdr(pc, &info) == 0 || info.dli_fbase == nullptr) return "[code unknown]";
  char buf[48];
  std::snprintf(buf, sizeof buf, "[code+0x%zx]",
                static_cast<std::size_t>(reinterpret_cast<std::uintptr_t>(pc) -
                                         reinterpret_cast<std::uintptr_t>(info.dli_fbase)));
  return buf;
}
}  // namespace emu

#define threadIdx (emu::tl_thread)
#define blockIdx (emu::tl_block)
#define blockDim (emu::tl_blockdim)
#define gridDim (emu::tl_griddim)

// ----------------------------------------------------------------------------- the hazard checker
namespace emu {
namespace hz {
// A record of one access: thread id + 1 (11 bits; 0 = no record), block epoch (26 bits), warp
// epoch (27 bits). Epochs are compared for equality only: one would have to wrap 2^26 barriers
// within a block to alias.
constexpr int kTidShift = 53, kBlockShift = 27;
constexpr std::uint64_t kEpochMask = (std::uint64_t{1} << 27) - 1, kBlockMask = (std::uint64_t{1} << 26) - 1;
struct Cell { std::uint64_t write, read_a, read_b; };
// The running block's shared memory: dynamic [dyn_lo, dyn_lo + dyn_span) (dyn_size of it
// launched; the rest is the allocation's rounding), static [st_lo, st_lo + st_span). Spans are 0
// between blocks, so the hooks' range test fails at once. Shadow cells: dynamic units first.
inline std::uintptr_t dyn_lo = 0, dyn_span = 0, dyn_size = 0, st_lo = 0, st_span = 0;
inline std::unique_ptr<Cell[]> shadow;
inline std::size_t shadow_cells = 0;

EMU_UNCHECKED inline std::uint64_t rec_here() {
  return (std::uint64_t(tl_thread.x) + 1) << kTidShift | (std::uint64_t(tl_block_epoch) & kBlockMask) << kBlockShift |
         (std::uint64_t(tl_warp_epoch) & kEpochMask);
}
EMU_UNCHECKED inline unsigned tid_of(std::uint64_t r) { return unsigned(r >> kTidShift) - 1; }
EMU_UNCHECKED inline unsigned block_epoch_of(std::uint64_t r) { return unsigned((r >> kBlockShift) & kBlockMask); }
EMU_UNCHECKED inline unsigned warp_epoch_of(std::uint64_t r) { return unsigned(r & kEpochMask); }
// Whether the recorded access `r` and this thread's access `me` conflict in time: different
// threads, no barrier of the block between them, and not one warp with a __syncwarp between.
EMU_UNCHECKED inline bool unordered(std::uint64_t r, std::uint64_t me) {
  if (r == 0 || (r >> kTidShift) == (me >> kTidShift)) return false;
  if (block_epoch_of(r) != block_epoch_of(me)) return false;
  return !(tid_of(r) / 32 == tid_of(me) / 32 && warp_epoch_of(r) != warp_epoch_of(me));
}

inline void report(const char* kind, std::size_t unit, std::uint64_t first, const char* first_op, std::uint64_t me,
                   const char* my_op, const void* pc) {
  if (failed.load(std::memory_order_relaxed)) return;
  const std::size_t byte = unit * 2;
  const bool dynamic = byte < dyn_span;
  const std::size_t off = dynamic ? byte : byte - dyn_span;
  auto who = [](std::uint64_t r, const char* op) {
    const unsigned t = tid_of(r);
    return std::string(op) + " by thread " + std::to_string(t) + " (warp " + std::to_string(t / 32) + ", lane " +
           std::to_string(t % 32) + ", after " + std::to_string(block_epoch_of(r)) + " __syncthreads and " +
           std::to_string(warp_epoch_of(r)) + " __syncwarp)";
  };
  fail(std::string("shared-memory hazard (") + kind + ") in block " + std::to_string(tl_block.x) + " at " +
       (dynamic ? "dynamic" : "static") + " shared byte offset " + std::to_string(off) + " (2-byte unit): " +
       who(first, first_op) + ", then " + who(me, my_op) + " at " + code_ref(pc) +
       ", with no barrier ordering them");
}

EMU_UNCHECKED inline std::uint64_t ld(const std::uint64_t& x) { return __atomic_load_n(&x, __ATOMIC_RELAXED); }
EMU_UNCHECKED inline void st(std::uint64_t& x, std::uint64_t v) { __atomic_store_n(&x, v, __ATOMIC_RELAXED); }

EMU_UNCHECKED inline void check(std::size_t off, std::size_t n, bool write, const void* pc) {
  if (tl_blk == nullptr) return;  // the launcher, between blocks
  const std::uint64_t me = rec_here();
  const std::size_t last = (off + n - 1) / 2;
  if (last >= shadow_cells) return;
  for (std::size_t u = off / 2; u <= last; ++u) {
    Cell& c = shadow[u];
    const std::uint64_t w = ld(c.write);
    if (unordered(w, me)) report(write ? "write-after-write" : "read-after-write", u, w, "written", me,
                                 write ? "written" : "read", pc);
    if (write) {
      const std::uint64_t a = ld(c.read_a), b = ld(c.read_b);
      if (unordered(a, me)) report("write-after-read", u, a, "read", me, "written", pc);
      else if (unordered(b, me)) report("write-after-read", u, b, "read", me, "written", pc);
      if (w != me) st(c.write, me);
    } else {
      const std::uint64_t a = ld(c.read_a);
      if (a != me) {
        if (a != 0 && (a >> kTidShift) != (me >> kTidShift)) st(c.read_b, a);  // keep another thread's read
        st(c.read_a, me);
      }
    }
  }
}

EMU_UNCHECKED __attribute__((always_inline)) inline void access(std::uintptr_t a, std::size_t n, bool write,
                                                                const void* pc) {
  std::size_t off;
  if (a - dyn_lo < dyn_span) {
    off = a - dyn_lo;
    if (off + n > dyn_size) {
      if (!failed.load(std::memory_order_relaxed))
        fail("shared-memory access past the launch's " + std::to_string(dyn_size) + " bytes of dynamic shared "
             "memory: " + std::to_string(n) + " bytes at offset " + std::to_string(off) + " by thread " +
             std::to_string(tl_thread.x) + " of block " + std::to_string(tl_block.x) + " at " + code_ref(pc));
      return;
    }
  } else if (a - st_lo < st_span) {
    off = dyn_span + (a - st_lo);
  } else {
    return;
  }
  check(off, n, write, pc);
}

// Arm the checker for a block whose buffers are given (the launcher, before its threads start).
inline void arm(unsigned char* dyn, std::size_t dyn_alloc, std::size_t dyn_bytes, unsigned char* stat,
                std::size_t stat_bytes) {
  const std::size_t cells = (dyn_alloc + stat_bytes) / 2;
  if (cells > shadow_cells) {
    shadow.reset(new Cell[cells]);
    shadow_cells = cells;
  }
  std::memset(shadow.get(), 0, cells * sizeof(Cell));
  dyn_lo = reinterpret_cast<std::uintptr_t>(dyn), dyn_span = dyn_alloc, dyn_size = dyn_bytes;
  st_lo = reinterpret_cast<std::uintptr_t>(stat), st_span = stat_bytes;
}
inline void disarm() { dyn_span = 0, st_span = 0, dyn_size = 0; }
}  // namespace hz
}  // namespace emu

#if defined(EMU_HAZARDS)
// The hooks gcc's -fsanitize=kernel-address calls (call mode, every access; emulate.py's flags).
#define EMU_HOOK(N)                                                                                    \
  extern "C" EMU_UNCHECKED void __asan_load##N##_noabort(std::uintptr_t a) {                          \
    emu::hz::access(a, N, false, __builtin_return_address(0));                                         \
  }                                                                                                    \
  extern "C" EMU_UNCHECKED void __asan_store##N##_noabort(std::uintptr_t a) {                         \
    emu::hz::access(a, N, true, __builtin_return_address(0));                                          \
  }
EMU_HOOK(1)
EMU_HOOK(2)
EMU_HOOK(4)
EMU_HOOK(8)
EMU_HOOK(16)
#undef EMU_HOOK
extern "C" EMU_UNCHECKED void __asan_loadN_noabort(std::uintptr_t a, std::size_t n) {
  if (n) emu::hz::access(a, n, false, __builtin_return_address(0));
}
extern "C" EMU_UNCHECKED void __asan_storeN_noabort(std::uintptr_t a, std::size_t n) {
  if (n) emu::hz::access(a, n, true, __builtin_return_address(0));
}
extern "C" EMU_UNCHECKED void __asan_handle_no_return() {}
extern "C" EMU_UNCHECKED void __asan_before_dynamic_init(const char*) {}
extern "C" EMU_UNCHECKED void __asan_after_dynamic_init() {}
extern "C" int emu_hazards_enabled() { return 1; }
#else
extern "C" int emu_hazards_enabled() { return 0; }
#endif

// The opt-in limit of shared memory per block that cudaDeviceGetAttribute reports and
// cudaFuncSetAttribute enforces (Emulated.set_smem_optin).
extern "C" void emu_set_smem_optin(int bytes) { emu::smem_optin = bytes; }

namespace emu {
// A static `__shared__ [__align__(a)] T name[n];` (rewritten by emulate.py into a call of this):
// every thread of a block runs the kernel's declarations in the same order, so the k-th
// declaration gets the same slice of the block's 128-byte aligned buffer in each thread, at
// alignment max(a, 16). (A declaration inside a loop would take a new slice per iteration: the
// kernels declare theirs at the top.)
template <typename T>
inline T* static_shared(std::size_t n, std::size_t align = 16) {
  align = std::max<std::size_t>({align, alignof(T), 16});
  if (align > 128) fail("static __shared__ alignment above 128 bytes (not emulated)");
  const std::size_t offset = (tl_static_offset + align - 1) / align * align;
  tl_static_offset = offset + n * sizeof(T);
  if (tl_static_offset > kStaticSmem) {
    fail("static shared memory above 48 KiB");
    return reinterpret_cast<T*>(tl_blk->static_smem);
  }
  return reinterpret_cast<T*>(tl_blk->static_smem + offset);
}

// The shim's own warp barrier (shuffles, wmma pooling): it orders nothing for the checker.
inline void warp_barrier() { tl_blk->warp_bars[tl_thread.x / 32]->arrive_and_wait(); }
}  // namespace emu

inline void __syncthreads() {
  emu::tl_blk->block_bar->arrive_and_wait();
  ++emu::tl_block_epoch;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask (not emulated)");
  emu::warp_barrier();
  ++emu::tl_warp_epoch;
}

namespace emu {
// Lane `lane` gets v of lane src(lane) (every lane of the warp calls with the full mask).
template <typename Src>
inline float shuffle(unsigned mask, float v, Src src, const char* what) {
  if (mask != 0xffffffffu) fail(std::string(what) + " with a partial mask (not emulated)");
  auto* b = tl_blk;
  const unsigned lane = tl_thread.x & 31, base = tl_thread.x & ~31u;
  warp_barrier();  // the previous exchange's reads are done
  b->shfl[base + lane] = v;
  warp_barrier();
  return b->shfl[base + (src(lane) & 31u)];
}
}  // namespace emu

inline float __shfl_xor_sync(unsigned mask, float v, int m) {
  return emu::shuffle(mask, v, [m](unsigned lane) { return lane ^ unsigned(m); }, "__shfl_xor_sync");
}
inline float __shfl_sync(unsigned mask, float v, int src) {
  return emu::shuffle(mask, v, [src](unsigned) { return unsigned(src); }, "__shfl_sync");
}
inline float __shfl_down_sync(unsigned mask, float v, unsigned d) {
  return emu::shuffle(mask, v, [d](unsigned lane) { return lane + d < 32 ? lane + d : lane; }, "__shfl_down_sync");
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline cudaError_t cudaGetLastError() { cudaError_t e = emu::last_error; emu::last_error = cudaSuccess; return e; }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaErrorInvalidValue ? "invalid argument (emulated)"
         : e == cudaErrorInvalidDevice ? "invalid device ordinal (emulated)" : "emulated launch error";
}
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int v) {
  if (v > emu::smem_optin) return cudaErrorInvalidValue;
  emu::max_dynamic_smem = v;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// One emulated device, 0: an sm_80 (A100: 108 SMs) whose shared-memory opt-in is settable.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::smem_optin; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    // (the hardware reserves 1 KiB per block beside the opt-in: 164 KiB per SM on sm_80)
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = emu::smem_optin + 1024; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 8; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 108; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

namespace emu {
template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), unsigned grid, unsigned block, int smem_bytes, cudaStream_t,
                   Args... args) {
  {
    std::lock_guard<std::mutex> lock(error_mutex);
    first_error.clear();
    failed.store(false);
  }
  if (smem_bytes > max_dynamic_smem) throw std::runtime_error("emulator: dynamic shared memory above the opt-in");
  if (block % 32 != 0) throw std::runtime_error("emulator: block not a multiple of 32");
  const std::size_t dyn_alloc = ((std::size_t(smem_bytes) + 127) / 128) * 128 + 128;
  for (unsigned bid = 0; bid < grid; ++bid) {
    Block blk;
    blk.block_bar = std::make_unique<std::barrier<>>(block);
    for (unsigned w = 0; w < block / 32; ++w) blk.warp_bars.push_back(std::make_unique<std::barrier<>>(32));
    blk.shfl.assign(block, 0.0f);
    blk.wmma_pool.assign(std::size_t(block / 32) * 256, 0.0f);
    blk.mma_pool.assign(std::size_t(block / 32) * 320, 0u);
    blk.smem = static_cast<unsigned char*>(std::aligned_alloc(128, dyn_alloc));
    std::memset(blk.smem, 0xff, dyn_alloc);  // NaN in every type: unwritten shared memory shows
    blk.static_smem = static_cast<unsigned char*>(std::aligned_alloc(128, kStaticSmem));
    std::memset(blk.static_smem, 0xff, kStaticSmem);
    hz::arm(blk.smem, dyn_alloc, std::size_t(smem_bytes), blk.static_smem, kStaticSmem);
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block; ++t) {
      ts.emplace_back([&, t] {
        tl_thread.x = t;
        tl_block.x = bid;
        tl_blockdim.x = block;
        tl_griddim.x = grid;
        tl_static_offset = 0;
        tl_block_epoch = 0;
        tl_warp_epoch = 0;
        tl_blk = &blk;
        kernel(args...);
        tl_blk = nullptr;
      });
    }
    for (auto& th : ts) th.join();
    hz::disarm();
    std::free(blk.smem);
    std::free(blk.static_smem);
    if (failed.load()) break;  // the first error is the one reported
  }
  if (failed.load()) throw std::runtime_error("emulator: " + first_error + " [kernel " + code_ref(
      reinterpret_cast<const void*>(kernel)) + "]");
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
  float v[16][16];  // the whole tile, in every lane
};

inline float elem(float x) { return x; }
inline float elem(__half x) { return __half2float(x); }
inline float elem(__nv_bfloat16 x) { return __bfloat162float(x); }

// The lane that holds element (r, c) of a tile in memory: in each 8 x 8 quadrant the layout of
// sm_80's m16n8k16 accumulators (row r % 8 to lanes 4 (r % 8) .. + 3, two adjacent columns per
// lane), XORed with a constant per quadrant and fragment kind, so no simple rule (a row per
// lane, lane 0 holding (0, 0)) matches it by chance. 8 elements per lane.
template <typename Use> constexpr unsigned kSalt = 0;
template <> constexpr unsigned kSalt<matrix_a> = 0x0b;
template <> constexpr unsigned kSalt<matrix_b> = 0x16;
template <> constexpr unsigned kSalt<accumulator> = 0x05;
template <typename Use>
inline unsigned owner(int r, int c) {
  const unsigned quadrant = unsigned((r >> 3) * 2 + (c >> 3));
  return ((unsigned(r & 7) << 2) | unsigned((c & 7) >> 1)) ^ ((quadrant * 13u + kSalt<Use>) & 31u);
}

template <typename P>
inline void check_ptr(const P* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) emu::fail(std::string(what) + ": pointer not 256-bit aligned");
  if ((ldm * sizeof(P)) % 16 != 0) emu::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

// Each lane reads its own elements (the accesses the checker sees), the warp pools them, and
// every lane takes the whole tile. The pool's barriers are the shim's: they order nothing.
template <typename Use, typename Fetch>
inline void pooled_load(float (&v)[16][16], Fetch fetch) {
  float* pool = emu::tl_blk->wmma_pool.data() + (threadIdx.x / 32) * 256;
  const unsigned lane = threadIdx.x & 31;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      if (owner<Use>(r, c) == lane) pool[r * 16 + c] = fetch(r, c);
  emu::warp_barrier();
  std::memcpy(v, pool, sizeof(v));
  emu::warp_barrier();  // the pool is free for the next load
}

template <typename Use, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const P* p, unsigned ldm) {
  static_assert(std::is_same<T, P>::value, "fragment element type and pointer type differ");
  check_ptr(p, ldm, "load_matrix_sync");
  pooled_load<Use>(f.v, [&](int r, int c) {
    return elem(std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r]);
  });
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  check_ptr(p, ldm, "load_matrix_sync (accumulator)");
  pooled_load<accumulator>(f.v, [&](int r, int c) { return l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]; });
}

// Each lane writes its own elements (every lane holds the same tile: mma_sync ran in each).
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  check_ptr(p, ldm, "store_matrix_sync");
  const unsigned lane = threadIdx.x & 31;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      if (owner<accumulator>(r, c) == lane) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
}

// The shim's own fragment arithmetic is left out of the checker's instrumentation: it touches
// no shared memory, and an mma is 8192 loads per lane.
template <typename F>
EMU_UNCHECKED inline void fill_fragment(F& f, float x) {
  for (auto& row : f.v)
    for (auto& e : row) e = x;
}

template <typename T, typename LA, typename LB>
EMU_UNCHECKED inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
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

// ----------------------------------------------------------------------------- ldmatrix, mma.sync
// csrc/mma.cuh's primitives, with PTX's documented lane layouts (that header lists them). The
// lanes exchange addresses and registers through per-warp pools behind the shim's own barriers
// (which order nothing for the hazard checker); each lane reads shared memory for exactly the
// elements it receives, so those reads are the ones the checker sees.
#define FASTLM_EMULATOR 1
namespace emu {
inline void ldmatrix_x4(unsigned (&r)[4], const void* row, bool trans) {
  const unsigned lane = threadIdx.x & 31;
  if (reinterpret_cast<std::uintptr_t>(row) % 16 != 0) fail("ldmatrix: a row address not 16-byte aligned");
  auto* rows = reinterpret_cast<const unsigned char**>(tl_blk->wmma_pool.data() + (threadIdx.x / 32) * 256);
  warp_barrier();  // the pool's previous use is over
  rows[lane] = static_cast<const unsigned char*>(row);
  warp_barrier();
  const unsigned g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    if (!trans) {  // matrix i, row g, 16-bit columns 2t and 2t + 1: one 32-bit word
      r[i] = *reinterpret_cast<const unsigned*>(rows[8 * i + g] + 4 * t);
    } else {  // rows 2t and 2t + 1 of column g (lower half first)
      const unsigned lo = *reinterpret_cast<const std::uint16_t*>(rows[8 * i + 2 * t] + 2 * g);
      const unsigned hi = *reinterpret_cast<const std::uint16_t*>(rows[8 * i + 2 * t + 1] + 2 * g);
      r[i] = lo | (hi << 16);
    }
  }
  warp_barrier();  // every lane has read the addresses
}

template <typename T>
inline float half_of(unsigned word, int which) {
  T x;
  const std::uint16_t bits = static_cast<std::uint16_t>(which ? word >> 16 : word & 0xffffu);
  std::memcpy(&x, &bits, 2);
  return nvcuda::wmma::elem(x);
}

// D (16 x 8) = A (16 x 16) B (16 x 8) + C, float32; every lane computes its own four outputs
// from the whole warp's A and B registers, summing k in order (the hardware's order is its own:
// tests compare with a tolerance).
template <typename T>
inline void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
  const unsigned lane = threadIdx.x & 31;
  unsigned* pool = tl_blk->mma_pool.data() + (threadIdx.x / 32) * 320;
  unsigned *pa = pool, *pb = pool + 128, *pc = pool + 192;
  warp_barrier();
  for (int i = 0; i < 4; ++i) pa[lane * 4 + i] = a[i];
  for (int i = 0; i < 2; ++i) pb[lane * 2 + i] = b[i];
  std::memcpy(pc + lane * 4, c, sizeof(c));
  warp_barrier();
  // A(row, k): lane 4 (row % 8) + (k % 8) / 2, register (row / 8) + 2 (k / 8), half k % 2
  const auto A = [&](int row, int k) {
    return half_of<T>(pa[(4 * (row % 8) + (k % 8) / 2) * 4 + (row / 8) + 2 * (k / 8)], k % 2);
  };
  // B(k, n): lane 4 n + (k % 8) / 2, register k / 8, half k % 2
  const auto B = [&](int k, int n) { return half_of<T>(pb[(4 * n + (k % 8) / 2) * 2 + k / 8], k % 2); };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[i] = acc;
  }
  warp_barrier();  // every lane has read the pool
  std::memcpy(d, out, sizeof(out));
}
}  // namespace emu
