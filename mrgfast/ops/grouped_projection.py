"""Grouped projection: Linear(group_tokens(LayerNorm(x))) fused (PeFoMed's ln_vision -> 4-token concat ->
llama_proj; Qwen2-VL's merger LayerNorm -> 2x2 concat -> first Linear)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mrgfast.ops.backend import select_backend
from mrgfast.ops.backends.native import grouped_projection as native_kernels
from mrgfast.ops.group_tokens import GroupLayout, group_layout, reference_group_tokens

IMPLEMENTED = ("cpu", "triton", "cuda")


def kernels(backend: str):
    """The kernels of `backend`: native (C++ or CUDA by device), or Triton's, imported here as triton is optional."""
    if backend == "triton":
        from mrgfast.ops.backends.triton import grouped_projection as triton_kernels
        return triton_kernels
    return native_kernels


def reference_grouped_projection(x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: GroupLayout,
                                 normalize: bool, norm_weight: Optional[Tensor] = None,
                                 norm_bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """The eager composition: LayerNorm over features per token, group the tokens, then Linear."""
    if normalize:
        x = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    return F.linear(reference_group_tokens(x, layout), weight, bias)


def routing_case(x: Tensor, layout: GroupLayout) -> str:
    """The op's case in mrgfast.ops.routing: 1d or 2d grouping, x trainable (a gradient to compute) or frozen."""
    trainable = x.requires_grad and torch.is_grad_enabled()
    return f"{layout.mode}_{'train_x' if trainable else 'frozen_x'}"


def check_projection_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: GroupLayout,
                          norm_weight: Optional[Tensor], norm_bias: Optional[Tensor]) -> None:
    """Raise ValueError naming the argument whose shape or dtype is wrong."""
    in_features = layout.group * layout.dim
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(f"weight must be [out, group * D] = [out, {layout.group} * {layout.dim}], got shape "
                         f"{tuple(weight.shape)}")
    tensors = {"bias": (bias, weight.shape[0]), "norm_weight": (norm_weight, layout.dim),
               "norm_bias": (norm_bias, layout.dim)}
    for name, (tensor, size) in tensors.items():
        if tensor is not None and tuple(tensor.shape) != (size,):
            raise ValueError(f"{name} must have shape [{size}], got {tuple(tensor.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")


def grouped_projection(x: Tensor, weight: Tensor, bias: Optional[Tensor], group: int, mode: str = "1d",
                       grid: Optional[tuple[int, int]] = None, pad: bool = False, *, normalize: bool = True,
                       norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
                       eps: float = 1e-5) -> Tensor:
    """x [B, N, D] -> LayerNorm over D (if normalize) -> group_tokens(group, mode, grid, pad) -> Linear:
    [B, groups, out]. The grouped matrix is never stored for backward (recomputed), and never materialised at
    all by the Triton kernels; gradients of x and the norm weights are computed only when they require grad."""
    if torch.is_autocast_enabled(x.device.type):
        # As F.linear under autocast: one compute dtype for the whole op (the norm still accumulates in fp32).
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    layout = group_layout(x.shape, group, mode, grid, pad)
    check_projection_args(x, weight, bias, layout, norm_weight, norm_bias)
    if not normalize:
        norm_weight = norm_bias = None
    # Small vectors follow x's dtype (a bf16 model may keep fp32 LayerNorm weights); autograd casts gradients back.
    bias, norm_weight, norm_bias = (t.to(x.dtype) if t is not None else None for t in (bias, norm_weight, norm_bias))
    backend = select_backend("grouped_projection", x, IMPLEMENTED, routing_case(x, layout), x.numel())
    if backend == "reference":
        return reference_grouped_projection(x, weight, bias, layout, normalize, norm_weight, norm_bias, eps)
    y = GroupedProjectionFunction.apply(x.contiguous(), weight.contiguous(), bias, norm_weight, norm_bias, layout,
                                        bool(normalize), float(eps), backend)
    return y.view(layout.batch, layout.groups, weight.shape[0])


class GroupedProjectionFunction(torch.autograd.Function):
    """Autograd for the fused projection; saves x (and per-token statistics on Triton), never the grouped Z."""

    @staticmethod
    def forward(ctx, x, weight, bias, norm_weight, norm_bias, layout, normalize, eps, backend):
        module = kernels(backend)
        y, saved = module.forward(x, weight, bias, norm_weight, norm_bias, layout, normalize, eps)
        ctx.save_for_backward(x, weight, norm_weight, norm_bias, *saved)
        ctx.config = (layout, normalize, eps, backend, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, norm_weight, norm_bias, *saved = ctx.saved_tensors
        layout, normalize, eps, backend, has_bias = ctx.config
        needs = ctx.needs_input_grad
        grads = kernels(backend).backward(
            grad_y.contiguous(), x, weight, norm_weight, norm_bias, tuple(saved), layout, normalize, eps,
            need_x=needs[0], need_weight=needs[1], need_bias=has_bias and needs[2],
            need_gamma=normalize and norm_weight is not None and needs[3],
            need_beta=normalize and norm_bias is not None and needs[4])
        grad_x, grad_w, grad_b, grad_gamma, grad_beta = grads
        if grad_gamma is not None:
            grad_gamma = grad_gamma.to(norm_weight.dtype)
        if grad_beta is not None:
            grad_beta = grad_beta.to(norm_bias.dtype)
        return grad_x, grad_w, grad_b, grad_gamma, grad_beta, None, None, None, None
