// Layer norm and RMSNorm with the residual add fused, forward and backward.
//
// Same contract and formulas as kernels/norm.py (the Triton twin): statistics in float32,
// x + residual rounded to the input type before normalising (the stored residual stream is
// exactly what was normalised), weight and bias gradients as per-block partial sums that the
// caller adds up in a fixed order (deterministic, no atomics).
//
// Forward: one block per row, three passes over the row (mean, centred sum of squares,
// normalise); a row of a few thousand elements stays in L1/L2 between passes.
// Backward: blocks stride over rows; per row two reductions (mean of g * xhat and of g,
// with g = dy * w), then dx; each thread adds its columns' dy * xhat and dy into its block's
// row of the partial buffers.
#include "common.cuh"
#include "kernels.h"

namespace fastlm {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float load_input(const T* x_row, const T* r_row, T* s_row, std::int64_t c, bool store) {
  T v = x_row[c];
  if (r_row != nullptr) {
    v = from_float<T>(to_float(v) + to_float(r_row[c]));
    if (store && s_row != nullptr) s_row[c] = v;
  }
  return to_float(v);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res,
                                                            T* __restrict__ sum, T* __restrict__ y,
                                                            const float* __restrict__ w, const float* __restrict__ b,
                                                            float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                                            std::int64_t n, std::int64_t stride_xm,
                                                            std::int64_t stride_rm, float eps, bool rms) {
  __shared__ float scratch[32];
  const std::int64_t row = blockIdx.x;
  const T* x_row = x + row * stride_xm;
  const T* r_row = res != nullptr ? res + row * stride_rm : nullptr;
  T* s_row = sum != nullptr ? sum + row * n : nullptr;
  T* y_row = y + row * n;

  float mean = 0.0f;
  if (!rms) {
    float acc = 0.0f;
    for (std::int64_t c = threadIdx.x; c < n; c += blockDim.x) acc += load_input(x_row, r_row, s_row, c, true);
    mean = block_sum(acc, scratch) / static_cast<float>(n);
  }
  float acc = 0.0f;
  for (std::int64_t c = threadIdx.x; c < n; c += blockDim.x) {
    const float v = load_input(x_row, r_row, s_row, c, rms) - mean;  // rms: this is the first pass
    acc += v * v;
  }
  const float rstd = rsqrtf(block_sum(acc, scratch) / static_cast<float>(n) + eps);
  if (threadIdx.x == 0) {
    if (!rms) mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  for (std::int64_t c = threadIdx.x; c < n; c += blockDim.x) {
    float v = (load_input(x_row, r_row, s_row, c, false) - mean) * rstd;
    if (w != nullptr) v *= w[c];
    if (b != nullptr) v += b[c];
    y_row[c] = from_float<T>(v);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) norm_bwd_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                                            const float* __restrict__ mean_in,
                                                            const float* __restrict__ rstd_in,
                                                            const T* __restrict__ dy, const T* __restrict__ ds,
                                                            T* __restrict__ dx, float* __restrict__ dw_part,
                                                            float* __restrict__ db_part, std::int64_t m,
                                                            std::int64_t n, std::int64_t stride_xm,
                                                            std::int64_t stride_dym, std::int64_t stride_dsm,
                                                            bool rms) {
  __shared__ float scratch[32];
  float* dw_row = dw_part != nullptr ? dw_part + static_cast<std::int64_t>(blockIdx.x) * n : nullptr;
  float* db_row = db_part != nullptr ? db_part + static_cast<std::int64_t>(blockIdx.x) * n : nullptr;
  for (std::int64_t c = threadIdx.x; c < n; c += blockDim.x) {  // this block's partial sums start at 0
    if (dw_row != nullptr) dw_row[c] = 0.0f;
    if (db_row != nullptr) db_row[c] = 0.0f;
  }
  for (std::int64_t row = blockIdx.x; row < m; row += gridDim.x) {
    const T* x_row = x + row * stride_xm;
    const T* dy_row = dy + row * stride_dym;
    const float mean = rms ? 0.0f : mean_in[row];
    const float rstd = rstd_in[row];
    float sum_gx = 0.0f, sum_g = 0.0f;
    for (std::int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      const float xhat = (to_float(x_row[c]) - mean) * rstd;
      const float g = to_float(dy_row[c]) * (w != nullptr ? w[c] : 1.0f);
      sum_gx += g * xhat;
      sum_g += g;
    }
    const float mean_gx = block_sum(sum_gx, scratch) / static_cast<float>(n);
    const float mean_g = rms ? 0.0f : block_sum(sum_g, scratch) / static_cast<float>(n);
    T* dx_row = dx + row * n;
    for (std::int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      const float xhat = (to_float(x_row[c]) - mean) * rstd;
      const float d = to_float(dy_row[c]);
      const float g = d * (w != nullptr ? w[c] : 1.0f);
      float v = rstd * (g - mean_gx * xhat - mean_g);
      if (ds != nullptr) v += to_float(ds[row * stride_dsm + c]);
      dx_row[c] = from_float<T>(v);
      if (dw_row != nullptr) dw_row[c] += d * xhat;
      if (db_row != nullptr) db_row[c] += d;
    }
  }
}

template <typename T>
void launch_fwd(std::uintptr_t x, std::uintptr_t res, std::uintptr_t sum, std::uintptr_t y, std::uintptr_t w,
                std::uintptr_t b, std::uintptr_t mean, std::uintptr_t rstd, std::int64_t m, std::int64_t n,
                std::int64_t stride_xm, std::int64_t stride_rm, double eps, bool rms, cudaStream_t stream) {
  norm_fwd_kernel<T><<<static_cast<unsigned>(m), kThreads, 0, stream>>>(
      ptr<const T>(x), ptr<const T>(res), ptr<T>(sum), ptr<T>(y), ptr<const float>(w), ptr<const float>(b),
      ptr<float>(mean), ptr<float>(rstd), n, stride_xm, stride_rm, static_cast<float>(eps), rms);
}

template <typename T>
void launch_bwd(std::uintptr_t x, std::uintptr_t w, std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dy,
                std::uintptr_t ds, std::uintptr_t dx, std::uintptr_t dw_part, std::uintptr_t db_part, std::int64_t m,
                std::int64_t n, std::int64_t stride_xm, std::int64_t stride_dym, std::int64_t stride_dsm, bool rms,
                std::int64_t programs, cudaStream_t stream) {
  norm_bwd_kernel<T><<<static_cast<unsigned>(programs), kThreads, 0, stream>>>(
      ptr<const T>(x), ptr<const float>(w), ptr<const float>(mean), ptr<const float>(rstd), ptr<const T>(dy),
      ptr<const T>(ds), ptr<T>(dx), ptr<float>(dw_part), ptr<float>(db_part), m, n, stride_xm, stride_dym,
      stride_dsm, rms);
}

}  // namespace

void norm_fwd(int dtype, std::uintptr_t x, std::uintptr_t res, std::uintptr_t sum, std::uintptr_t y,
              std::uintptr_t w, std::uintptr_t b, std::uintptr_t mean, std::uintptr_t rstd, std::int64_t m,
              std::int64_t n, std::int64_t stride_xm, std::int64_t stride_rm, double eps, bool rms,
              std::uintptr_t stream) {
  if (m <= 0 || n <= 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: launch_fwd<float>(x, res, sum, y, w, b, mean, rstd, m, n, stride_xm, stride_rm, eps, rms, s); break;
    case kFloat16: launch_fwd<__half>(x, res, sum, y, w, b, mean, rstd, m, n, stride_xm, stride_rm, eps, rms, s); break;
    case kBFloat16:
      launch_fwd<__nv_bfloat16>(x, res, sum, y, w, b, mean, rstd, m, n, stride_xm, stride_rm, eps, rms, s);
      break;
    default: throw std::invalid_argument("fastlm norm_fwd: unknown dtype code " + std::to_string(dtype));
  }
  check_launch("norm_fwd");
}

void norm_bwd(int dtype, std::uintptr_t x, std::uintptr_t w, std::uintptr_t mean, std::uintptr_t rstd,
              std::uintptr_t dy, std::uintptr_t ds, std::uintptr_t dx, std::uintptr_t dw_part,
              std::uintptr_t db_part, std::int64_t m, std::int64_t n, std::int64_t stride_xm,
              std::int64_t stride_dym, std::int64_t stride_dsm, bool rms, std::int64_t programs,
              std::uintptr_t stream) {
  if (m <= 0 || n <= 0 || programs <= 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      launch_bwd<float>(x, w, mean, rstd, dy, ds, dx, dw_part, db_part, m, n, stride_xm, stride_dym, stride_dsm, rms,
                        programs, s);
      break;
    case kFloat16:
      launch_bwd<__half>(x, w, mean, rstd, dy, ds, dx, dw_part, db_part, m, n, stride_xm, stride_dym, stride_dsm,
                         rms, programs, s);
      break;
    case kBFloat16:
      launch_bwd<__nv_bfloat16>(x, w, mean, rstd, dy, ds, dx, dw_part, db_part, m, n, stride_xm, stride_dym,
                                stride_dsm, rms, programs, s);
      break;
    default: throw std::invalid_argument("fastlm norm_bwd: unknown dtype code " + std::to_string(dtype));
  }
  check_launch("norm_bwd");
}

}  // namespace fastlm
