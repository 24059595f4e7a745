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

}  // namespace fastlm
