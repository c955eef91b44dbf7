// Token grouping on CUDA: a gather of token rows into grouped slots with the LayerNorm fused into it (statistics
// computed on the fly by the slot's warp), and the inverse permutation with the LayerNorm backward fused into it.
//
// One warp per slot / token; lanes stride over the features, so every row access is coalesced. Reductions are
// warp shuffles in a fixed order and dgamma/dbeta go to per-warp partial rows: results are deterministic.
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "group_tokens.cuh"

namespace mrgfast {
namespace cuda {
namespace {

constexpr int kWarps = kGroupTokensWarps;

struct Layout {
  int64_t batch, height, width, block_h, block_w, dim;

  __device__ __forceinline__ int64_t blocks_w() const { return (width + block_w - 1) / block_w; }
  __device__ __forceinline__ int64_t groups() const { return (height + block_h - 1) / block_h * blocks_w(); }
  __device__ __forceinline__ int64_t group() const { return block_h * block_w; }
  __device__ __forceinline__ int64_t tokens() const { return height * width; }

  // Source token (within its image) of neighbour j of grouped token m, or -1 for a padding slot.
  __device__ __forceinline__ int64_t source(int64_t m, int64_t j) const {
    const int64_t row = (m / blocks_w()) * block_h + j / block_w;
    const int64_t col = (m % blocks_w()) * block_w + j % block_w;
    return (row < height && col < width) ? row * width + col : -1;
  }

  // Slot (grouped token * group + neighbour) of token t of an image: the inverse of source().
  __device__ __forceinline__ int64_t slot(int64_t t) const {
    const int64_t row = t / width, col = t % width;
    const int64_t m = (row / block_h) * blocks_w() + col / block_w;
    return m * group() + (row % block_h) * block_w + col % block_w;
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ float weight_or(const T* w, int64_t d, float fallback) {
  return w ? to_float(w[d]) : fallback;
}

// grid: ceil(slots / kWarps) blocks of kWarps warps; warp s fills slot s (its exit is warp-uniform).
template <typename T, bool kNormalize>
__global__ void group_forward_kernel(const T* __restrict__ x, T* __restrict__ out, float* __restrict__ mean_out,
                                     float* __restrict__ rstd_out, const T* __restrict__ gamma,
                                     const T* __restrict__ beta, Layout L, float eps, int64_t slots) {
  const int lane = threadIdx.x % 32;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (s >= slots) return;
  const int64_t D = L.dim, G = L.group(), per_image = L.groups() * G;
  const int64_t b = s / per_image, m = (s % per_image) / G, j = s % G;
  T* dst = out ? out + s * D : nullptr;
  const int64_t t = L.source(m, j);
  if (t < 0) {
    if (dst)
      for (int64_t d = lane; d < D; d += 32) dst[d] = from_float<T>(0.0f);
    return;
  }
  const int64_t token = b * L.tokens() + t;
  const T* src = x + token * D;
  if (!kNormalize) {
    if (dst)
      for (int64_t d = lane; d < D; d += 32) dst[d] = src[d];
    return;
  }
  // Two passes over the row (it stays in L1): no cancellation in the variance, as torch's LayerNorm.
  float sum = 0.0f;
  for (int64_t d = lane; d < D; d += 32) sum += to_float(src[d]);
  const float mean = warp_sum(sum) / static_cast<float>(D);
  float squares = 0.0f;
  for (int64_t d = lane; d < D; d += 32) {
    const float centred = to_float(src[d]) - mean;
    squares += centred * centred;
  }
  const float rstd = 1.0f / sqrtf(warp_sum(squares) / static_cast<float>(D) + eps);
  if (lane == 0 && mean_out) mean_out[token] = mean;
  if (lane == 0 && rstd_out) rstd_out[token] = rstd;
  if (!dst) return;
  for (int64_t d = lane; d < D; d += 32) {
    const float v = (to_float(src[d]) - mean) * rstd * weight_or(gamma, d, 1.0f) + weight_or(beta, d, 0.0f);
    dst[d] = from_float<T>(v);
  }
}

// grid: ceil(warps / kWarps) blocks; warp w handles tokens w, w + warps, ... and owns row w of the partials.
template <typename T, bool kNormalize>
__global__ void group_backward_kernel(const T* __restrict__ grad_out, T* __restrict__ grad_x,
                                      const T* __restrict__ x, const float* __restrict__ mean,
                                      const float* __restrict__ rstd, const T* __restrict__ gamma,
                                      float* __restrict__ dgamma_partial, float* __restrict__ dbeta_partial,
                                      Layout L, int64_t warps) {
  const int lane = threadIdx.x % 32;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (w >= warps) return;
  const int64_t D = L.dim, N = L.tokens(), per_image = L.groups() * L.group(), tokens = L.batch * N;
  float* my_dgamma = dgamma_partial ? dgamma_partial + w * D : nullptr;
  float* my_dbeta = dbeta_partial ? dbeta_partial + w * D : nullptr;
  // A lane always owns the same features d = lane + 32k, so its partial updates never race.
  for (int64_t d = lane; d < D; d += 32) {
    if (my_dgamma) my_dgamma[d] = 0.0f;
    if (my_dbeta) my_dbeta[d] = 0.0f;
  }
  for (int64_t token = w; token < tokens; token += warps) {
    const int64_t b = token / N;
    const T* g = grad_out + (b * per_image + L.slot(token % N)) * D;
    T* dx = grad_x ? grad_x + token * D : nullptr;
    if (!kNormalize) {
      if (dx)
        for (int64_t d = lane; d < D; d += 32) dx[d] = g[d];
      continue;
    }
    const T* row = x + token * D;
    const float mu = mean[token], r = rstd[token];
    float sum_gg = 0.0f, sum_ggx = 0.0f;
    for (int64_t d = lane; d < D; d += 32) {
      const float gd = to_float(g[d]);
      const float xhat = (to_float(row[d]) - mu) * r;
      const float gg = gd * weight_or(gamma, d, 1.0f);
      sum_gg += gg;
      sum_ggx += gg * xhat;
      if (my_dgamma) my_dgamma[d] += gd * xhat;
      if (my_dbeta) my_dbeta[d] += gd;
    }
    if (!dx) continue;
    const float c1 = warp_sum(sum_gg) / static_cast<float>(D), c2 = warp_sum(sum_ggx) / static_cast<float>(D);
    for (int64_t d = lane; d < D; d += 32) {
      const float xhat = (to_float(row[d]) - mu) * r;
      const float gg = to_float(g[d]) * weight_or(gamma, d, 1.0f);
      dx[d] = from_float<T>(r * (gg - c1 - xhat * c2));
    }
  }
}

// Calls fn(T{}) with T = float or __nv_bfloat16 for a dtype code.
template <typename Fn>
void dispatch(int dtype_code, const char* what, Fn&& fn) {
  if (dtype_code == 0) {
    fn(float{});
  } else if (dtype_code == 1) {
    fn(__nv_bfloat16{});
  } else {
    throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(dtype_code) +
                                " (expected 0 = float32 or 1 = bfloat16)");
  }
}

}  // namespace

void group_tokens_forward_cuda(uintptr_t x, uintptr_t out, uintptr_t mean, uintptr_t rstd, uintptr_t gamma,
                               uintptr_t beta, int64_t batch, int64_t height, int64_t width, int64_t block_h,
                               int64_t block_w, int64_t dim, double eps, bool normalize, int dtype_code,
                               uintptr_t stream) {
  const Layout L{batch, height, width, block_h, block_w, dim};
  const int64_t blocks_w = (width + block_w - 1) / block_w;
  const int64_t slots = batch * ((height + block_h - 1) / block_h) * blocks_w * block_h * block_w;
  if (slots == 0 || dim == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(slots, kWarps)));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch(dtype_code, "group_tokens_forward_cuda", [&](auto tag) {
    using T = decltype(tag);
    const T* src = reinterpret_cast<const T*>(x);
    T* dst = reinterpret_cast<T*>(out);
    if (normalize) {
      group_forward_kernel<T, true><<<grid, kWarps * 32, 0, s>>>(
          src, dst, reinterpret_cast<float*>(mean), reinterpret_cast<float*>(rstd),
          reinterpret_cast<const T*>(gamma), reinterpret_cast<const T*>(beta), L, static_cast<float>(eps), slots);
    } else {
      group_forward_kernel<T, false><<<grid, kWarps * 32, 0, s>>>(src, dst, nullptr, nullptr, nullptr, nullptr, L,
                                                                  0.0f, slots);
    }
  });
  check_launch("group_forward_kernel");
}

void group_tokens_backward_cuda(uintptr_t grad_out, uintptr_t grad_x, uintptr_t x, uintptr_t mean, uintptr_t rstd,
                                uintptr_t gamma, uintptr_t dgamma_partial, uintptr_t dbeta_partial, int64_t warps,
                                int64_t batch, int64_t height, int64_t width, int64_t block_h, int64_t block_w,
                                int64_t dim, bool normalize, int dtype_code, uintptr_t stream) {
  const Layout L{batch, height, width, block_h, block_w, dim};
  if (warps <= 0 || dim == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(warps, kWarps)));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch(dtype_code, "group_tokens_backward_cuda", [&](auto tag) {
    using T = decltype(tag);
    const T* g = reinterpret_cast<const T*>(grad_out);
    T* dx = reinterpret_cast<T*>(grad_x);
    if (normalize) {
      group_backward_kernel<T, true><<<grid, kWarps * 32, 0, s>>>(
          g, dx, reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(mean),
          reinterpret_cast<const float*>(rstd), reinterpret_cast<const T*>(gamma),
          reinterpret_cast<float*>(dgamma_partial), reinterpret_cast<float*>(dbeta_partial), L, warps);
    } else {
      group_backward_kernel<T, false><<<grid, kWarps * 32, 0, s>>>(g, dx, nullptr, nullptr, nullptr, nullptr,
                                                                   nullptr, nullptr, L, warps);
    }
  });
  check_launch("group_backward_kernel");
}

}  // namespace cuda
}  // namespace mrgfast
