// Softmax cross-entropy with class-index targets, forward and backward.
//
// The contract and formulas of kernels/cross_entropy.py (the Triton twin) for class indices:
// ignore_index, label smoothing, z-loss, soft-capping. (Class weights and probability
// targets stay with the Triton backend; the op layer routes them there.)
//
// Forward: one block per row; each thread keeps an online softmax (running max, rescaled
// sum of exponentials) and the plain sum of logits (for smoothing) over its strided share of
// the vocabulary, then the block combines them. One read of the row, any vocabulary size.
// Infinite logits give torch's results (fastlm/reference/cross_entropy.py): a -inf logit adds
// nothing to the sum, and a thread that saw only -inf adds nothing to the block's.
// Backward: one block per row, one read of the logits and one write of the gradient (in
// place over the logits when dx == x: each element is read before the same thread writes it).
#include "common.cuh"
#include "kernels.h"

namespace fastlm {
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ float softcapped(float x, float softcap) {
  return softcap > 0.0f ? softcap * tanhf(x / softcap) : x;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ce_fwd_kernel(const T* __restrict__ x, const std::int64_t* __restrict__ target,
                                                          float* __restrict__ loss_out, float* __restrict__ lse_out,
                                                          float* __restrict__ coef_out, std::int64_t classes,
                                                          std::int64_t stride_xr, std::int64_t stride_t,
                                                          std::int64_t ignore_index, float smoothing, float z_loss,
                                                          float softcap) {
  __shared__ float scratch[32];
  const std::int64_t row = blockIdx.x;
  const T* x_row = x + row * stride_xr;
  float m = -INFINITY, s = 0.0f, sum_x = 0.0f;
  for (std::int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
    const float v = softcapped(to_float(x_row[c]), softcap);
    if (v > m) {
      s = s * __expf(m - v) + 1.0f;  // (s is 0 while m is -inf: 0 * 0)
      m = v;
    } else if (v != -INFINITY) {
      // A -inf logit adds nothing; skipped, it never forms exp(-inf - -inf) = NaN in a
      // thread whose every element so far was -inf. (NaN still passes, and poisons the row.)
      s += __expf(v - m);
    }
    sum_x += v;
  }
  const float row_max = block_max(m, scratch);
  // A thread that saw only -inf has s = 0, or NaN if it also saw a NaN, which must reach the row.
  const float total = block_sum(m == -INFINITY ? s : s * __expf(m - row_max), scratch);
  const float lse = row_max + logf(total);
  const float all_x = smoothing > 0.0f ? block_sum(sum_x, scratch) : 0.0f;
  if (threadIdx.x != 0) return;
  const std::int64_t t = target[row * stride_t];
  const bool counted = t != ignore_index;
  const bool valid = counted && t >= 0 && t < classes;
  const float x_t = valid ? softcapped(to_float(x_row[t]), softcap) : 0.0f;
  const float n = static_cast<float>(classes);
  float loss = (1.0f - smoothing) * (lse - x_t);
  float coef = 1.0f - smoothing;
  if (smoothing > 0.0f) {
    loss += smoothing / n * (lse * n - all_x);
    coef += smoothing;
  }
  loss += z_loss * lse * lse;
  coef += 2.0f * z_loss * lse;
  loss = counted ? (valid ? loss : NAN) : 0.0f;
  loss_out[row] = loss;
  lse_out[row] = lse;
  coef_out[row] = valid ? coef : 0.0f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ce_bwd_kernel(const T* x, const std::int64_t* __restrict__ target,
                                                          const float* __restrict__ lse_in,
                                                          const float* __restrict__ coef_in,
                                                          const float* __restrict__ dloss, T* dx,
                                                          std::int64_t classes, std::int64_t stride_xr,
                                                          std::int64_t stride_t, std::int64_t stride_dl,
                                                          std::int64_t stride_dxr, std::int64_t ignore_index,
                                                          float smoothing, float softcap) {
  const std::int64_t row = blockIdx.x;
  const T* x_row = x + row * stride_xr;
  T* dx_row = dx + row * stride_dxr;
  const float lse = lse_in[row], coef = coef_in[row];
  const std::int64_t t = target[row * stride_t];
  const bool counted = t != ignore_index;
  const bool valid = counted && t >= 0 && t < classes;
  const float g = valid ? dloss[row * stride_dl] : (counted ? NAN : 0.0f);
  const float uniform = smoothing / static_cast<float>(classes);
  for (std::int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
    const float xc = softcapped(to_float(x_row[c]), softcap);
    float grad = __expf(xc - lse) * coef - uniform - (c == t ? 1.0f - smoothing : 0.0f);
    grad *= g;
    if (softcap > 0.0f) {
      const float th = xc / softcap;
      grad *= 1.0f - th * th;
    }
    dx_row[c] = from_float<T>(grad);
  }
}

template <typename T>
void launch_fwd(std::uintptr_t x, std::uintptr_t target, std::uintptr_t loss, std::uintptr_t lse, std::uintptr_t coef,
                std::int64_t rows, std::int64_t classes, std::int64_t stride_xr, std::int64_t stride_t,
                std::int64_t ignore_index, double smoothing, double z_loss, double softcap, cudaStream_t stream) {
  ce_fwd_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      ptr<const T>(x), ptr<const std::int64_t>(target), ptr<float>(loss), ptr<float>(lse), ptr<float>(coef), classes,
      stride_xr, stride_t, ignore_index, static_cast<float>(smoothing), static_cast<float>(z_loss),
      static_cast<float>(softcap));
}

template <typename T>
void launch_bwd(std::uintptr_t x, std::uintptr_t target, std::uintptr_t lse, std::uintptr_t coef, std::uintptr_t dloss,
                std::uintptr_t dx, std::int64_t rows, std::int64_t classes, std::int64_t stride_xr,
                std::int64_t stride_t, std::int64_t stride_dl, std::int64_t stride_dxr, std::int64_t ignore_index,
                double smoothing, double softcap, cudaStream_t stream) {
  ce_bwd_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      ptr<const T>(x), ptr<const std::int64_t>(target), ptr<const float>(lse), ptr<const float>(coef),
      ptr<const float>(dloss), ptr<T>(dx), classes, stride_xr, stride_t, stride_dl, stride_dxr, ignore_index,
      static_cast<float>(smoothing), static_cast<float>(softcap));
}

}  // namespace

void cross_entropy_fwd(int dtype, std::uintptr_t x, std::uintptr_t target, std::uintptr_t loss, std::uintptr_t lse,
                       std::uintptr_t coef, std::int64_t rows, std::int64_t classes, std::int64_t stride_xr,
                       std::int64_t stride_t, std::int64_t ignore_index, double smoothing, double z_loss,
                       double softcap, std::uintptr_t stream) {
  if (rows <= 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      launch_fwd<float>(x, target, loss, lse, coef, rows, classes, stride_xr, stride_t, ignore_index, smoothing,
                        z_loss, softcap, s);
      break;
    case kFloat16:
      launch_fwd<__half>(x, target, loss, lse, coef, rows, classes, stride_xr, stride_t, ignore_index, smoothing,
                         z_loss, softcap, s);
      break;
    case kBFloat16:
      launch_fwd<__nv_bfloat16>(x, target, loss, lse, coef, rows, classes, stride_xr, stride_t, ignore_index,
                                smoothing, z_loss, softcap, s);
      break;
    default: throw std::invalid_argument("fastlm cross_entropy_fwd: unknown dtype code " + std::to_string(dtype));
  }
  check_launch("cross_entropy_fwd");
}

void cross_entropy_bwd(int dtype, std::uintptr_t x, std::uintptr_t target, std::uintptr_t lse, std::uintptr_t coef,
                       std::uintptr_t dloss, std::uintptr_t dx, std::int64_t rows, std::int64_t classes,
                       std::int64_t stride_xr, std::int64_t stride_t, std::int64_t stride_dl,
                       std::int64_t stride_dxr, std::int64_t ignore_index, double smoothing, double softcap,
                       std::uintptr_t stream) {
  if (rows <= 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      launch_bwd<float>(x, target, lse, coef, dloss, dx, rows, classes, stride_xr, stride_t, stride_dl, stride_dxr,
                        ignore_index, smoothing, softcap, s);
      break;
    case kFloat16:
      launch_bwd<__half>(x, target, lse, coef, dloss, dx, rows, classes, stride_xr, stride_t, stride_dl, stride_dxr,
                         ignore_index, smoothing, softcap, s);
      break;
    case kBFloat16:
      launch_bwd<__nv_bfloat16>(x, target, lse, coef, dloss, dx, rows, classes, stride_xr, stride_t, stride_dl,
                                stride_dxr, ignore_index, smoothing, softcap, s);
      break;
    default: throw std::invalid_argument("fastlm cross_entropy_bwd: unknown dtype code " + std::to_string(dtype));
  }
  check_launch("cross_entropy_bwd");
}

}  // namespace fastlm
