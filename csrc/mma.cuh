// Tensor-core primitives whose register layouts PTX documents lane by lane: ldmatrix and
// mma.sync m16n8k16. They are the building blocks of step 1 of the FlashAttention-2 design
// (docs/ARCHITECTURE.md, "Toward FlashAttention-2"): unlike nvcuda::wmma, whose fragment layout
// is unspecified, these let a kernel keep scores, probabilities and the output accumulator in
// registers and know which lane holds which element. No kernel uses them yet.
//
// Layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" and
// "ldmatrix"), with g = lane / 4 ("groupID") and t = lane % 4 ("threadID_in_group"):
//   A (16 x 16, row-major), four 32-bit registers of two 16-bit values each (lower half first):
//     a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..2t+1), a[2] = A(g, 2t+8..2t+9), a[3] = A(g+8, 2t+8..2t+9)
//   B (16 x 8, "col": element (k, n)), two registers: b[0] = B(2t..2t+1, g), b[1] = B(2t+8..2t+9, g)
//   C, D (16 x 8, float32): c[0..1] = C(g, 2t..2t+1), c[2..3] = C(g+8, 2t..2t+1)
//   ldmatrix .x4: lanes 8i .. 8i+7 give the addresses of rows 0..7 of 8 x 8 matrix i (16 bytes
//     each, 16-byte aligned, in shared memory); lane l receives r[i] = matrix i (l/4, 2(l%4)..+1).
//     .trans: r[i] = matrix i (2(l%4), l/4) and (2(l%4)+1, l/4): the transposed matrix's pair.
// So a row-major 16 x 16 tile read with ldmatrix_x4 (lanes 0-15: rows 0-15 at column 0, lanes
// 16-31: rows 0-15 at column 8) is exactly mma's A fragment, and a k-major B tile read with
// ldmatrix_x4_trans, or an n-major one (B^T row-major, as K is in Q K^T) with ldmatrix_x4, gives
// the B fragments of two 8-column blocks.
//
// The CPU emulator (tests/cuda_emulator, which defines FASTLM_EMULATOR) implements the same
// layouts through a per-warp exchange, so kernels built on these run and are hazard-checked there
// (tests/test_cuda_mma.py checks the emulation against a matrix product, and that nvcc accepts
// the PTX below for sm_80 and sm_90).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastlm {
namespace mma {

#if defined(__CUDA_ARCH__)

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(row)))
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(row)))
               : "memory");
}

// D = A B + C, float32 accumulators; T is __half or __nv_bfloat16 (the inputs' type).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                          const float (&c)[4]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                                  const float (&c)[4]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%10, %11, %12, %13};"
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
                 "f"(c[3]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4],
                                                         const unsigned (&b)[2], const float (&c)[4]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%10, %11, %12, %13};"
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
                 "f"(c[3]));
}

#elif defined(FASTLM_EMULATOR)

inline void ldmatrix_x4(unsigned (&r)[4], const void* row) { emu::ldmatrix_x4(r, row, false); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* row) { emu::ldmatrix_x4(r, row, true); }
template <typename T>
inline void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
  emu::mma_16816<T>(d, a, b, c);
}

#else  // nvcc's host pass: declarations only (kernels call these from device code alone)

__device__ void ldmatrix_x4(unsigned (&r)[4], const void* row);
__device__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* row);
template <typename T>
__device__ void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]);

#endif

}  // namespace mma
}  // namespace fastlm
