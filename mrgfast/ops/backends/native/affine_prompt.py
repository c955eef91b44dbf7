"""Native affine prompt modulation: csrc/affine_prompt.cpp (C++, OpenMP) on CPU, kernels/affine_prompt.cu on CUDA."""

from typing import Optional

import torch
from torch import Tensor

from mrgfast.ops.backends.native.extension import address, cpu_threads, cuda_stream, dtype_code, module_for


def sizes(prompts: Tensor, gamma: Tensor, buffer: Tensor) -> dict:
    """The shape arguments every kernel takes: B, K, L, D, T and whether gamma/beta are per token."""
    length, dim = prompts.shape[-2:]
    return dict(batch=gamma.shape[0], book=prompts.shape[0] if prompts.dim() == 3 else 1, length=length, dim=dim,
                rows=buffer.shape[1], per_token=gamma.dim() == 3)


def affine_forward(prompts: Tensor, gamma: Tensor, beta: Tensor, weights: Optional[Tensor], out: Tensor,
                   offsets: Optional[Tensor]) -> None:
    """Write the modulated prompts into out [B, T, D] at rows offsets[b] + l (offsets None: out is [B, L, D])."""
    module = module_for(out)
    pointers = (address(prompts), address(gamma), address(beta), address(weights), address(out), address(offsets))
    shape = dict(**sizes(prompts, gamma, out), dtype=dtype_code(prompts, "prompts"))
    if out.is_cuda:
        module.affine_prompt_forward_cuda(*pointers, **shape, stream=cuda_stream(out))
    else:
        module.affine_prompt_forward_cpu(*pointers, **shape, threads=cpu_threads())


def affine_backward(grad: Tensor, prompts: Tensor, gamma: Tensor, weights: Optional[Tensor],
                    offsets: Optional[Tensor], *, need_prompts: bool, need_gamma: bool, need_beta: bool,
                    need_weights: bool) -> tuple:
    """(dP, dgamma, dbeta, dw) from grad [B, T, D]; None (and no kernel work) for gradients not needed."""
    module = module_for(grad)
    shape = sizes(prompts, gamma, grad)
    empty = lambda like, need: torch.empty_like(like) if need else None  # noqa: E731
    grads = (empty(prompts, need_prompts), empty(gamma, need_gamma), empty(gamma, need_beta),
             empty(weights, need_weights))
    pointers = (address(grad), address(prompts), address(gamma), address(weights), address(offsets),
                *(address(g) for g in grads))
    code = dtype_code(prompts, "prompts")
    if grad.is_cuda:
        blocks = -(-shape["dim"] // module.affine_prompt_cuda_block)
        # float32 partial sums of dw per feature block, reduced in block order by the kernels (deterministic).
        dw_partial = torch.empty((shape["batch"], blocks, shape["book"]), dtype=torch.float32, device=grad.device) \
            if need_weights else None
        module.affine_prompt_backward_cuda(*pointers, address(dw_partial), **shape, dtype=code,
                                           stream=cuda_stream(grad))
    else:
        module.affine_prompt_backward_cpu(*pointers, **shape, dtype=code, threads=cpu_threads())
    return grads
