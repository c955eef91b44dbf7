// Host launchers of the affine prompt CUDA kernels (kernels/affine_prompt.cu); raw pointers + a stream.
//
// Shapes (contiguous): P [K, L, D] (K = 1 and weights = 0 for prompt-wise prompts), weights [B, K],
// gamma/beta [B, D] or [B, L, D] (per_token), out/grad [B, T, D] with sample b's prompts at rows offsets[b] + l
// (offsets = 0: rows start at 0). dtype_code: 0 = float32, 1 = bfloat16 (all tensors share it).
#pragma once

#include <cstdint>

namespace mrgfast {
namespace cuda {

// Threads per block = features per block of every affine prompt kernel; dw partial sums are [B, ceil(D / this), K].
constexpr int kAffinePromptBlock = 256;

void affine_prompt_forward_cuda(uintptr_t prompts, uintptr_t gamma, uintptr_t beta, uintptr_t weights, uintptr_t out,
                                uintptr_t offsets, int64_t batch, int64_t book, int64_t length, int64_t dim,
                                int64_t rows, bool per_token, int dtype_code, uintptr_t stream);

// Null gradient pointers are skipped. dw_partial is float32 [B, ceil(D / kAffinePromptBlock), K] scratch
// (needed with grad_weights); it is reduced into grad_weights in a fixed order, so results are deterministic.
void affine_prompt_backward_cuda(uintptr_t grad, uintptr_t prompts, uintptr_t gamma, uintptr_t weights,
                                 uintptr_t offsets, uintptr_t grad_prompts, uintptr_t grad_gamma, uintptr_t grad_beta,
                                 uintptr_t grad_weights, uintptr_t dw_partial, int64_t batch, int64_t book,
                                 int64_t length, int64_t dim, int64_t rows, bool per_token, int dtype_code,
                                 uintptr_t stream);

}  // namespace cuda
}  // namespace mrgfast
