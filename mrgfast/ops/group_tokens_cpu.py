"""CPU token grouping through the C++ kernels of csrc/group_tokens.cpp (OpenMP over grouped slots / tokens)."""

from typing import Optional

import torch
from torch import Tensor

from mrgfast.native import address, cpu_threads, dtype_code, native_module


def normalize_group(x: Tensor, layout, gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                    normalize: bool, with_output: bool = True):
    """(z [B, groups, group*D] or None, mean [B*N] or None, rstd [B*N] or None): LayerNorm (if normalize)
    and grouping in one pass that writes each grouped row once; statistics are fp32."""
    z, mean, rstd = layout.forward_buffers(x, normalize, with_output)
    native_module().group_tokens_forward_cpu(
        address(x), address(z), address(mean), address(rstd), address(gamma), address(beta),
        *layout.kernel_sizes(), float(eps), bool(normalize), dtype_code(x, "x"), cpu_threads())
    return z, mean, rstd


def ungroup_backward(grad_z: Tensor, x: Optional[Tensor], layout, mean: Optional[Tensor], rstd: Optional[Tensor],
                     gamma: Optional[Tensor], normalize: bool, need_x: bool = True, need_gamma: bool = False,
                     need_beta: bool = False):
    """(dx [B, N, D], dgamma [D] fp32, dbeta [D] fp32), None where not asked: the inverse permutation of the
    grouping, through the LayerNorm backward when normalize."""
    code = dtype_code(grad_z, "grad")
    dx = grad_z.new_empty(layout.batch, layout.tokens, layout.dim) if need_x else None
    dgamma = grad_z.new_empty(layout.dim, dtype=torch.float32) if normalize and need_gamma else None
    dbeta = grad_z.new_empty(layout.dim, dtype=torch.float32) if normalize and need_beta else None
    native_module().group_tokens_backward_cpu(
        address(grad_z), address(dx), address(x if normalize else None), address(mean), address(rstd),
        address(gamma), address(dgamma), address(dbeta), *layout.kernel_sizes(), bool(normalize), code,
        cpu_threads())
    return dx, dgamma, dbeta


def group(x: Tensor, layout) -> Tensor:
    """x [B, N, D] grouped to [B, groups, group*D] (zero rows in padding slots)."""
    return normalize_group(x, layout, None, None, 0.0, normalize=False)[0]


def ungroup(grad: Tensor, layout) -> Tensor:
    """The gradient of group(): grouped [B, groups, group*D] back to [B, N, D], padding dropped."""
    return ungroup_backward(grad, None, layout, None, None, None, normalize=False)[0]
