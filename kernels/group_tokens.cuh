// Host launchers of the token-grouping CUDA kernels (kernels/group_tokens.cu); raw pointers + a stream.
//
// Layout (as mrgfast/ops/group_tokens.py GroupLayout): x is [batch, height * width, dim], a row-major token grid
// cut into (block_h, block_w) blocks in row-major order; the grouped tensor is [batch, blocks, block_h * block_w
// * dim] with neighbour j of a block at (j / block_w, j % block_w). dtype_code: 0 = float32, 1 = bfloat16.
#pragma once

#include <cstdint>

namespace mrgfast {
namespace cuda {

// Grouped slots (and tokens in backward) per block: one warp each.
constexpr int kGroupTokensWarps = 8;

// out[slot] = LayerNorm(x[source token]) (or the plain row) or zeros for padding; mean/rstd [batch * tokens] fp32
// written when given (with normalize). Null out computes statistics only; null gamma/beta mean 1/0.
void group_tokens_forward_cuda(uintptr_t x, uintptr_t out, uintptr_t mean, uintptr_t rstd, uintptr_t gamma,
                               uintptr_t beta, int64_t batch, int64_t height, int64_t width, int64_t block_h,
                               int64_t block_w, int64_t dim, double eps, bool normalize, int dtype_code,
                               uintptr_t stream);

// grad_x[token] = grad_out[slot of token] (the inverse permutation), through the LayerNorm backward with normalize.
// `warps` warps walk the tokens; with dgamma_partial/dbeta_partial (fp32 [warps, dim], summed by the caller)
// each warp writes its own sums of g*xhat and g: no atomics, deterministic. Null outputs are skipped.
void group_tokens_backward_cuda(uintptr_t grad_out, uintptr_t grad_x, uintptr_t x, uintptr_t mean, uintptr_t rstd,
                                uintptr_t gamma, uintptr_t dgamma_partial, uintptr_t dbeta_partial, int64_t warps,
                                int64_t batch, int64_t height, int64_t width, int64_t block_h, int64_t block_w,
                                int64_t dim, bool normalize, int dtype_code, uintptr_t stream);

}  // namespace cuda
}  // namespace mrgfast
