"""CPU affine prompt modulation: the C++ OpenMP kernels of csrc/affine_prompt.cpp (mrgfast._C)."""

from typing import Optional

import torch
from torch import Tensor

from mrgfast.native import address, cpu_threads, dtype_code, native_module


def sizes(prompts: Tensor, gamma: Tensor, buffer: Tensor) -> dict:
    """The shape arguments every kernel takes: B, K, L, D, T and whether gamma/beta are per token."""
    length, dim = prompts.shape[-2:]
    return dict(batch=gamma.shape[0], book=prompts.shape[0] if prompts.dim() == 3 else 1, length=length, dim=dim,
                rows=buffer.shape[1], per_token=gamma.dim() == 3)


def affine_forward(prompts: Tensor, gamma: Tensor, beta: Tensor, weights: Optional[Tensor], out: Tensor,
                   offsets: Optional[Tensor]) -> None:
    """Write the modulated prompts into out [B, T, D] at rows offsets[b] + l (offsets None: out is [B, L, D])."""
    native_module().affine_prompt_forward_cpu(
        address(prompts), address(gamma), address(beta), address(weights), address(out), address(offsets),
        **sizes(prompts, gamma, out), dtype=dtype_code(prompts, "prompts"), threads=cpu_threads())


def affine_backward(grad: Tensor, prompts: Tensor, gamma: Tensor, weights: Optional[Tensor],
                    offsets: Optional[Tensor], *, need_prompts: bool, need_gamma: bool, need_beta: bool,
                    need_weights: bool) -> tuple:
    """(dP, dgamma, dbeta, dw) from grad [B, T, D]; None (and no work) for gradients not needed."""
    empty = lambda like, need: torch.empty_like(like) if need else None  # noqa: E731
    grads = (empty(prompts, need_prompts), empty(gamma, need_gamma), empty(gamma, need_beta),
             empty(weights, need_weights))
    native_module().affine_prompt_backward_cpu(
        address(grad), address(prompts), address(gamma), address(weights), address(offsets),
        *(address(g) for g in grads), **sizes(prompts, gamma, grad), dtype=dtype_code(prompts, "prompts"),
        threads=cpu_threads())
    return grads
