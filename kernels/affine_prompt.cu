// Affine prompt modulation on CUDA: out = (sum_k w_k P_k) * (1 + gamma) + beta, forward and backward.
//
// One thread per feature d; blocks of kAffinePromptBlock features. The mixed prompt is recomputed where it is
// needed, never stored. No atomics: each output element is reduced by one thread (or one block, in a fixed
// warp-shuffle + shared-memory order), so gradients are bitwise deterministic.
#include "affine_prompt.cuh"
#include "common.cuh"

namespace mrgfast {
namespace cuda {
namespace {

constexpr int kBlock = kAffinePromptBlock;
constexpr int kWarps = kBlock / 32;
constexpr int kBookTile = 8;  // bank entries one thread accumulates in registers at a time

struct Shape {
  int64_t batch, book, length, dim, rows;  // B, K, L, D, T
  bool per_token;                          // gamma/beta are [B, L, D] rather than [B, D]
};

// Row of out / grad holding prompt token l of sample b.
__device__ __forceinline__ int64_t buffer_row(const int64_t* offsets, const Shape& s, int64_t b, int64_t l) {
  return b * s.rows + (offsets ? offsets[b] : 0) + l;
}

// Row of gamma / beta that modulates prompt token l of sample b.
__device__ __forceinline__ int64_t modulation_row(const Shape& s, int64_t b, int64_t l) {
  return s.per_token ? b * s.length + l : b;
}

// sum_k w[b, k] P[k, l, d] (P[l, d] itself without weights), in float.
template <typename T>
__device__ __forceinline__ float mixed_prompt(const T* P, const T* w, const Shape& s, int64_t b, int64_t l,
                                              int64_t d) {
  if (!w) return to_float(P[l * s.dim + d]);
  float mix = 0.0f;
  for (int64_t k = 0; k < s.book; ++k) mix += to_float(w[b * s.book + k]) * to_float(P[(k * s.length + l) * s.dim + d]);
  return mix;
}

// grid (B * L, feature blocks).
template <typename T>
__global__ void affine_prompt_forward_kernel(const T* P, const T* gamma, const T* beta, const T* w, T* out,
                                             const int64_t* offsets, Shape s) {
  const int64_t row = blockIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.x;
  if (d >= s.dim) return;
  const int64_t b = row / s.length, l = row % s.length;
  const int64_t mod = modulation_row(s, b, l) * s.dim + d;
  const float value = mixed_prompt(P, w, s, b, l, d) * (1.0f + to_float(gamma[mod])) + to_float(beta[mod]);
  out[buffer_row(offsets, s, b, l) * s.dim + d] = from_float<T>(value);
}

// Sum of `value` over the block, in a fixed order; the result is valid in thread 0 only.
__device__ __forceinline__ void block_sum(float (&values)[kBookTile], float (&scratch)[kWarps][kBookTile]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kBookTile; ++j) {
    float v = values[j];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) scratch[warp][j] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < kBookTile; ++j) {
      float total = 0.0f;
      for (int i = 0; i < kWarps; ++i) total += scratch[i][j];
      values[j] = total;
    }
  }
  __syncthreads();  // scratch is reused by the next call
}

// grid (B, feature blocks): dgamma/dbeta of sample b (summed over L when [B, D]) and dw partial sums of the block.
template <typename T>
__global__ void affine_prompt_grad_rows_kernel(const T* grad, const T* P, const T* gamma, const T* w,
                                               const int64_t* offsets, T* dgamma, T* dbeta, float* dw_partial,
                                               Shape s) {
  __shared__ float scratch[kWarps][kBookTile];
  const int64_t b = blockIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.x;
  const bool active = d < s.dim;
  const int64_t first = buffer_row(offsets, s, b, 0);
  if (active && (dgamma || dbeta)) {
    float sum_gamma = 0.0f, sum_beta = 0.0f;
    for (int64_t l = 0; l < s.length; ++l) {
      const float g = to_float(grad[(first + l) * s.dim + d]);
      const int64_t mod = modulation_row(s, b, l) * s.dim + d;
      if (dbeta) {
        if (s.per_token) dbeta[mod] = from_float<T>(g);
        else sum_beta += g;
      }
      if (dgamma) {
        const float value = g * mixed_prompt(P, w, s, b, l, d);
        if (s.per_token) dgamma[mod] = from_float<T>(value);
        else sum_gamma += value;
      }
    }
    if (!s.per_token) {
      if (dbeta) dbeta[b * s.dim + d] = from_float<T>(sum_beta);
      if (dgamma) dgamma[b * s.dim + d] = from_float<T>(sum_gamma);
    }
  }
  if (!dw_partial) return;  // the same for every thread of the block, so the barriers below stay uniform
  for (int64_t k0 = 0; k0 < s.book; k0 += kBookTile) {
    float acc[kBookTile] = {};
    if (active) {
      for (int64_t l = 0; l < s.length; ++l) {
        const float dm = to_float(grad[(first + l) * s.dim + d]) *
                         (1.0f + to_float(gamma[modulation_row(s, b, l) * s.dim + d]));
#pragma unroll
        for (int j = 0; j < kBookTile; ++j) {
          if (k0 + j < s.book) acc[j] += dm * to_float(P[((k0 + j) * s.length + l) * s.dim + d]);
        }
      }
    }
    block_sum(acc, scratch);
    if (threadIdx.x == 0) {
      float* dst = dw_partial + (b * gridDim.y + blockIdx.y) * s.book + k0;
      for (int j = 0; j < kBookTile && k0 + j < s.book; ++j) dst[j] = acc[j];
    }
  }
}

// grid (feature blocks, L, bank tiles): dP[k, l, d] = sum_b w[b, k] * grad * (1 + gamma), b in order.
template <typename T>
__global__ void affine_prompt_grad_prompts_kernel(const T* grad, const T* gamma, const T* w, const int64_t* offsets,
                                                  T* dP, Shape s) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (d >= s.dim) return;
  const int64_t l = blockIdx.y, k0 = static_cast<int64_t>(blockIdx.z) * kBookTile;
  float acc[kBookTile] = {};
  for (int64_t b = 0; b < s.batch; ++b) {
    const float dm = to_float(grad[buffer_row(offsets, s, b, l) * s.dim + d]) *
                     (1.0f + to_float(gamma[modulation_row(s, b, l) * s.dim + d]));
    if (!w) {
      acc[0] += dm;
      continue;
    }
#pragma unroll
    for (int j = 0; j < kBookTile; ++j) {
      if (k0 + j < s.book) acc[j] += to_float(w[b * s.book + k0 + j]) * dm;
    }
  }
#pragma unroll
  for (int j = 0; j < kBookTile; ++j) {
    if (k0 + j < s.book) dP[((k0 + j) * s.length + l) * s.dim + d] = from_float<T>(acc[j]);
  }
}

// dw[i] = sum of the feature blocks' partial sums, in block order: one thread per (b, k).
template <typename T>
__global__ void affine_prompt_reduce_dw_kernel(const float* dw_partial, T* dw, int64_t batch, int64_t book,
                                               int64_t blocks) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * book) return;
  const int64_t b = i / book, k = i % book;
  float total = 0.0f;
  for (int64_t j = 0; j < blocks; ++j) total += dw_partial[(b * blocks + j) * book + k];
  dw[i] = from_float<T>(total);
}

template <typename Fn>
void dispatch(int dtype_code, const char* what, Fn&& fn) {
  if (dtype_code == 0) fn(float{});
  else if (dtype_code == 1) fn(__nv_bfloat16{});
  else throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(dtype_code) +
                                   " (expected 0 = float32 or 1 = bfloat16)");
}

template <typename T>
const T* in(uintptr_t address) { return reinterpret_cast<const T*>(address); }
template <typename T>
T* out_ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

}  // namespace

void affine_prompt_forward_cuda(uintptr_t prompts, uintptr_t gamma, uintptr_t beta, uintptr_t weights, uintptr_t out,
                                uintptr_t offsets, int64_t batch, int64_t book, int64_t length, int64_t dim,
                                int64_t rows, bool per_token, int dtype_code, uintptr_t stream) {
  const Shape s{batch, book, length, dim, rows, per_token};
  if (batch * length == 0 || dim == 0) return;
  const dim3 grid(static_cast<unsigned>(batch * length), static_cast<unsigned>(ceil_div(dim, kBlock)));
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch(dtype_code, "affine_prompt_forward_cuda", [&](auto tag) {
    using T = decltype(tag);
    affine_prompt_forward_kernel<T><<<grid, kBlock, 0, cuda_stream>>>(
        in<T>(prompts), in<T>(gamma), in<T>(beta), in<T>(weights), out_ptr<T>(out),
        reinterpret_cast<const int64_t*>(offsets), s);
  });
  check_launch("affine_prompt_forward_kernel");
}

void affine_prompt_backward_cuda(uintptr_t grad, uintptr_t prompts, uintptr_t gamma, uintptr_t weights,
                                 uintptr_t offsets, uintptr_t grad_prompts, uintptr_t grad_gamma, uintptr_t grad_beta,
                                 uintptr_t grad_weights, uintptr_t dw_partial, int64_t batch, int64_t book,
                                 int64_t length, int64_t dim, int64_t rows, bool per_token, int dtype_code,
                                 uintptr_t stream) {
  const Shape s{batch, book, length, dim, rows, per_token};
  if (batch * length == 0 || dim == 0) return;
  if (grad_weights && !dw_partial) throw std::invalid_argument("affine_prompt_backward_cuda: dw needs dw_partial");
  if (length > 65535) throw std::invalid_argument("affine_prompt_backward_cuda: at most 65535 prompt tokens");
  const int64_t blocks = ceil_div(dim, kBlock);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const auto* offs = reinterpret_cast<const int64_t*>(offsets);
  dispatch(dtype_code, "affine_prompt_backward_cuda", [&](auto tag) {
    using T = decltype(tag);
    if (grad_gamma || grad_beta || grad_weights) {
      const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(blocks));
      affine_prompt_grad_rows_kernel<T><<<grid, kBlock, 0, cuda_stream>>>(
          in<T>(grad), in<T>(prompts), in<T>(gamma), in<T>(weights), offs, out_ptr<T>(grad_gamma),
          out_ptr<T>(grad_beta), grad_weights ? reinterpret_cast<float*>(dw_partial) : nullptr, s);
      check_launch("affine_prompt_grad_rows_kernel");
    }
    if (grad_weights) {
      const int threads = 128;
      affine_prompt_reduce_dw_kernel<T><<<static_cast<unsigned>(ceil_div(batch * book, threads)), threads, 0,
                                          cuda_stream>>>(reinterpret_cast<const float*>(dw_partial),
                                                         out_ptr<T>(grad_weights), batch, book, blocks);
      check_launch("affine_prompt_reduce_dw_kernel");
    }
    if (grad_prompts) {
      const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(length),
                      static_cast<unsigned>(ceil_div(book, kBookTile)));
      affine_prompt_grad_prompts_kernel<T><<<grid, kBlock, 0, cuda_stream>>>(
          in<T>(grad), in<T>(gamma), in<T>(weights), offs, out_ptr<T>(grad_prompts), s);
      check_launch("affine_prompt_grad_prompts_kernel");
    }
  });
}

}  // namespace cuda
}  // namespace mrgfast
