"""CUDA affine prompt modulation: the launchers of kernels/affine_prompt.cu in mrgfast._C, on torch's stream."""

from typing import Optional

import torch
from torch import Tensor

from mrgfast.native import address, cuda_native_module, cuda_stream, dtype_code
from mrgfast.ops.affine_prompt_cpu import sizes


def affine_forward(prompts: Tensor, gamma: Tensor, beta: Tensor, weights: Optional[Tensor], out: Tensor,
                   offsets: Optional[Tensor]) -> None:
    """Write the modulated prompts into out [B, T, D] at rows offsets[b] + l (offsets None: out is [B, L, D])."""
    cuda_native_module().affine_prompt_forward_cuda(
        address(prompts), address(gamma), address(beta), address(weights), address(out), address(offsets),
        **sizes(prompts, gamma, out), dtype=dtype_code(prompts, "prompts"), stream=cuda_stream(out))


def affine_backward(grad: Tensor, prompts: Tensor, gamma: Tensor, weights: Optional[Tensor],
                    offsets: Optional[Tensor], *, need_prompts: bool, need_gamma: bool, need_beta: bool,
                    need_weights: bool) -> tuple:
    """(dP, dgamma, dbeta, dw) from grad [B, T, D]; None (and no kernel work) for gradients not needed."""
    module = cuda_native_module()
    shape = sizes(prompts, gamma, grad)
    empty = lambda like, need: torch.empty_like(like) if need else None  # noqa: E731
    grads = (empty(prompts, need_prompts), empty(gamma, need_gamma), empty(gamma, need_beta),
             empty(weights, need_weights))
    blocks = -(-shape["dim"] // module.affine_prompt_cuda_block)
    # float32 partial sums of dw per feature block, reduced in block order by the kernels (deterministic).
    dw_partial = torch.empty((shape["batch"], blocks, shape["book"]), dtype=torch.float32, device=grad.device) \
        if need_weights else None
    module.affine_prompt_backward_cuda(
        address(grad), address(prompts), address(gamma), address(weights), address(offsets),
        *(address(g) for g in grads), address(dw_partial), **shape, dtype=dtype_code(prompts, "prompts"),
        stream=cuda_stream(grad))
    return grads
