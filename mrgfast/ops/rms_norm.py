"""RMSNorm with the pre-norm block's residual add fused in: (weight * norm(x + residual), x + residual)."""

from typing import Optional

import torch
from torch import Tensor

from mrgfast.ops.backend import select_backend

IMPLEMENTED = ("triton",)  # on CPU tensors "auto" runs the reference (torch autograd)


def kernels(backend: str):
    """The kernels of `backend` (only Triton's, imported here as triton is optional)."""
    if backend == "triton":
        from mrgfast.ops.backends.triton import rms_norm as triton_kernels
        return triton_kernels
    raise ValueError(f"rms_norm has no {backend!r} kernels")


def reference_rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Optional[Tensor] = None):
    """(normed, sum): sum = x + residual (x when no residual); normed is HF's LlamaRMSNorm of it, statistics in
    fp32 and the row cast back to the sum's dtype before the weight."""
    h = x if residual is None else x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Optional[Tensor] = None):
    """(normed, new_residual) over the last dim of x: new_residual = x + residual when a residual is given (the
    stream the next block adds to), else x itself; normed = RMSNorm(new_residual) * weight."""
    if weight.dim() != 1 or x.shape[-1:] != weight.shape:
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1]}] to match x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    backend = select_backend("rms_norm", x, IMPLEMENTED)
    if backend == "reference":
        return reference_rms_norm(x, weight, eps, residual)
    x2d = x.reshape(-1, x.shape[-1])
    res2d = None if residual is None else residual.reshape(-1, x.shape[-1])
    normed, h = RMSNormFunction.apply(x2d, res2d, weight, float(eps), backend)
    return normed.view(x.shape), (x if residual is None else h.view(x.shape))


class RMSNormFunction(torch.autograd.Function):
    """Autograd for 2-D rows; saves the sum and the fp32 1/rms per row, and returns the sum as a second output."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, backend):
        dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)  # as x + residual
        stream = x.to(dtype)
        stream = stream if stream.stride(-1) == 1 else stream.contiguous()
        res = None if residual is None else residual.to(dtype).contiguous()
        out_dtype = torch.promote_types(weight.dtype, dtype)  # weight * row, as torch promotes it
        normed, h, rstd = kernels(backend).rms_norm_forward(stream, res, weight.contiguous(), eps, out_dtype)
        ctx.save_for_backward(h, rstd, weight)
        ctx.config = (backend, x.dtype, None if residual is None else residual.dtype)
        if residual is None:
            ctx.mark_non_differentiable(h)  # x itself: its gradient is x's
        return normed, h

    @staticmethod
    def backward(ctx, grad_normed, grad_sum):
        h, rstd, weight = ctx.saved_tensors
        backend, x_dtype, residual_dtype = ctx.config
        needs = ctx.needs_input_grad
        need_x = needs[0] or needs[1]
        if grad_normed is None:
            grad_normed = torch.zeros(h.shape, dtype=torch.promote_types(weight.dtype, h.dtype), device=h.device)
        grad_sum = None if (residual_dtype is None or grad_sum is None) else grad_sum.to(h.dtype).contiguous()
        dx, dweight = kernels(backend).rms_norm_backward(grad_normed.contiguous(), grad_sum, h, rstd, weight,
                                                         need_x=need_x, need_weight=needs[2])
        grad_x = dx.to(x_dtype) if needs[0] else None
        grad_residual = dx.to(residual_dtype) if needs[1] else None
        return grad_x, grad_residual, dweight, None, None
