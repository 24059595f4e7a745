// Flash attention, forward and backward (FlashAttention-2's loop order), on tensor cores.
//
// The contract and formulas of kernels/attention.py (the Triton twin) for the dense case:
// q (B, L, H, D), k and v (B, S, Hk, D) with any batch, row and head strides and a unit
// stride on D; H a multiple of Hk (grouped-query attention: query head h reads key head
// h / (H / Hk)); the softmax scale; the causal / sliding-window rule
//     i + shift - window_left <= j <= i + shift + window_right   (a side of -1: unbounded)
// with shift = S - L when aligned bottom-right (FlashAttention), 0 when top-left (SDPA);
// causal is window_right = 0. A query that sees no key gets out = 0 and lse = +inf, so the
// backward's exp(s - lse) is 0 there. Dropout, masks, soft-capping, packed sequences and
// KV-cache lengths stay with the Triton backend (fastlm/ops/attention.py says so).
//
// Design: correctness over speed, since this was written without a GPU to run it on.
//  * One CTA of 4 warps owns a tile of 64 rows (queries in the forward and dQ, keys in
//    dK/dV); each warp owns 16 of those rows and does all the arithmetic of its rows, so
//    the CTA synchronises only around loading the shared tiles of the other operand.
//  * Tiles are staged in shared memory (padded rows: 16-bit tiles 8 elements = 16 bytes more
//    than their width, float tiles 8 floats = 32 bytes more; see Geometry).
//  * Every matrix product goes through the tensor cores with nvcuda::wmma m16n16k16
//    (bf16 / fp16 inputs, float32 accumulators). The fragments' register layouts are opaque
//    and nothing here relies on them: fragments are only loaded from shared memory
//    (load_matrix_sync; for bf16 its PTX with a .shared address, see load_shared),
//    multiplied (mma_sync) and stored back (store_matrix_sync). Score
//    tiles are stored to shared memory as float32 and the softmax is done there by plain
//    threads (two lanes per row), then the probabilities are stored in the input type for
//    the next product. Semantics relied on (CUDA C++ Programming Guide, "Warp Matrix
//    Functions"): load/store_matrix_sync take a 256-bit aligned pointer and a leading
//    dimension `ldm` in elements, a multiple of 8 for 16-bit types and of 4 for float;
//    a row_major matrix_a/b element (r, c) is at p[r * ldm + c], a col_major one at
//    p[c * ldm + r]; accumulators load and store with mem_row_major the same way; all 32
//    lanes call each function with the same arguments. (These are PTX's wmma.load /
//    wmma.mma / wmma.store .m16n16k16 with .bf16 or .f16 inputs and .f32 accumulators,
//    PTX ISA "Warp Level Matrix Multiply-Accumulate Instructions", sm_80 for bf16.)
//    Every shared-memory tile row and region below is sized so that each fragment pointer
//    is a multiple of 32 bytes (static_asserts check the strides).
//  * Forward: the output accumulator of the 64 x D tile lives in shared memory as float32:
//    per key tile the warp's lanes rescale their rows by alpha = exp2(m_old - m_new), then
//    the warp loads the accumulator into fragments, adds P V and stores it back. The
//    online softmax is in base 2 (scores times scale * log2(e)).
//  * Backward, deterministic (no atomics): a pre-pass delta = rowsum(dO * O) (one warp per
//    row); a kernel per 64-key tile producing dK and dV (accumulated in fragments over the
//    query heads of its group and the query tiles that see it); a kernel per 64-query
//    tile producing dQ (accumulated in fragments over the key tiles it sees).
//  * Global loads are 16 bytes (8 elements) at a time: pointers and the batch, row and head
//    strides must be multiples of 16 bytes (the host checks; the op copies otherwise).
//    Offsets are int64. Tiles need > 48 KiB of shared memory: opted in per launch.
#include <mma.h>

#include <cstdlib>

#include "common.cuh"
#include "kernels.h"

namespace fastlm {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kRows = 64;     // rows of a CTA's own tile (queries or keys)
constexpr int kWarps = 4;     // each warp owns 16 of the kRows rows
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr const char* kHeadDims = "32, 64, 96, 128";  // the head dims instantiated (dispatch_dim)

static_assert(kRows == 16 * kWarps, "one warp per 16 rows");

// Shared-memory geometry for head dim D and NC rows of the walked operand's tiles (all in
// elements; region sizes in bytes). NC is 64, or 32 where the device's opt-in shared memory
// per block is too small for 64 (sm_86 / sm_89 / sm_120: 99 KiB; see tile_cols below).
// Padding: 16-bit rows by 8 elements (16 bytes) and float rows by 8 floats (32 bytes), so
// consecutive rows of a fragment start 4 or 8 banks apart: a 4-float pad put rows 4 banks
// apart and cost a 2-way conflict on every accumulator fragment load and store.
template <int D, int NC>
struct Geometry {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16 (wmma k-steps)");
  static_assert(NC == 64 || NC == 32, "the walked tiles have 64 or 32 rows (two softmax lanes per row)");
  static constexpr int LDT = D + 8;    // 16-bit tiles of q, k, v, dO: row stride
  static constexpr int LDS = NC + 8;   // float score tiles (kRows x NC): row stride
  static constexpr int LDP = NC + 8;   // 16-bit probability tiles (kRows x NC): row stride
  static constexpr int LDO = D + 8;    // float accumulators / output staging: row stride
  static constexpr int kTile = kRows * LDT * 2;    // the CTA's own 64 x D tile of 16-bit values
  static constexpr int kTileNC = NC * LDT * 2;     // a walked NC x D tile
  static constexpr int kScores = kRows * LDS * 4;  // one 64 x NC float tile
  static constexpr int kProbs = kRows * LDP * 2;   // one 64 x NC 16-bit tile
  static constexpr int kAcc = kRows * LDO * 4;     // one 64 x D float tile
  static constexpr int kVec = kRows * 4;           // 64 floats
  static constexpr int kVecNC = NC * 4;            // NC floats
  // ldm multiples of 8 (16-bit) / 4 (float), and every 16-row step a multiple of 32 bytes.
  static_assert(LDT % 8 == 0 && LDP % 8 == 0 && LDS % 4 == 0 && LDO % 4 == 0, "wmma ldm");
  static_assert((16 * LDT * 2) % 32 == 0 && (16 * LDP * 2) % 32 == 0, "wmma 16-bit row steps");
  static_assert((16 * LDS * 4) % 32 == 0 && (16 * LDO * 4) % 32 == 0, "wmma float row steps");
  static_assert(kTile % 128 == 0 && kTileNC % 128 == 0 && kScores % 128 == 0 && kProbs % 128 == 0 &&
                    kAcc % 128 == 0,
                "regions keep 128-byte alignment");
  // Forward: Q tile, K and V tiles, scores, probabilities, output accumulator.
  static constexpr int kFwd = kTile + 2 * kTileNC + kScores + kProbs + kAcc;
  // dQ: Q and dO tiles, K and V tiles, scores, dP, dS, lse and delta of the 64 queries.
  static constexpr int kBwdDq = 2 * kTile + 2 * kTileNC + 2 * kScores + kProbs + 2 * kVec;
  // dK/dV: K and V tiles, Q and dO tiles, scores, dP, P, dS, lse and delta of the NC queries.
  static constexpr int kBwdDkdv = 2 * kTile + 2 * kTileNC + 2 * kScores + 2 * kProbs + 2 * kVecNC;
  // The backward kernels stage their results (64 x D floats) over the start of their region.
  static_assert(kAcc <= kBwdDq && kAcc <= kBwdDkdv, "staging fits");
};

struct Args {
  const void* q;
  const void* k;
  const void* v;
  const void* o;     // the forward's output (backward)
  const void* dout;  // backward
  void* out;         // forward: (B, L, H, D) contiguous
  float* lse;        // (B, H, L) contiguous
  float* delta;      // (B, H, L) contiguous (backward)
  void* dq;          // (B, L, H, D) contiguous
  void* dk;          // (B, S, Hk, D) contiguous
  void* dv;          // (B, S, Hk, D) contiguous
  std::int64_t B, L, S, H, HK, group;
  std::int64_t sqb, sqm, sqh, skb, skn, skh, svb, svn, svh;  // input strides (batch, row, head)
  std::int64_t sob, som, soh, sdob, sdom, sdoh;              // o and dout strides (backward)
  float scale;                                                // softmax scale
  std::int64_t shift, window_left, window_right;              // the visibility rule
};

// Whether query i sees key j (both within their sequence).
__device__ __forceinline__ bool visible(const Args& a, std::int64_t i, std::int64_t j) {
  if (i >= a.L || j >= a.S) return false;
  if (a.window_left >= 0 && j < i + a.shift - a.window_left) return false;
  if (a.window_right >= 0 && j > i + a.shift + a.window_right) return false;
  return true;
}

// Keys [lo, hi) that queries [m_first, m_last] may see; lo a multiple of NC.
template <int NC>
__device__ __forceinline__ void key_range(const Args& a, std::int64_t m_first, std::int64_t m_last, std::int64_t& lo,
                                          std::int64_t& hi) {
  lo = 0;
  hi = a.S;
  if (a.window_right >= 0) hi = min(hi, m_last + a.shift + a.window_right + 1);
  if (a.window_left >= 0) lo = max(std::int64_t{0}, m_first + a.shift - a.window_left) / NC * NC;
}

// Queries [lo, hi) that may see keys [n_first, n_last]; lo a multiple of NC.
template <int NC>
__device__ __forceinline__ void query_range(const Args& a, std::int64_t n_first, std::int64_t n_last, std::int64_t& lo,
                                            std::int64_t& hi) {
  lo = 0;
  hi = a.L;
  if (a.window_right >= 0) lo = max(std::int64_t{0}, n_first - a.shift - a.window_right) / NC * NC;
  if (a.window_left >= 0) hi = min(hi, n_last - a.shift + a.window_left + 1);
}

// Copy ROWS x D elements (row stride `stride` in global memory, unit column stride) into
// a shared tile of ROWS rows with row stride LDT; rows at or past `valid` become zeros.
// 16 bytes per access: src and stride must be 16-byte aligned (the host checks).
template <typename T, int D, int LDT, int ROWS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, std::int64_t stride, std::int64_t valid) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid) v = *reinterpret_cast<const uint4*>(src + r * stride + col);
    *reinterpret_cast<uint4*>(dst + r * LDT + col) = v;
  }
}

// Two floats as the bits of two 16-bit values in one 32-bit word (a at the lower address).
__device__ __forceinline__ unsigned bits16(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ unsigned bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
template <typename T>
__device__ __forceinline__ unsigned pack2(float a, float b) {
  return bits16(from_float<T>(a)) | (bits16(from_float<T>(b)) << 16);
}

// One 16-byte global store (st.global.wb.v4.u32). A plain uint4 assignment is not enough:
// nvcc 13 splits it into four 4-byte stores once the row loop is unrolled (it cannot prove the
// offset pointers' alignment again), so the vector store is asked for by name.
__device__ __forceinline__ void store16(void* p, uint4 v) {
#if defined(__CUDA_ARCH__)
  __stwb(reinterpret_cast<uint4*>(p), v);
#else
  *reinterpret_cast<uint4*>(p) = v;  // the CPU emulator
#endif
}

// Write one lane's share of a row: columns [half * 8 + 16 * t, ... + 8) of D, from a float
// row in shared memory times `mul`, converted to T, 16 bytes at a time (the eight values packed
// into four 32-bit words). dst must be 16-byte aligned (D is a multiple of 16 and the output
// rows are contiguous).
template <typename T, int D>
__device__ __forceinline__ void store_row_half(T* dst, const float* row, float mul, int half) {
  for (int c = half * 8; c < D; c += 16) {
    const float* x = row + c;
    store16(dst + c, make_uint4(pack2<T>(x[0] * mul, x[1] * mul), pack2<T>(x[2] * mul, x[3] * mul),
                                pack2<T>(x[4] * mul, x[5] * mul), pack2<T>(x[6] * mul, x[7] * mul)));
  }
}

using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout>;

// Load a 16-bit input fragment from shared memory (every fragment here comes from a shared
// tile). For __half, wmma::load_matrix_sync is enough: nvcc sees the pointer is shared and
// emits wmma.load...shared.f16. For __nv_bfloat16 it does not (nvcc 13.0: the bf16 builtin
// becomes a generic wmma.load even from an extern __shared__ array, and ptxas then emits
// generic LD.E instead of LDSM), which costs 64-bit addresses and, in dK/dV (D >= 64) and dQ
// (D = 32), enough registers to spill. So the bf16 loads are PTX's own
// wmma.load...shared.bf16 (4 .b32 registers: the fragment's 8 bf16 values, as mma.hpp's
// builtin writes them) with a 32-bit shared address: same semantics as load_matrix_sync
// (PTX ISA, "wmma.load"). The "memory" clobber keeps the load after the shared stores and
// barriers before it, as the builtin is kept. The emulator (no __CUDA_ARCH__) takes the
// load_matrix_sync path. fastlm/bench/static_csrc.py counts generic wmma.loads per kernel.
template <typename Frag, typename T>
__device__ __forceinline__ void load_shared(Frag& f, const T* p, unsigned ldm) {
  wmma::load_matrix_sync(f, p, ldm);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FASTLM_WMMA_LOAD_BF16(USE, LAYOUT, PTX)                                                              \
  __device__ __forceinline__ void load_shared(wmma::fragment<wmma::USE, 16, 16, 16, __nv_bfloat16, wmma::LAYOUT>& f, \
                                              const __nv_bfloat16* p, unsigned ldm) {                      \
    unsigned* x = reinterpret_cast<unsigned*>(f.x);                                                        \
    asm volatile("wmma.load." PTX ".m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;"                      \
                 : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])                                          \
                 : "r"(static_cast<unsigned>(__cvta_generic_to_shared(p))), "r"(ldm)                       \
                 : "memory");                                                                              \
  }
FASTLM_WMMA_LOAD_BF16(matrix_a, row_major, "a.sync.aligned.row")
FASTLM_WMMA_LOAD_BF16(matrix_b, row_major, "b.sync.aligned.row")
FASTLM_WMMA_LOAD_BF16(matrix_b, col_major, "b.sync.aligned.col")
#undef FASTLM_WMMA_LOAD_BF16
#endif

// One warp: C (16 x NCOLS, float, row-major at c with stride ldc) = A Bt^T, where A is
// 16 x K (row-major at a, stride lda) and Bt is NCOLS x K (row-major at bt, stride ldb):
// Bt^T is read as a col_major matrix_b (element (k, n) at bt[n * ldb + k]).
template <typename T, int K, int NCOLS>
__device__ __forceinline__ void warp_gemm_abt(float* c, int ldc, const T* a, int lda, const T* bt, int ldb) {
  FragC acc[NCOLS / 16];
#pragma unroll
  for (int n = 0; n < NCOLS / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    FragA<T> fa;
    load_shared(fa, a + kk * 16, lda);
#pragma unroll
    for (int n = 0; n < NCOLS / 16; ++n) {
      FragB<T, wmma::col_major> fb;
      load_shared(fb, bt + n * 16 * ldb + kk * 16, ldb);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < NCOLS / 16; ++n) wmma::store_matrix_sync(c + n * 16, acc[n], ldc, wmma::mem_row_major);
}

// One warp: acc[0 .. NT) (16 x 16 NT) += A B, A 16 x K (row-major at a, stride lda), B K x 16 NT
// (row-major at b, stride ldb).
template <typename T, int K, int NT>
__device__ __forceinline__ void warp_gemm_ab_acc(FragC* acc, const T* a, int lda, const T* b, int ldb) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    FragA<T> fa;
    load_shared(fa, a + kk * 16, lda);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      FragB<T, wmma::row_major> fb;
      load_shared(fb, b + kk * 16 * ldb + n * 16, ldb);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// ----------------------------------------------------------------------------- forward

template <typename T, int D, int NC>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const Args a, const std::int64_t m_tiles) {
  using G = Geometry<D, NC>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + G::kTile);
  T* sV = reinterpret_cast<T*>(smem + G::kTile + G::kTileNC);
  float* sS = reinterpret_cast<float*>(smem + G::kTile + 2 * G::kTileNC);
  T* sP = reinterpret_cast<T*>(smem + G::kTile + 2 * G::kTileNC + G::kScores);
  float* sO = reinterpret_cast<float*>(smem + G::kTile + 2 * G::kTileNC + G::kScores + G::kProbs);

  const std::int64_t tile = blockIdx.x % m_tiles, bh = blockIdx.x / m_tiles;
  const std::int64_t b = bh / a.H, h = bh % a.H, hk = h / a.group;
  const std::int64_t m0 = tile * kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* q = static_cast<const T*>(a.q) + b * a.sqb + h * a.sqh + m0 * a.sqm;
  const T* k = static_cast<const T*>(a.k) + b * a.skb + hk * a.skh;
  const T* v = static_cast<const T*>(a.v) + b * a.svb + hk * a.svh;

  load_tile<T, D, G::LDT, kRows>(sQ, q, a.sqm, a.L - m0);
  for (int c = threadIdx.x; c < kRows * G::LDO; c += kThreads) sO[c] = 0.0f;

  // This lane's row of the warp's 16 and its half of the columns (interleaved: col = 2t + half).
  const int r = lane >> 1, half = lane & 1;
  const int skew2 = (r >> 2) << 1;  // rows r, r + 4, ... share banks (row strides = 8 mod 32 words): permute their walks
  const std::int64_t i = m0 + warp * 16 + r;
  float* sSw = sS + warp * 16 * G::LDS;
  T* sPw = sP + warp * 16 * G::LDP;
  float* sOw = sO + warp * 16 * G::LDO;
  const float c_scale = a.scale * kLog2e;
  float m_run = -INFINITY, l_run = 0.0f;

  std::int64_t lo, hi;
  key_range<NC>(a, m0, min(m0 + kRows, a.L) - 1, lo, hi);
  __syncthreads();  // sQ and sO ready (also when the loop below does not run)
  for (std::int64_t n0 = lo; n0 < hi; n0 += NC) {
    load_tile<T, D, G::LDT, NC>(sK, k + n0 * a.skn, a.skn, a.S - n0);
    load_tile<T, D, G::LDT, NC>(sV, v + n0 * a.svn, a.svn, a.S - n0);
    __syncthreads();

    // S = Q K^T for the warp's 16 queries.
    warp_gemm_abt<T, D, NC>(sSw, G::LDS, sQ + warp * 16 * G::LDT, G::LDT, sK, G::LDT);
    __syncwarp();

    // Online softmax of row r: two lanes per row, NC / 2 columns each.
    float s[NC / 2];
    float mx = -INFINITY;
#pragma unroll
    for (int t = 0; t < NC / 2; ++t) {
      const int col = ((2 * t) ^ skew2) + half;
      float x = sSw[r * G::LDS + col] * c_scale;
      if (!visible(a, i, n0 + col)) x = -INFINITY;
      s[t] = x;
      mx = fmaxf(mx, x);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_run, mx);
    // A row that has seen nothing yet has max -inf: subtract 0 instead, so every
    // exponential of -inf is a clean 0 (never inf - inf).
    const float m_safe = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2f(m_run - m_safe);
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < NC / 2; ++t) {
      const float p = exp2f(s[t] - m_safe);
      sum += p;
      sPw[r * G::LDP + ((2 * t) ^ skew2) + half] = from_float<T>(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_run = l_run * alpha + sum;
    m_run = m_new;
#pragma unroll 8
    for (int t = 0; t < D / 2; ++t) sOw[r * G::LDO + ((2 * t) ^ skew2) + half] *= alpha;
    __syncwarp();

    // O += P V for the warp's 16 rows (the accumulator goes through shared memory).
    FragA<T> fp[NC / 16];
#pragma unroll
    for (int kk = 0; kk < NC / 16; ++kk) load_shared(fp[kk], sPw + kk * 16, G::LDP);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      FragC acc;
      wmma::load_matrix_sync(acc, sOw + n * 16, G::LDO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < NC / 16; ++kk) {
        FragB<T, wmma::row_major> fv;
        load_shared(fv, sV + kk * 16 * G::LDT + n * 16, G::LDT);
        wmma::mma_sync(acc, fp[kk], fv, acc);
      }
      wmma::store_matrix_sync(sOw + n * 16, acc, G::LDO, wmma::mem_row_major);
    }
    __syncthreads();  // K and V are overwritten next; sO rows are read below
  }
  __syncwarp();

  if (i < a.L) {
    const bool seen = l_run > 0.0f;
    T* out = static_cast<T*>(a.out) + ((b * a.L + i) * a.H + h) * D;
    store_row_half<T, D>(out, sOw + r * G::LDO, seen ? 1.0f / l_run : 0.0f, half);
    if (half == 0) a.lse[(b * a.H + h) * a.L + i] = seen ? (m_run + log2f(l_run)) * kLn2 : INFINITY;
  }
}

// ----------------------------------------------------------------------------- backward

// delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] in float32: one warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_kernel(const Args a) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= a.B * a.L * a.H) return;
  const std::int64_t h = row % a.H, i = (row / a.H) % a.L, b = row / (a.H * a.L);
  const T* o = static_cast<const T*>(a.o) + b * a.sob + i * a.som + h * a.soh;
  const T* d = static_cast<const T*>(a.dout) + b * a.sdob + i * a.sdom + h * a.sdoh;
  float acc = 0.0f;
  for (int c = lane; c < D; c += 32) acc += to_float(o[c]) * to_float(d[c]);
  acc = warp_sum(acc);
  if (lane == 0) a.delta[(b * a.H + h) * a.L + i] = acc;
}

// The lse (in base 2) and delta of queries m0 .. m0 + ROWS - 1 of head (b, h) into shared
// memory; rows past L get lse +inf (so their probabilities are 0) and delta 0.
template <int ROWS>
__device__ __forceinline__ void load_row_stats(const Args& a, std::int64_t b, std::int64_t h, std::int64_t m0,
                                               float* sLse, float* sDelta) {
  for (int t = threadIdx.x; t < ROWS; t += kThreads) {
    const std::int64_t i = m0 + t;
    const bool ok = i < a.L;
    sLse[t] = ok ? a.lse[(b * a.H + h) * a.L + i] * kLog2e : INFINITY;
    sDelta[t] = ok ? a.delta[(b * a.H + h) * a.L + i] : 0.0f;
  }
}

// dQ of 64 queries of head (b, h): dQ = scale * sum over key tiles of dS K, with
// dS = P * (dP - delta), P = exp2(S * scale * log2e - lse * log2e), dP = dO V^T.
template <typename T, int D, int NC>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const Args a, const std::int64_t m_tiles) {
  using G = Geometry<D, NC>;
  constexpr int kWalk = 2 * G::kTile + 2 * G::kTileNC;  // the four input tiles
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sDO = reinterpret_cast<T*>(smem + G::kTile);
  T* sK = reinterpret_cast<T*>(smem + 2 * G::kTile);
  T* sV = reinterpret_cast<T*>(smem + 2 * G::kTile + G::kTileNC);
  float* sS = reinterpret_cast<float*>(smem + kWalk);
  float* sDP = reinterpret_cast<float*>(smem + kWalk + G::kScores);
  T* sDS = reinterpret_cast<T*>(smem + kWalk + 2 * G::kScores);
  float* sLse = reinterpret_cast<float*>(smem + kWalk + 2 * G::kScores + G::kProbs);
  float* sDelta = sLse + kRows;

  const std::int64_t tile = blockIdx.x % m_tiles, bh = blockIdx.x / m_tiles;
  const std::int64_t b = bh / a.H, h = bh % a.H, hk = h / a.group;
  const std::int64_t m0 = tile * kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* q = static_cast<const T*>(a.q) + b * a.sqb + h * a.sqh + m0 * a.sqm;
  const T* dout = static_cast<const T*>(a.dout) + b * a.sdob + h * a.sdoh + m0 * a.sdom;
  const T* k = static_cast<const T*>(a.k) + b * a.skb + hk * a.skh;
  const T* v = static_cast<const T*>(a.v) + b * a.svb + hk * a.svh;

  load_tile<T, D, G::LDT, kRows>(sQ, q, a.sqm, a.L - m0);
  load_tile<T, D, G::LDT, kRows>(sDO, dout, a.sdom, a.L - m0);
  load_row_stats<kRows>(a, b, h, m0, sLse, sDelta);

  const int r = lane >> 1, half = lane & 1;
  const int skew2 = (r >> 2) << 1;  // rows r, r + 4, ... share banks (row strides = 8 mod 32 words): permute their walks
  const std::int64_t i = m0 + warp * 16 + r;
  float* sSw = sS + warp * 16 * G::LDS;
  float* sDPw = sDP + warp * 16 * G::LDS;
  T* sDSw = sDS + warp * 16 * G::LDP;
  const float c_scale = a.scale * kLog2e;

  FragC dq[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(dq[n], 0.0f);

  std::int64_t lo, hi;
  key_range<NC>(a, m0, min(m0 + kRows, a.L) - 1, lo, hi);
  __syncthreads();  // sQ, sDO, sLse, sDelta ready
  for (std::int64_t n0 = lo; n0 < hi; n0 += NC) {
    load_tile<T, D, G::LDT, NC>(sK, k + n0 * a.skn, a.skn, a.S - n0);
    load_tile<T, D, G::LDT, NC>(sV, v + n0 * a.svn, a.svn, a.S - n0);
    __syncthreads();

    warp_gemm_abt<T, D, NC>(sSw, G::LDS, sQ + warp * 16 * G::LDT, G::LDT, sK, G::LDT);    // S = Q K^T
    warp_gemm_abt<T, D, NC>(sDPw, G::LDS, sDO + warp * 16 * G::LDT, G::LDT, sV, G::LDT);  // dP = dO V^T
    __syncwarp();
    const float lse2 = sLse[warp * 16 + r], delta = sDelta[warp * 16 + r];
#pragma unroll 8
    for (int t = 0; t < NC / 2; ++t) {
      const int col = ((2 * t) ^ skew2) + half;
      float ds = 0.0f;
      if (visible(a, i, n0 + col)) {
        const float p = exp2f(sSw[r * G::LDS + col] * c_scale - lse2);
        ds = p * (sDPw[r * G::LDS + col] - delta);
      }
      sDSw[r * G::LDP + col] = from_float<T>(ds);
    }
    __syncwarp();
    warp_gemm_ab_acc<T, NC, D / 16>(dq, sDSw, G::LDP, sK, G::LDT);  // dQ += dS K
    __syncthreads();  // K and V are overwritten next
  }

  // Stage the warp's 16 x D result as float over the start of shared memory, then write.
  __syncthreads();
  float* stage = reinterpret_cast<float*>(smem) + warp * 16 * G::LDO;
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::store_matrix_sync(stage + n * 16, dq[n], G::LDO, wmma::mem_row_major);
  __syncwarp();
  if (i < a.L) {
    T* dst = static_cast<T*>(a.dq) + ((b * a.L + i) * a.H + h) * D;
    store_row_half<T, D>(dst, stage + r * G::LDO, a.scale, half);
  }
}

// dK, dV of 64 keys of head (b, hk), over the query heads of its group and the query tiles
// that see it: dV = sum P^T dO, dK = scale * sum dS^T Q, with the transposed scores
// S^T = K Q^T and dP^T = V dO^T computed directly (the warp's rows are keys).
template <typename T, int D, int NC>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(const Args a, const std::int64_t n_tiles) {
  using G = Geometry<D, NC>;
  constexpr int kWalk = 2 * G::kTile + 2 * G::kTileNC;  // the four input tiles
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = reinterpret_cast<T*>(smem + G::kTile);
  T* sQ = reinterpret_cast<T*>(smem + 2 * G::kTile);
  T* sDO = reinterpret_cast<T*>(smem + 2 * G::kTile + G::kTileNC);
  float* sS = reinterpret_cast<float*>(smem + kWalk);
  float* sDP = reinterpret_cast<float*>(smem + kWalk + G::kScores);
  T* sP = reinterpret_cast<T*>(smem + kWalk + 2 * G::kScores);
  T* sDS = reinterpret_cast<T*>(smem + kWalk + 2 * G::kScores + G::kProbs);
  float* sLse = reinterpret_cast<float*>(smem + kWalk + 2 * G::kScores + 2 * G::kProbs);
  float* sDelta = sLse + NC;

  const std::int64_t tile = blockIdx.x % n_tiles, bhk = blockIdx.x / n_tiles;
  const std::int64_t b = bhk / a.HK, hk = bhk % a.HK;
  const std::int64_t n0 = tile * kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* k = static_cast<const T*>(a.k) + b * a.skb + hk * a.skh + n0 * a.skn;
  const T* v = static_cast<const T*>(a.v) + b * a.svb + hk * a.svh + n0 * a.svn;
  load_tile<T, D, G::LDT, kRows>(sK, k, a.skn, a.S - n0);
  load_tile<T, D, G::LDT, kRows>(sV, v, a.svn, a.S - n0);

  const int r = lane >> 1, half = lane & 1;
  const int skew2 = (r >> 2) << 1;  // rows r, r + 4, ... share banks (row strides = 8 mod 32 words): permute their walks
  const std::int64_t j = n0 + warp * 16 + r;  // this lane's key
  float* sSw = sS + warp * 16 * G::LDS;
  float* sDPw = sDP + warp * 16 * G::LDS;
  T* sPw = sP + warp * 16 * G::LDP;
  T* sDSw = sDS + warp * 16 * G::LDP;
  const float c_scale = a.scale * kLog2e;

  FragC dk[D / 16], dv[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(dk[n], 0.0f);
    wmma::fill_fragment(dv[n], 0.0f);
  }

  std::int64_t lo, hi;
  query_range<NC>(a, n0, min(n0 + kRows, a.S) - 1, lo, hi);
  for (std::int64_t g = 0; g < a.group; ++g) {
    const std::int64_t h = hk * a.group + g;
    const T* q = static_cast<const T*>(a.q) + b * a.sqb + h * a.sqh;
    const T* dout = static_cast<const T*>(a.dout) + b * a.sdob + h * a.sdoh;
    for (std::int64_t m0 = lo; m0 < hi; m0 += NC) {
      __syncthreads();  // the previous tiles of Q, dO, lse, delta are no longer read
      load_tile<T, D, G::LDT, NC>(sQ, q + m0 * a.sqm, a.sqm, a.L - m0);
      load_tile<T, D, G::LDT, NC>(sDO, dout + m0 * a.sdom, a.sdom, a.L - m0);
      load_row_stats<NC>(a, b, h, m0, sLse, sDelta);
      __syncthreads();

      warp_gemm_abt<T, D, NC>(sSw, G::LDS, sK + warp * 16 * G::LDT, G::LDT, sQ, G::LDT);    // S^T = K Q^T
      warp_gemm_abt<T, D, NC>(sDPw, G::LDS, sV + warp * 16 * G::LDT, G::LDT, sDO, G::LDT);  // dP^T = V dO^T
      __syncwarp();
#pragma unroll 8
      for (int t = 0; t < NC / 2; ++t) {
        const int col = ((2 * t) ^ skew2) + half;  // query m0 + col
        float p = 0.0f, ds = 0.0f;
        if (visible(a, m0 + col, j)) {
          p = exp2f(sSw[r * G::LDS + col] * c_scale - sLse[col]);
          ds = p * (sDPw[r * G::LDS + col] - sDelta[col]);
        }
        sPw[r * G::LDP + col] = from_float<T>(p);
        sDSw[r * G::LDP + col] = from_float<T>(ds);
      }
      __syncwarp();
      warp_gemm_ab_acc<T, NC, D / 16>(dv, sPw, G::LDP, sDO, G::LDT);  // dV += P^T dO
      warp_gemm_ab_acc<T, NC, D / 16>(dk, sDSw, G::LDP, sQ, G::LDT);  // dK += dS^T Q
    }
  }

  __syncthreads();  // everyone is done with the tiles: stage results over them
  float* stage = reinterpret_cast<float*>(smem) + warp * 16 * G::LDO;
  const std::int64_t row = ((b * a.S + j) * a.HK + hk) * D;
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::store_matrix_sync(stage + n * 16, dv[n], G::LDO, wmma::mem_row_major);
  __syncwarp();
  if (j < a.S) store_row_half<T, D>(static_cast<T*>(a.dv) + row, stage + r * G::LDO, 1.0f, half);
  __syncwarp();
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::store_matrix_sync(stage + n * 16, dk[n], G::LDO, wmma::mem_row_major);
  __syncwarp();
  if (j < a.S) store_row_half<T, D>(static_cast<T*>(a.dk) + row, stage + r * G::LDO, a.scale, half);
}

// ----------------------------------------------------------------------------- launchers

std::int64_t cdiv(std::int64_t x, std::int64_t y) { return (x + y - 1) / y; }

template <typename Kernel>
void launch(Kernel kernel, std::int64_t blocks, int smem_bytes, cudaStream_t stream, const char* what, const Args& a,
            std::int64_t tiles) {
  if (blocks <= 0) return;
  if (blocks > 0x7fffffff) throw std::invalid_argument(std::string("fastlm ") + what + ": too many blocks");
  cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastlm CUDA kernel ") + what +
                             ": cudaFuncSetAttribute(MaxDynamicSharedMemorySize = " + std::to_string(smem_bytes) +
                             ") failed: " + cudaGetErrorString(err));
  }
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem_bytes, stream>>>(a, tiles);
  check_launch(what);
}

// ----------------------------------------------------------------------------- tile plan

// The kernels, as attention_smem_bytes / attention_tile_cols number them (and
// fastlm/ops/attention.py's mirror of this plan, checked against it in tests).
enum Kernel : int { kKernelFwd = 0, kKernelDq = 1, kKernelDkdv = 2 };

template <int D, int NC>
constexpr int smem_bytes(int kernel) {
  return kernel == kKernelFwd ? Geometry<D, NC>::kFwd
                              : (kernel == kKernelDq ? Geometry<D, NC>::kBwdDq : Geometry<D, NC>::kBwdDkdv);
}

template <int NC>
std::int64_t smem_bytes_for(int kernel, std::int64_t D) {
  switch (D) {
    case 32: return smem_bytes<32, NC>(kernel);
    case 64: return smem_bytes<64, NC>(kernel);
    case 96: return smem_bytes<96, NC>(kernel);
    case 128: return smem_bytes<128, NC>(kernel);
    default: return -1;
  }
}

// Head dims whose kernels are also built with 32-row walked tiles: the others fit 64-row tiles
// in the smallest opt-in shared memory of the targets (99 KiB: sm_86, sm_89, sm_120).
constexpr bool has_nc32(std::int64_t D) { return D == 96 || D == 128; }

// The rows of the walked tiles for `kernel` at head dim D under an opt-in limit of `limit`
// bytes of shared memory per block: 64 where it fits, else 32 where built and it fits, else 0.
std::int64_t tile_cols(int kernel, std::int64_t D, std::int64_t limit) {
  const std::int64_t big = smem_bytes_for<64>(kernel, D);
  if (big < 0) return 0;
  if (big <= limit) return 64;
  if (has_nc32(D) && smem_bytes_for<32>(kernel, D) <= limit) return 32;
  return 0;
}

// The current device's opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin:
// 163 KiB on sm_80, 99 KiB on sm_86 / sm_89 / sm_120, 227 KiB on sm_90 / sm_100), lowered to
// FASTLM_CUDA_SMEM_LIMIT bytes when that is set (so a large GPU can run the small devices' plan:
// the GPU check runs the 32-row tiles on an H200 that way).
std::int64_t device_smem_optin(const char* what) {
  int device = 0, bytes = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastlm ") + what + ": cannot read the device's shared memory per block: " +
                             cudaGetErrorString(err));
  }
  if (const char* cap = std::getenv("FASTLM_CUDA_SMEM_LIMIT")) {
    // ASCII digits only, as fastlm/ops/attention.py's cuda_smem_limit reads it (both must agree).
    bool digits = *cap != '\0';
    for (const char* c = cap; *c; ++c) digits = digits && *c >= '0' && *c <= '9';
    if (!digits) {
      throw std::invalid_argument(std::string("fastlm ") + what + ": FASTLM_CUDA_SMEM_LIMIT must be a number of "
                                  "bytes (ASCII digits), got '" + cap + "'");
    }
    const long long v = std::strtoll(cap, nullptr, 10);
    if (v > 0 && v < bytes) return v;
  }
  return bytes;
}

// The walked-tile rows for `kernel`, or a clear refusal (the op checks first, with the same plan).
std::int64_t plan(int kernel, std::int64_t D, const char* what) {
  const std::int64_t limit = device_smem_optin(what);
  const std::int64_t nc = tile_cols(kernel, D, limit);
  if (nc == 0) {
    throw std::runtime_error(std::string("fastlm ") + what + ": head dim " + std::to_string(D) + " needs " +
                             std::to_string(has_nc32(D) ? smem_bytes_for<32>(kernel, D) : smem_bytes_for<64>(kernel, D)) +
                             " bytes of shared memory per block at least; this device allows " +
                             std::to_string(limit));
  }
  return nc;
}

template <typename T, int D, int NC>
void run_fwd_nc(const Args& a, cudaStream_t stream) {
  const std::int64_t tiles = cdiv(a.L, kRows);
  launch(attn_fwd_kernel<T, D, NC>, tiles * a.B * a.H, Geometry<D, NC>::kFwd, stream, "attention_fwd", a, tiles);
}

template <typename T, int D, int NC>
void run_dkdv_nc(const Args& a, cudaStream_t stream) {
  const std::int64_t n_tiles = cdiv(a.S, kRows);
  launch(attn_bwd_dkdv_kernel<T, D, NC>, n_tiles * a.B * a.HK, Geometry<D, NC>::kBwdDkdv, stream,
         "attention_bwd (dk, dv)", a, n_tiles);
}

template <typename T, int D, int NC>
void run_dq_nc(const Args& a, cudaStream_t stream) {
  const std::int64_t m_tiles = cdiv(a.L, kRows);
  launch(attn_bwd_dq_kernel<T, D, NC>, m_tiles * a.B * a.H, Geometry<D, NC>::kBwdDq, stream, "attention_bwd (dq)", a,
         m_tiles);
}

// Launch RUN<T, D, 64> or RUN<T, D, 32> as the plan says (32 is built for has_nc32 head dims
// only; plan() throws where nothing fits, and any other answer is a bug: never a silent no-op).
#define FASTLM_RUN_PLANNED(RUN, KERNEL, WHAT)                                                  \
  do {                                                                                         \
    const std::int64_t nc = plan(KERNEL, D, WHAT);                                             \
    if (nc == 64) {                                                                            \
      RUN<T, D, 64>(a, stream);                                                                \
      break;                                                                                   \
    }                                                                                          \
    if constexpr (has_nc32(D)) {                                                               \
      if (nc == 32) {                                                                          \
        RUN<T, D, 32>(a, stream);                                                              \
        break;                                                                                 \
      }                                                                                        \
    }                                                                                          \
    throw std::logic_error(std::string("fastlm ") + WHAT + ": no kernel built for " + std::to_string(nc) + \
                           "-row tiles at head dim " + std::to_string(D));                     \
  } while (0)

template <typename T, int D>
void run_fwd(const Args& a, cudaStream_t stream) {
  FASTLM_RUN_PLANNED(run_fwd_nc, kKernelFwd, "attention_fwd");
}

template <typename T, int D>
void run_bwd(const Args& a, cudaStream_t stream) {
  const std::int64_t rows = a.B * a.L * a.H;
  if (rows > 0) {
    if (cdiv(rows, kWarps) > 0x7fffffff) throw std::invalid_argument("fastlm attention_bwd: too many rows");
    attn_bwd_delta_kernel<T, D><<<static_cast<unsigned>(cdiv(rows, kWarps)), kThreads, 0, stream>>>(a);
    check_launch("attention_bwd (delta)");
  }
  FASTLM_RUN_PLANNED(run_dkdv_nc, kKernelDkdv, "attention_bwd (dk, dv)");
  FASTLM_RUN_PLANNED(run_dq_nc, kKernelDq, "attention_bwd (dq)");
}
#undef FASTLM_RUN_PLANNED

template <typename T, bool Bwd>
void dispatch_dim(std::int64_t D, const Args& a, cudaStream_t stream, const char* what) {
  switch (D) {
    case 32: return Bwd ? run_bwd<T, 32>(a, stream) : run_fwd<T, 32>(a, stream);
    case 64: return Bwd ? run_bwd<T, 64>(a, stream) : run_fwd<T, 64>(a, stream);
    case 96: return Bwd ? run_bwd<T, 96>(a, stream) : run_fwd<T, 96>(a, stream);
    case 128: return Bwd ? run_bwd<T, 128>(a, stream) : run_fwd<T, 128>(a, stream);
    default:
      throw std::invalid_argument(std::string("fastlm ") + what + ": head dim " + std::to_string(D) +
                                  " is not built (built: " + kHeadDims + ")");
  }
}

// Dispatch on element type and head dim.
template <bool Bwd>
void dispatch(int dtype, std::int64_t D, const Args& a, cudaStream_t stream, const char* what) {
  switch (dtype) {
    case kFloat16: return dispatch_dim<__half, Bwd>(D, a, stream, what);
    case kBFloat16: return dispatch_dim<__nv_bfloat16, Bwd>(D, a, stream, what);
    default:
      throw std::invalid_argument(std::string("fastlm ") + what + ": dtype code " + std::to_string(dtype) +
                                  " (the attention kernels take float16 and bfloat16)");
  }
}

// 2-byte elements: 16-byte accesses need addresses and strides that are multiples of 8 elements.
// The stride of a dimension of size 1 is never used (its index is always 0), so it may be
// anything: the same rule as fastlm/ops/attention.py's _cuda_ready (tests check they agree).
void check_operand(const char* what, const char* name, std::uintptr_t p, std::int64_t nb, std::int64_t sb,
                   std::int64_t nm, std::int64_t sm, std::int64_t nh, std::int64_t sh) {
  const auto bad = [](std::int64_t n, std::int64_t stride) { return n > 1 && stride % 8 != 0; };
  if (p % 16 != 0 || bad(nb, sb) || bad(nm, sm) || bad(nh, sh)) {
    throw std::invalid_argument(std::string("fastlm ") + what + ": " + name +
                                " must be 16-byte aligned with batch, row and head strides that are multiples "
                                "of 8 elements (got address " + std::to_string(p) + ", strides " +
                                std::to_string(sb) + ", " + std::to_string(sm) + ", " + std::to_string(sh) + ")");
  }
}

Args make_args(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::int64_t B, std::int64_t L, std::int64_t S,
               std::int64_t H, std::int64_t HK, std::int64_t D, std::int64_t sqb, std::int64_t sqm, std::int64_t sqh,
               std::int64_t skb, std::int64_t skn, std::int64_t skh, std::int64_t svb, std::int64_t svn,
               std::int64_t svh, double scale, bool bottom_right, std::int64_t window_left, std::int64_t window_right,
               const char* what) {
  if (B < 0 || L < 0 || S < 0 || H <= 0 || HK <= 0 || H % HK != 0 || D <= 0) {
    throw std::invalid_argument(std::string("fastlm ") + what + ": bad sizes (B " + std::to_string(B) + ", L " +
                                std::to_string(L) + ", S " + std::to_string(S) + ", H " + std::to_string(H) +
                                ", Hk " + std::to_string(HK) + ", D " + std::to_string(D) + ")");
  }
  check_operand(what, "q", q, B, sqb, L, sqm, H, sqh);
  check_operand(what, "k", k, B, skb, S, skn, HK, skh);
  check_operand(what, "v", v, B, svb, S, svn, HK, svh);
  Args a{};
  a.q = reinterpret_cast<const void*>(q);
  a.k = reinterpret_cast<const void*>(k);
  a.v = reinterpret_cast<const void*>(v);
  a.B = B, a.L = L, a.S = S, a.H = H, a.HK = HK, a.group = H / HK;
  a.sqb = sqb, a.sqm = sqm, a.sqh = sqh, a.skb = skb, a.skn = skn, a.skh = skh, a.svb = svb, a.svn = svn, a.svh = svh;
  a.scale = static_cast<float>(scale);
  a.shift = bottom_right ? S - L : 0;
  a.window_left = window_left < 0 ? -1 : window_left;
  a.window_right = window_right < 0 ? -1 : window_right;
  return a;
}

}  // namespace

void attention_fwd(int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                   std::uintptr_t lse, std::int64_t B, std::int64_t L, std::int64_t S, std::int64_t H,
                   std::int64_t HK, std::int64_t D, std::int64_t sqb, std::int64_t sqm, std::int64_t sqh,
                   std::int64_t skb, std::int64_t skn, std::int64_t skh, std::int64_t svb, std::int64_t svn,
                   std::int64_t svh, double scale, bool bottom_right, std::int64_t window_left,
                   std::int64_t window_right, std::uintptr_t stream) {
  Args a = make_args(q, k, v, B, L, S, H, HK, D, sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, scale, bottom_right,
                     window_left, window_right, "attention_fwd");
  check_operand("attention_fwd", "out", out, 1, 0, 1, 0, 1, 0);
  a.out = reinterpret_cast<void*>(out);
  a.lse = reinterpret_cast<float*>(lse);
  if (B == 0 || L == 0) return;
  dispatch<false>(dtype, D, a, reinterpret_cast<cudaStream_t>(stream), "attention_fwd");
}

void attention_bwd(int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                   std::uintptr_t dout, std::uintptr_t lse, std::uintptr_t delta, std::uintptr_t dq,
                   std::uintptr_t dk, std::uintptr_t dv, std::int64_t B, std::int64_t L, std::int64_t S,
                   std::int64_t H, std::int64_t HK, std::int64_t D, std::int64_t sqb, std::int64_t sqm,
                   std::int64_t sqh, std::int64_t skb, std::int64_t skn, std::int64_t skh, std::int64_t svb,
                   std::int64_t svn, std::int64_t svh, std::int64_t sob, std::int64_t som, std::int64_t soh,
                   std::int64_t sdob, std::int64_t sdom, std::int64_t sdoh, double scale, bool bottom_right,
                   std::int64_t window_left, std::int64_t window_right, std::uintptr_t stream) {
  Args a = make_args(q, k, v, B, L, S, H, HK, D, sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, scale, bottom_right,
                     window_left, window_right, "attention_bwd");
  check_operand("attention_bwd", "dout", dout, B, sdob, L, sdom, H, sdoh);
  check_operand("attention_bwd", "dq", dq, 1, 0, 1, 0, 1, 0);
  check_operand("attention_bwd", "dk", dk, 1, 0, 1, 0, 1, 0);
  check_operand("attention_bwd", "dv", dv, 1, 0, 1, 0, 1, 0);
  a.o = reinterpret_cast<const void*>(out);
  a.dout = reinterpret_cast<const void*>(dout);
  a.lse = reinterpret_cast<float*>(lse);
  a.delta = reinterpret_cast<float*>(delta);
  a.dq = reinterpret_cast<void*>(dq);
  a.dk = reinterpret_cast<void*>(dk);
  a.dv = reinterpret_cast<void*>(dv);
  a.sob = sob, a.som = som, a.soh = soh, a.sdob = sdob, a.sdom = sdom, a.sdoh = sdoh;
  if (B == 0 || (L == 0 && S == 0)) return;
  dispatch<true>(dtype, D, a, reinterpret_cast<cudaStream_t>(stream), "attention_bwd");
}

std::int64_t attention_smem_bytes(std::int64_t kernel, std::int64_t D, std::int64_t nc) {
  if (kernel < kKernelFwd || kernel > kKernelDkdv) throw std::invalid_argument("attention_smem_bytes: kernel 0, 1 or 2");
  if (nc == 64) return smem_bytes_for<64>(static_cast<int>(kernel), D);
  if (nc == 32 && has_nc32(D)) return smem_bytes_for<32>(static_cast<int>(kernel), D);
  return -1;
}

std::int64_t attention_tile_cols(std::int64_t kernel, std::int64_t D, std::int64_t smem_limit) {
  if (kernel < kKernelFwd || kernel > kKernelDkdv) throw std::invalid_argument("attention_tile_cols: kernel 0, 1 or 2");
  return tile_cols(static_cast<int>(kernel), D, smem_limit);
}

}  // namespace fastlm
