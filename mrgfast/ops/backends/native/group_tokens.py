"""Native token grouping: csrc/group_tokens.cpp (C++, OpenMP over grouped slots / tokens) on CPU,
kernels/group_tokens.cu (a warp per grouped slot in forward, per token in backward) on CUDA."""

from typing import Optional

import torch
from torch import Tensor

from mrgfast.ops.backends.native.extension import address, cpu_threads, cuda_stream, dtype_code, module_for

# CUDA: warps that share the tokens when dgamma/dbeta partial rows are written: [warps, D] fp32 scratch each.
WEIGHT_GRAD_WARPS = 1024


def normalize_group(x: Tensor, layout, gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                    normalize: bool, with_output: bool = True):
    """(z [B, groups, group*D] or None, mean [B*N] or None, rstd [B*N] or None): LayerNorm (if normalize)
    fused into the gather, so each grouped row is written once; statistics are fp32."""
    z, mean, rstd = layout.forward_buffers(x, normalize, with_output)
    module = module_for(x)
    arguments = (address(x), address(z), address(mean), address(rstd), address(gamma), address(beta),
                 *layout.kernel_sizes(), float(eps), bool(normalize), dtype_code(x, "x"))
    if x.is_cuda:
        module.group_tokens_forward_cuda(*arguments, cuda_stream(x))
    else:
        module.group_tokens_forward_cpu(*arguments, cpu_threads())
    return z, mean, rstd


def ungroup_backward(grad_z: Tensor, x: Optional[Tensor], layout, mean: Optional[Tensor], rstd: Optional[Tensor],
                     gamma: Optional[Tensor], normalize: bool, need_x: bool = True, need_gamma: bool = False,
                     need_beta: bool = False):
    """(dx [B, N, D], dgamma [D] fp32, dbeta [D] fp32), None where not asked: the inverse permutation of the
    grouping, through the LayerNorm backward when normalize."""
    code = dtype_code(grad_z, "grad")
    module = module_for(grad_z)
    dx = grad_z.new_empty(layout.batch, layout.tokens, layout.dim) if need_x else None
    inputs = (address(grad_z), address(dx), address(x if normalize else None), address(mean), address(rstd),
              address(gamma))
    if not grad_z.is_cuda:
        dgamma = grad_z.new_empty(layout.dim, dtype=torch.float32) if normalize and need_gamma else None
        dbeta = grad_z.new_empty(layout.dim, dtype=torch.float32) if normalize and need_beta else None
        module.group_tokens_backward_cpu(*inputs, address(dgamma), address(dbeta), *layout.kernel_sizes(),
                                         bool(normalize), code, cpu_threads())
        return dx, dgamma, dbeta
    # CUDA: each warp writes its own fp32 partial row of dgamma / dbeta (deterministic, no races), summed here.
    tokens = layout.batch * layout.tokens
    warps = min(tokens, WEIGHT_GRAD_WARPS) if normalize and (need_gamma or need_beta) else tokens
    parts = [grad_z.new_empty(warps, layout.dim, dtype=torch.float32) if normalize and need else None
             for need in (need_gamma, need_beta)]
    module.group_tokens_backward_cuda(*inputs, address(parts[0]), address(parts[1]), warps, *layout.kernel_sizes(),
                                      bool(normalize), code, cuda_stream(grad_z))
    sums = [part.sum(0) if part is not None else None for part in parts]
    return dx, sums[0], sums[1]


def group(x: Tensor, layout) -> Tensor:
    """x [B, N, D] grouped to [B, groups, group*D] (zero rows in padding slots)."""
    return normalize_group(x, layout, None, None, 0.0, normalize=False)[0]


def ungroup(grad: Tensor, layout) -> Tensor:
    """The gradient of group(): grouped [B, groups, group*D] back to [B, N, D], padding dropped."""
    return ungroup_backward(grad, None, layout, None, None, None, normalize=False)[0]
