"""CUDA token grouping through kernels/group_tokens.cu: a warp per grouped slot (forward) or token (backward)."""

from typing import Optional

import torch
from torch import Tensor

from mrgfast.native import address, cuda_native_module, cuda_stream, dtype_code

# Warps that share the tokens when dgamma/dbeta partial rows are written: [warps, D] fp32 scratch each.
WEIGHT_GRAD_WARPS = 1024


def normalize_group(x: Tensor, layout, gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                    normalize: bool, with_output: bool = True):
    """(z [B, groups, group*D] or None, mean [B*N] or None, rstd [B*N] or None): LayerNorm (if normalize)
    fused into the gather, so each grouped row is written once; statistics are fp32."""
    z, mean, rstd = layout.forward_buffers(x, normalize, with_output)
    cuda_native_module().group_tokens_forward_cuda(
        address(x), address(z), address(mean), address(rstd), address(gamma), address(beta),
        *layout.kernel_sizes(), float(eps), bool(normalize), dtype_code(x, "x"), cuda_stream(x))
    return z, mean, rstd


def ungroup_backward(grad_z: Tensor, x: Optional[Tensor], layout, mean: Optional[Tensor], rstd: Optional[Tensor],
                     gamma: Optional[Tensor], normalize: bool, need_x: bool = True, need_gamma: bool = False,
                     need_beta: bool = False):
    """(dx [B, N, D], dgamma [D] fp32, dbeta [D] fp32), None where not asked: the inverse permutation of the
    grouping, through the LayerNorm backward when normalize."""
    code = dtype_code(grad_z, "grad")
    tokens = layout.batch * layout.tokens
    weights = normalize and (need_gamma or need_beta)
    warps = min(tokens, WEIGHT_GRAD_WARPS) if weights else tokens
    dx = grad_z.new_empty(layout.batch, layout.tokens, layout.dim) if need_x else None
    parts = [grad_z.new_empty(warps, layout.dim, dtype=torch.float32) if normalize and need else None
             for need in (need_gamma, need_beta)]
    cuda_native_module().group_tokens_backward_cuda(
        address(grad_z), address(dx), address(x if normalize else None), address(mean), address(rstd),
        address(gamma), address(parts[0]), address(parts[1]), warps, *layout.kernel_sizes(), bool(normalize),
        code, cuda_stream(grad_z))
    sums = [part.sum(0) if part is not None else None for part in parts]
    return dx, sums[0], sums[1]


def group(x: Tensor, layout) -> Tensor:
    """x [B, N, D] grouped to [B, groups, group*D] (zero rows in padding slots)."""
    return normalize_group(x, layout, None, None, 0.0, normalize=False)[0]


def ungroup(grad: Tensor, layout) -> Tensor:
    """The gradient of group(): grouped [B, groups, group*D] back to [B, N, D], padding dropped."""
    return ungroup_backward(grad, None, layout, None, None, None, normalize=False)[0]
