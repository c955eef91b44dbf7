// Visual-token grouping on CPU: gather token rows into grouped slots (optionally LayerNorm-ing each row on the
// way, so the normalised grouped matrix is written once), and the inverse permutation with the LayerNorm backward.
#include "common.h"
#include "registry.h"

#include <omp.h>

#include <cmath>
#include <vector>

namespace mrgfast {
namespace {

// The grouping layout of mrgfast/ops/group_tokens.py (GroupLayout): a row-major (height, width) token grid cut
// into (block_h, block_w) blocks in row-major order; slot j of a block is its neighbour (j / block_w, j % block_w).
struct Layout {
  int64_t batch, height, width, block_h, block_w, dim;

  int64_t blocks_w() const { return (width + block_w - 1) / block_w; }
  int64_t groups() const { return (height + block_h - 1) / block_h * blocks_w(); }
  int64_t group() const { return block_h * block_w; }
  int64_t tokens() const { return height * width; }

  // Source token (within its image) of slot j of grouped token m, or -1 for a zero-padding slot.
  int64_t source(int64_t m, int64_t j) const {
    const int64_t row = (m / blocks_w()) * block_h + j / block_w;
    const int64_t col = (m % blocks_w()) * block_w + j % block_w;
    return (row < height && col < width) ? row * width + col : -1;
  }

  // Slot (grouped token * group + neighbour) that token t of an image lands in: the inverse of source().
  int64_t slot(int64_t t) const {
    const int64_t row = t / width, col = t % width;
    const int64_t m = (row / block_h) * blocks_w() + col / block_w;
    return m * group() + (row % block_h) * block_w + col % block_w;
  }
};

// Mean and 1/sqrt(var + eps) of one row, two passes in float (as torch's CPU LayerNorm, within rounding).
template <typename T>
void row_stats(const T* row, int64_t dim, float eps, float& mean, float& rstd) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < dim; ++d) sum += load(row, d);
  mean = sum / static_cast<float>(dim);
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t d = 0; d < dim; ++d) {
    const float centred = load(row, d) - mean;
    squares += centred * centred;
  }
  rstd = 1.f / std::sqrt(squares / static_cast<float>(dim) + eps);
}

// out[b, m, j*D:(j+1)*D] = norm(x[b, source(m, j)]) or zeros; mean/rstd[b*N + t] written when given (and norm).
// out may be null (statistics only). gamma/beta may be null (weight 1, bias 0).
template <typename T>
void group_forward(const T* x, T* out, float* mean_out, float* rstd_out, const T* gamma, const T* beta,
                   const Layout& L, bool normalize, float eps, int threads) {
  const int64_t D = L.dim, G = L.group(), per_image = L.groups() * G;
  const int64_t slots = L.batch * per_image;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t b = s / per_image, m = (s % per_image) / G, j = s % G;
    T* dst = out ? out + s * D : nullptr;
    const int64_t t = L.source(m, j);
    if (t < 0) {
      if (dst) std::memset(dst, 0, sizeof(T) * D);  // all-zero bits are +0 in fp32 and bf16
      continue;
    }
    const int64_t token = b * L.tokens() + t;
    const T* src = x + token * D;
    if (!normalize) {
      if (dst) std::memcpy(dst, src, sizeof(T) * D);
      continue;
    }
    float mean, rstd;
    row_stats(src, D, eps, mean, rstd);
    if (mean_out) mean_out[token] = mean;
    if (rstd_out) rstd_out[token] = rstd;
    if (!dst) continue;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      float v = (load(src, d) - mean) * rstd;
      if (gamma) v *= load(gamma, d);
      if (beta) v += load(beta, d);
      store(dst, d, v);
    }
  }
}

// Inverse of group_forward for gradients: each token reads its slot of grad_out (pad slots are dropped).
// With normalize, applies the LayerNorm backward with the saved/recomputed mean and rstd:
// dx = rstd * (g*gamma - mean(g*gamma) - xhat * mean(g*gamma*xhat)); dgamma = sum g*xhat, dbeta = sum g over
// tokens, summed per thread and then in thread order (deterministic for a thread count). Null outputs are skipped.
template <typename T>
void group_backward(const T* grad_out, T* grad_x, const T* x, const float* mean, const float* rstd,
                    const T* gamma, float* dgamma, float* dbeta, const Layout& L, bool normalize, int threads) {
  const int64_t D = L.dim, N = L.tokens(), per_image = L.groups() * L.group();
  const int64_t tokens = L.batch * N;
  const bool weights = normalize && (dgamma || dbeta);
  std::vector<float> partial(weights ? static_cast<size_t>(threads) * 2 * D : 0, 0.f);
#pragma omp parallel num_threads(threads)
  {
    float* my_dgamma = weights ? partial.data() + static_cast<size_t>(omp_get_thread_num()) * 2 * D : nullptr;
    float* my_dbeta = weights ? my_dgamma + D : nullptr;
#pragma omp for schedule(static)
    for (int64_t token = 0; token < tokens; ++token) {
      const int64_t b = token / N, t = token % N;
      const T* g = grad_out + (b * per_image + L.slot(t)) * D;
      T* dx = grad_x ? grad_x + token * D : nullptr;
      if (!normalize) {
        if (dx) std::memcpy(dx, g, sizeof(T) * D);
        continue;
      }
      const T* row = x + token * D;
      const float mu = mean[token], r = rstd[token];
      if (weights) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const float gd = load(g, d);
          my_dgamma[d] += gd * (load(row, d) - mu) * r;
          my_dbeta[d] += gd;
        }
      }
      if (!dx) continue;
      float sum_gg = 0.f, sum_ggx = 0.f;
#pragma omp simd reduction(+ : sum_gg, sum_ggx)
      for (int64_t d = 0; d < D; ++d) {
        const float gg = load(g, d) * (gamma ? load(gamma, d) : 1.f);
        sum_gg += gg;
        sum_ggx += gg * (load(row, d) - mu) * r;
      }
      const float c1 = sum_gg / static_cast<float>(D), c2 = sum_ggx / static_cast<float>(D);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const float gg = load(g, d) * (gamma ? load(gamma, d) : 1.f);
        const float xhat = (load(row, d) - mu) * r;
        store(dx, d, r * (gg - c1 - xhat * c2));
      }
    }
  }
  if (!weights) return;
  for (int64_t d = 0; d < D; ++d) {
    float sum_g = 0.f, sum_b = 0.f;
    for (int th = 0; th < threads; ++th) {
      sum_g += partial[static_cast<size_t>(th) * 2 * D + d];
      sum_b += partial[static_cast<size_t>(th) * 2 * D + D + d];
    }
    if (dgamma) dgamma[d] = sum_g;
    if (dbeta) dbeta[d] = sum_b;
  }
}

void forward_cpu(uintptr_t x, uintptr_t out, uintptr_t mean, uintptr_t rstd, uintptr_t gamma, uintptr_t beta,
                 int64_t batch, int64_t height, int64_t width, int64_t block_h, int64_t block_w, int64_t dim,
                 double eps, bool normalize, int dtype, int threads) {
  const Layout L{batch, height, width, block_h, block_w, dim};
  dispatch_dtype(dtype, "group_tokens_forward_cpu", [&](auto tag) {
    using T = decltype(tag);
    group_forward<T>(pointer<const T>(x), pointer<T>(out), pointer<float>(mean), pointer<float>(rstd),
                     pointer<const T>(gamma), pointer<const T>(beta), L, normalize, static_cast<float>(eps),
                     threads);
  });
}

void backward_cpu(uintptr_t grad_out, uintptr_t grad_x, uintptr_t x, uintptr_t mean, uintptr_t rstd,
                  uintptr_t gamma, uintptr_t dgamma, uintptr_t dbeta, int64_t batch, int64_t height, int64_t width,
                  int64_t block_h, int64_t block_w, int64_t dim, bool normalize, int dtype, int threads) {
  const Layout L{batch, height, width, block_h, block_w, dim};
  dispatch_dtype(dtype, "group_tokens_backward_cpu", [&](auto tag) {
    using T = decltype(tag);
    group_backward<T>(pointer<const T>(grad_out), pointer<T>(grad_x), pointer<const T>(x),
                      pointer<const float>(mean), pointer<const float>(rstd), pointer<const T>(gamma),
                      pointer<float>(dgamma), pointer<float>(dbeta), L, normalize, threads);
  });
}

void bind_group_tokens(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("group_tokens_forward_cpu", &forward_cpu,
        "Gather token rows into grouped slots (zeros for padding), optionally LayerNorm-ing each row and "
        "writing per-token mean/rstd; out may be 0 for statistics only",
        py::arg("x"), py::arg("out"), py::arg("mean"), py::arg("rstd"), py::arg("gamma"), py::arg("beta"),
        py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("block_h"), py::arg("block_w"),
        py::arg("dim"), py::arg("eps"), py::arg("normalize"), py::arg("dtype"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("group_tokens_backward_cpu", &backward_cpu,
        "Ungroup gradients (the inverse permutation), optionally through the LayerNorm backward; dgamma/dbeta "
        "are fp32 sums over tokens; any output may be 0 to skip it",
        py::arg("grad_out"), py::arg("grad_x"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("gamma"),
        py::arg("dgamma"), py::arg("dbeta"), py::arg("batch"), py::arg("height"), py::arg("width"),
        py::arg("block_h"), py::arg("block_w"), py::arg("dim"), py::arg("normalize"), py::arg("dtype"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace
}  // namespace mrgfast

MRGFAST_REGISTER(group_tokens, mrgfast::bind_group_tokens);
