// Conditional affine prompt modulation on CPU (OpenMP): out = (sum_k w_k P_k) * (1 + gamma) + beta.
//
// Shapes (all contiguous): P [K, L, D] (K = 1 and w = null for prompt-wise prompts), w [B, K], gamma/beta
// [B, D] or [B, L, D] (per_token), out/grad [B, T, D] with the prompts of sample b at rows offsets[b] + l
// (offsets = null: T = L, rows start at 0). The mixed prompt is recomputed per row, never stored.
// Reductions are deterministic: every sum runs in a fixed order that depends on the shapes only, never on
// the thread count (dP over B, dgamma/dbeta over L, dw over L*D in fixed-size feature chunks).
#include "common.h"
#include "registry.h"

#include <omp.h>

#include <algorithm>
#include <vector>

// Hot loops are compiled twice, for AVX2 + FMA (x86-64-v3) and for baseline x86-64, and the loader picks one by
// CPU: wheels still run on any x86-64 (no -march=native), and the common CPUs get 8-wide FMA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MRGFAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MRGFAST_CPU_CLONES
#endif
#define MRGFAST_INLINE inline __attribute__((always_inline))

namespace mrgfast {
namespace {

struct AffineShape {
  int64_t batch, book, length, dim, rows;  // B, K, L, D, T
  bool per_token;                          // gamma/beta are [B, L, D] rather than [B, D]
};

// Row of out / grad holding prompt token l of sample b.
inline int64_t buffer_row(const int64_t* offsets, const AffineShape& s, int64_t b, int64_t l) {
  return b * s.rows + (offsets ? offsets[b] : 0) + l;
}

// Row of gamma / beta that modulates prompt token l of sample b.
inline int64_t modulation_row(const AffineShape& s, int64_t b, int64_t l) {
  return s.per_token ? b * s.length + l : b;
}

// mix[0:n] = sum_k w[b, k] * P[k, l, d0:d0+n] (just P[l] without weights), in float.
template <typename T>
MRGFAST_INLINE void mix_prompt(const T* P, const T* w, const AffineShape& s, int64_t b, int64_t l, int64_t d0,
                               int64_t n, float* mix) {
  const T* p0 = P + l * s.dim + d0;
  const float w0 = w ? load(w, b * s.book) : 1.0f;
  for (int64_t d = 0; d < n; ++d) mix[d] = w0 * load(p0, d);
  for (int64_t k = 1; k < s.book; ++k) {
    const float wk = load(w, b * s.book + k);
    const T* pk = P + (k * s.length + l) * s.dim + d0;
    for (int64_t d = 0; d < n; ++d) mix[d] += wk * load(pk, d);
  }
}

// out row (b, l) = mix * (1 + gamma) + beta; `mix` is D floats of scratch.
template <typename T>
MRGFAST_INLINE void forward_row(const T* P, const T* gamma, const T* beta, const T* w, T* out,
                                const int64_t* offsets, const AffineShape& s, int64_t b, int64_t l, float* mix) {
  const int64_t mod = modulation_row(s, b, l) * s.dim;
  T* dst = out + buffer_row(offsets, s, b, l) * s.dim;
  mix_prompt(P, w, s, b, l, 0, s.dim, mix);
  for (int64_t d = 0; d < s.dim; ++d) store(dst, d, mix[d] * (1.0f + load(gamma, mod + d)) + load(beta, mod + d));
}

// Asks the cache for the n elements at p (one prefetch per 64-byte line).
template <typename T>
MRGFAST_INLINE void prefetch_run(const T* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(p + i);
}

// Feature chunk of one backward task: a function of D only, so the reduction order never depends on threads.
// About 16 chunks for large D (enough tasks for the cores), at least 256 features: long inner loops, and few
// chunks for small D, where per-chunk overheads would dominate.
inline int64_t chunk_size(int64_t dim) {
  const int64_t per_chunk = (dim + 15) / 16;
  return std::min<int64_t>(1024, std::max<int64_t>(256, (per_chunk + 31) / 32 * 32));
}

// dw partial sums keep kLanes lanes per (b, k): lane j sums dm[d] * P[k, l, d] over d = j (mod kLanes), so the
// loops vectorise without a serial accumulator; the lanes are summed in a fixed order at the end.
constexpr int kLanes = 32;

// One (sample, token) over features [0, n) of a chunk, kLanes features at a time so each P[k, l] block is read
// once for all three results: mix = sum_k w_k P_k (if mix), dp[k] += w_k * dm (if dp), lanes[k] += dm * P_k
// (if lanes). p_l points at P[0, l, d0]; entry k is k_stride further; wb holds w[b, :] (ones prompt-wise).
template <typename T>
MRGFAST_INLINE void bank_pass(const T* __restrict p_l, int64_t k_stride, const float* __restrict wb, int64_t book,
                              const float* __restrict dm, int64_t n, float* __restrict mix, float* __restrict dp,
                              int64_t chunk, float* __restrict lanes) {
  for (int64_t d = 0; d < n; d += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - d);
    float* mixed = mix ? mix + d : nullptr;  // accumulated in place: a local array compiles to rep stos/movs
    for (int64_t k = 0; k < book; ++k) {
      const T* pk = p_l + k * k_stride + d;
      const float wk = wb[k];
      if (m == kLanes) {  // full block: fixed trip counts the compiler turns into straight vector code
        if (mixed && k == 0) for (int j = 0; j < kLanes; ++j) mixed[j] = wk * load(pk, j);
        if (mixed && k > 0) for (int j = 0; j < kLanes; ++j) mixed[j] += wk * load(pk, j);
        if (dp) for (int j = 0; j < kLanes; ++j) dp[k * chunk + d + j] += wk * dm[d + j];
        if (lanes) for (int j = 0; j < kLanes; ++j) lanes[k * kLanes + j] += dm[d + j] * load(pk, j);
      } else {
        if (mixed && k == 0) for (int j = 0; j < m; ++j) mixed[j] = wk * load(pk, j);
        if (mixed && k > 0) for (int j = 0; j < m; ++j) mixed[j] += wk * load(pk, j);
        if (dp) for (int j = 0; j < m; ++j) dp[k * chunk + d + j] += wk * dm[d + j];
        if (lanes) for (int j = 0; j < m; ++j) lanes[k * kLanes + j] += dm[d + j] * load(pk, j);
      }
    }
  }
}

// Output pointers are null for gradients that are not needed: that work is skipped.
template <typename T>
struct Grads {
  T* prompts;
  T* gamma;
  T* beta;
  T* weights;
};

// One thread's scratch for backward chunks, sized once per call.
struct Scratch {
  std::vector<float> weights, mix, dm, dp, sum_gamma, sum_beta, lanes;
  Scratch(const AffineShape& s, int64_t chunk, bool prompts, bool gamma, bool beta, bool dw)
      : weights(s.book), mix(chunk), dm(chunk), dp(prompts ? s.book * chunk : 0),
        sum_gamma(gamma && !s.per_token ? s.batch * chunk : 0), sum_beta(beta && !s.per_token ? s.batch * chunk : 0),
        lanes(dw ? s.batch * s.book * kLanes : 0) {}
};

// Gradients for features [d0, d0 + n): dP[:, :, chunk] and dgamma/dbeta[:, chunk] in full, and dw's partial sums
// over this chunk into dw_part[B * K]. Token-major: P[:, l, chunk] stays in cache across the B samples.
template <typename T>
MRGFAST_INLINE void backward_chunk(const T* grad, const T* P, const T* gamma, const T* w, const int64_t* offsets,
                                   const Grads<T>& out, const AffineShape& s, int64_t d0, int64_t n, int64_t chunk,
                                   Scratch& scratch, double* dw_part) {
  const bool summed = !s.per_token;  // dgamma/dbeta sum over the L prompt tokens
  std::fill(scratch.sum_gamma.begin(), scratch.sum_gamma.end(), 0.0f);
  std::fill(scratch.sum_beta.begin(), scratch.sum_beta.end(), 0.0f);
  std::fill(scratch.lanes.begin(), scratch.lanes.end(), 0.0f);
  float *mix = scratch.mix.data(), *dm = scratch.dm.data();
  for (int64_t l = 0; l < s.length; ++l) {
    std::fill(scratch.dp.begin(), scratch.dp.end(), 0.0f);
    for (int64_t b = 0; b < s.batch; ++b) {
      const T* g = grad + buffer_row(offsets, s, b, l) * s.dim + d0;
      const int64_t mod = modulation_row(s, b, l) * s.dim + d0;
      // The grad rows of one chunk are short runs far apart, which hardware prefetchers do not follow: fetch
      // the next (sample, token)'s run while this one is computed.
      const int64_t next_b = b + 1 < s.batch ? b + 1 : 0, next_l = b + 1 < s.batch ? l : l + 1;
      if (next_l < s.length) {
        prefetch_run(grad + buffer_row(offsets, s, next_b, next_l) * s.dim + d0, n);
        if (s.per_token) prefetch_run(gamma + modulation_row(s, next_b, next_l) * s.dim + d0, n);
      }
      if (out.beta) {
        if (summed) {
          float* acc = scratch.sum_beta.data() + b * chunk;
          for (int64_t d = 0; d < n; ++d) acc[d] += load(g, d);
        } else {
          for (int64_t d = 0; d < n; ++d) store(out.beta, mod + d, load(g, d));
        }
      }
      const bool need_dm = out.prompts || out.weights;
      if (!out.gamma && !need_dm) continue;
      float* wb = scratch.weights.data();
      for (int64_t k = 0; k < s.book; ++k) wb[k] = w ? load(w, b * s.book + k) : 1.0f;
      if (need_dm) for (int64_t d = 0; d < n; ++d) dm[d] = load(g, d) * (1.0f + load(gamma, mod + d));
      bank_pass(P + l * s.dim + d0, s.length * s.dim, wb, s.book, dm, n, out.gamma ? mix : nullptr,
                out.prompts ? scratch.dp.data() : nullptr, chunk,
                out.weights ? scratch.lanes.data() + b * s.book * kLanes : nullptr);
      if (out.gamma) {
        if (summed) {
          float* acc = scratch.sum_gamma.data() + b * chunk;
          for (int64_t d = 0; d < n; ++d) acc[d] += load(g, d) * mix[d];
        } else {
          for (int64_t d = 0; d < n; ++d) store(out.gamma, mod + d, load(g, d) * mix[d]);
        }
      }
    }
    if (out.prompts) {
      for (int64_t k = 0; k < s.book; ++k) {
        T* dst = out.prompts + (k * s.length + l) * s.dim + d0;
        const float* acc = scratch.dp.data() + k * chunk;
        for (int64_t d = 0; d < n; ++d) store(dst, d, acc[d]);
      }
    }
  }
  if (out.weights) {
    for (int64_t i = 0; i < s.batch * s.book; ++i) {
      double total = 0.0;
      for (int j = 0; j < kLanes; ++j) total += scratch.lanes[i * kLanes + j];
      dw_part[i] = total;
    }
  }
  if (summed) {
    for (int64_t b = 0; b < s.batch; ++b) {
      const int64_t base = b * s.dim + d0;
      if (out.beta) for (int64_t d = 0; d < n; ++d) store(out.beta, base + d, scratch.sum_beta[b * chunk + d]);
      if (out.gamma) for (int64_t d = 0; d < n; ++d) store(out.gamma, base + d, scratch.sum_gamma[b * chunk + d]);
    }
  }
}

// The cloned (AVX2 / baseline) entry points of the hot loops, one per storage type.
MRGFAST_CPU_CLONES void forward_row_f32(const float* P, const float* gamma, const float* beta, const float* w,
                                        float* out, const int64_t* offsets, const AffineShape& s, int64_t b,
                                        int64_t l, float* mix) {
  forward_row(P, gamma, beta, w, out, offsets, s, b, l, mix);
}
MRGFAST_CPU_CLONES void forward_row_bf16(const uint16_t* P, const uint16_t* gamma, const uint16_t* beta,
                                         const uint16_t* w, uint16_t* out, const int64_t* offsets,
                                         const AffineShape& s, int64_t b, int64_t l, float* mix) {
  forward_row(P, gamma, beta, w, out, offsets, s, b, l, mix);
}
MRGFAST_CPU_CLONES void backward_chunk_f32(const float* grad, const float* P, const float* gamma, const float* w,
                                           const int64_t* offsets, const Grads<float>& out, const AffineShape& s,
                                           int64_t d0, int64_t n, int64_t chunk, Scratch& scratch, double* dw_part) {
  backward_chunk(grad, P, gamma, w, offsets, out, s, d0, n, chunk, scratch, dw_part);
}
MRGFAST_CPU_CLONES void backward_chunk_bf16(const uint16_t* grad, const uint16_t* P, const uint16_t* gamma,
                                            const uint16_t* w, const int64_t* offsets, const Grads<uint16_t>& out,
                                            const AffineShape& s, int64_t d0, int64_t n, int64_t chunk,
                                            Scratch& scratch, double* dw_part) {
  backward_chunk(grad, P, gamma, w, offsets, out, s, d0, n, chunk, scratch, dw_part);
}
inline void forward_row_any(const float* P, const float* g, const float* be, const float* w, float* o,
                            const int64_t* off, const AffineShape& s, int64_t b, int64_t l, float* mix) {
  forward_row_f32(P, g, be, w, o, off, s, b, l, mix);
}
inline void forward_row_any(const uint16_t* P, const uint16_t* g, const uint16_t* be, const uint16_t* w, uint16_t* o,
                            const int64_t* off, const AffineShape& s, int64_t b, int64_t l, float* mix) {
  forward_row_bf16(P, g, be, w, o, off, s, b, l, mix);
}
inline void backward_chunk_any(const float* grad, const float* P, const float* gamma, const float* w,
                               const int64_t* offsets, const Grads<float>& out, const AffineShape& s, int64_t d0,
                               int64_t n, int64_t chunk, Scratch& scratch, double* dw_part) {
  backward_chunk_f32(grad, P, gamma, w, offsets, out, s, d0, n, chunk, scratch, dw_part);
}
inline void backward_chunk_any(const uint16_t* grad, const uint16_t* P, const uint16_t* gamma, const uint16_t* w,
                               const int64_t* offsets, const Grads<uint16_t>& out, const AffineShape& s, int64_t d0,
                               int64_t n, int64_t chunk, Scratch& scratch, double* dw_part) {
  backward_chunk_bf16(grad, P, gamma, w, offsets, out, s, d0, n, chunk, scratch, dw_part);
}

template <typename T>
void affine_forward(const T* P, const T* gamma, const T* beta, const T* w, T* out, const int64_t* offsets,
                    const AffineShape& s, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> mix(s.dim);
    // Token-major order: the B samples of one token run back to back and reuse P[:, l] from cache.
#pragma omp for schedule(static)
    for (int64_t row = 0; row < s.batch * s.length; ++row) {
      forward_row_any(P, gamma, beta, w, out, offsets, s, row % s.batch, row / s.batch, mix.data());
    }
  }
}

// One task per feature chunk: each owns dP[:, :, chunk], dgamma/dbeta[:, chunk] and a row of dw partial sums,
// so no two threads ever write the same element; the chunks' dw partials are then summed in chunk order.
template <typename T>
void affine_backward(const T* grad, const T* P, const T* gamma, const T* w, const int64_t* offsets,
                     const Grads<T>& out, const AffineShape& s, int threads) {
  const int64_t chunk = chunk_size(s.dim);
  const int64_t n_chunks = (s.dim + chunk - 1) / chunk;
  std::vector<double> dw_parts(out.weights ? n_chunks * s.batch * s.book : 0, 0.0);
#pragma omp parallel num_threads(threads)
  {
    Scratch scratch(s, chunk, out.prompts, out.gamma, out.beta, out.weights);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t d0 = c * chunk;
      backward_chunk_any(grad, P, gamma, w, offsets, out, s, d0, std::min(chunk, s.dim - d0), chunk, scratch,
                         out.weights ? dw_parts.data() + c * s.batch * s.book : nullptr);
    }
  }
  if (out.weights) {
    for (int64_t i = 0; i < s.batch * s.book; ++i) {
      double total = 0.0;
      for (int64_t c = 0; c < n_chunks; ++c) total += dw_parts[c * s.batch * s.book + i];
      store(out.weights, i, static_cast<float>(total));
    }
  }
}

void forward_cpu(uintptr_t prompts, uintptr_t gamma, uintptr_t beta, uintptr_t weights, uintptr_t out,
                 uintptr_t offsets, int64_t batch, int64_t book, int64_t length, int64_t dim, int64_t rows,
                 bool per_token, int dtype, int threads) {
  const AffineShape s{batch, book, length, dim, rows, per_token};
  dispatch_dtype(dtype, "affine_prompt_forward_cpu", [&](auto tag) {
    using T = decltype(tag);
    affine_forward(pointer<const T>(prompts), pointer<const T>(gamma), pointer<const T>(beta),
                   pointer<const T>(weights), pointer<T>(out), pointer<const int64_t>(offsets), s, threads);
  });
}

void backward_cpu(uintptr_t grad, uintptr_t prompts, uintptr_t gamma, uintptr_t weights, uintptr_t offsets,
                  uintptr_t grad_prompts, uintptr_t grad_gamma, uintptr_t grad_beta, uintptr_t grad_weights,
                  int64_t batch, int64_t book, int64_t length, int64_t dim, int64_t rows, bool per_token, int dtype,
                  int threads) {
  const AffineShape s{batch, book, length, dim, rows, per_token};
  dispatch_dtype(dtype, "affine_prompt_backward_cpu", [&](auto tag) {
    using T = decltype(tag);
    const Grads<T> grads{pointer<T>(grad_prompts), pointer<T>(grad_gamma), pointer<T>(grad_beta),
                         pointer<T>(grad_weights)};
    affine_backward(pointer<const T>(grad), pointer<const T>(prompts), pointer<const T>(gamma),
                    pointer<const T>(weights), pointer<const int64_t>(offsets), grads, s, threads);
  });
}

void bind_affine_prompt(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("affine_prompt_forward_cpu", &forward_cpu, "out[b, offsets[b] + l] = (w[b] . P[:, l]) * (1 + gamma) + beta",
        py::arg("prompts"), py::arg("gamma"), py::arg("beta"), py::arg("weights"), py::arg("out"),
        py::arg("offsets"), py::arg("batch"), py::arg("book"), py::arg("length"), py::arg("dim"), py::arg("rows"),
        py::arg("per_token"), py::arg("dtype"), py::arg("threads"), py::call_guard<py::gil_scoped_release>());
  m.def("affine_prompt_backward_cpu", &backward_cpu,
        "dP, dgamma, dbeta, dw of affine_prompt from the grad rows at offsets (null outputs are skipped)",
        py::arg("grad"), py::arg("prompts"), py::arg("gamma"), py::arg("weights"), py::arg("offsets"),
        py::arg("grad_prompts"), py::arg("grad_gamma"), py::arg("grad_beta"), py::arg("grad_weights"),
        py::arg("batch"), py::arg("book"), py::arg("length"), py::arg("dim"), py::arg("rows"),
        py::arg("per_token"), py::arg("dtype"), py::arg("threads"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace
}  // namespace mrgfast

MRGFAST_REGISTER(affine_prompt, mrgfast::bind_affine_prompt)
