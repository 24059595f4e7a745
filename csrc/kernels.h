// Host entry points of fastlm's CUDA C++ kernels, bound to Python in bindings.cpp.
// Pointers are device addresses as integers (0: absent); `stream` is a cudaStream_t as an
// integer (torch.cuda.current_stream().cuda_stream). Every function throws
// std::runtime_error if its launch fails.
#pragma once

#include <cstdint>

namespace fastlm {

// Layer norm / RMSNorm over rows of n elements, with an optional residual added first.
// x, res: rows with strides stride_xm / stride_rm and unit column stride; y and sum (x + res,
// written when sum != 0) contiguous (m, n); w, b float32 (n,) or absent; mean (skipped when
// rms), rstd float32 (m,).
void norm_fwd(int dtype, std::uintptr_t x, std::uintptr_t res, std::uintptr_t sum, std::uintptr_t y,
              std::uintptr_t w, std::uintptr_t b, std::uintptr_t mean, std::uintptr_t rstd, std::int64_t m,
              std::int64_t n, std::int64_t stride_xm, std::int64_t stride_rm, double eps, bool rms,
              std::uintptr_t stream);

// The backward: dx (contiguous (m, n)) from x (the normalised input), dy and the gradient ds
// flowing into the residual stream from elsewhere (or absent); dw_part / db_part float32
// (programs, n) per-block partial sums of the weight and bias gradients, summed by the caller.
void norm_bwd(int dtype, std::uintptr_t x, std::uintptr_t w, std::uintptr_t mean, std::uintptr_t rstd,
              std::uintptr_t dy, std::uintptr_t ds, std::uintptr_t dx, std::uintptr_t dw_part,
              std::uintptr_t db_part, std::int64_t m, std::int64_t n, std::int64_t stride_xm,
              std::int64_t stride_dym, std::int64_t stride_dsm, bool rms, std::int64_t programs,
              std::uintptr_t stream);

// Softmax cross-entropy over rows of C logits (unit column stride, row stride stride_xr) with
// class-index targets (int64, stride stride_t): ignore_index, label smoothing, z-loss and
// logit soft-capping (0: off), as kernels/cross_entropy.py. Writes per-row float32 loss, lse
// and coef (the softmax's multiplier in the gradient).
void cross_entropy_fwd(int dtype, std::uintptr_t x, std::uintptr_t target, std::uintptr_t loss, std::uintptr_t lse,
                       std::uintptr_t coef, std::int64_t rows, std::int64_t classes, std::int64_t stride_xr,
                       std::int64_t stride_t, std::int64_t ignore_index, double smoothing, double z_loss,
                       double softcap, std::uintptr_t stream);

// dx (row stride stride_dxr, unit column stride; may be x itself) = d loss_row / d x, given
// dloss (float32, stride stride_dl, 0 allowed).
void cross_entropy_bwd(int dtype, std::uintptr_t x, std::uintptr_t target, std::uintptr_t lse, std::uintptr_t coef,
                       std::uintptr_t dloss, std::uintptr_t dx, std::int64_t rows, std::int64_t classes,
                       std::int64_t stride_xr, std::int64_t stride_t, std::int64_t stride_dl,
                       std::int64_t stride_dxr, std::int64_t ignore_index, double smoothing, double softcap,
                       std::uintptr_t stream);

// Flash attention (csrc/attention.cu), float16 / bfloat16, head dims 32, 64, 96 and 128 (D of q,
// k and v alike). q (B, L, H, D), k and v (B, S, HK, D) with the given batch / row / head strides and
// unit stride on D (addresses and strides multiples of 16 bytes); H a multiple of HK. The
// visibility rule: query i sees key j when i + shift - window_left <= j <= i + shift +
// window_right (a side < 0: unbounded; causal is window_right = 0), shift = S - L when
// bottom_right, else 0. Writes out (B, L, H, D) contiguous and lse float32 (B, H, L)
// contiguous (+inf on rows that see no key, whose output is 0).
void attention_fwd(int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                   std::uintptr_t lse, std::int64_t B, std::int64_t L, std::int64_t S, std::int64_t H,
                   std::int64_t HK, std::int64_t D, std::int64_t sqb, std::int64_t sqm, std::int64_t sqh,
                   std::int64_t skb, std::int64_t skn, std::int64_t skh, std::int64_t svb, std::int64_t svn,
                   std::int64_t svh, double scale, bool bottom_right, std::int64_t window_left,
                   std::int64_t window_right, std::uintptr_t stream);

// Its backward: dq (B, L, H, D), dk and dv (B, S, HK, D), all contiguous, from out and dout
// (strides as given) and lse; delta is float32 (B, H, L) contiguous scratch (rowsum(dout * out)).
// Deterministic: no atomics.
void attention_bwd(int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out,
                   std::uintptr_t dout, std::uintptr_t lse, std::uintptr_t delta, std::uintptr_t dq,
                   std::uintptr_t dk, std::uintptr_t dv, std::int64_t B, std::int64_t L, std::int64_t S,
                   std::int64_t H, std::int64_t HK, std::int64_t D, std::int64_t sqb, std::int64_t sqm,
                   std::int64_t sqh, std::int64_t skb, std::int64_t skn, std::int64_t skh, std::int64_t svb,
                   std::int64_t svn, std::int64_t svh, std::int64_t sob, std::int64_t som, std::int64_t soh,
                   std::int64_t sdob, std::int64_t sdom, std::int64_t sdoh, double scale, bool bottom_right,
                   std::int64_t window_left, std::int64_t window_right, std::uintptr_t stream);

// The attention kernels' tile plan (csrc/attention.cu): kernel 0 = forward, 1 = dQ, 2 = dK/dV.
// attention_smem_bytes: the dynamic shared memory a kernel takes at head dim D with walked
// tiles of nc rows (64 or 32), -1 where that variant is not built. attention_tile_cols: the nc
// the launchers pick under an opt-in limit of smem_limit bytes per block (64 where it fits,
// else 32 where built and it fits, else 0: the launch throws).
std::int64_t attention_smem_bytes(std::int64_t kernel, std::int64_t D, std::int64_t nc);
std::int64_t attention_tile_cols(std::int64_t kernel, std::int64_t D, std::int64_t smem_limit);

// The CUDA runtime version the module was built with (linked statically: e.g. 13000 for 13.0)
// and the driver's (cudaDriverGetVersion: the newest CUDA it supports; 0 without a driver, -1
// if the query failed).
// A runtime of a newer major version than the driver's cannot run (csrc/runtime.cu).
int cuda_runtime_version();
int cuda_driver_version();

}  // namespace fastlm
