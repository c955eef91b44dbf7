"""Fused LoRA linear: y = x W^T + b + scaling * (drop(x) A^T) B^T, with PEFT's shapes."""

import os
from typing import Optional

import torch
from torch import Tensor

from mrgfast.ops.backend import select_backend
from mrgfast.ops.backends.torch import lora_linear as torch_kernels
from mrgfast.ops.dropout import new_seed, torch_keep_mask

IMPLEMENTED = ("cpu", "triton")
# The Triton backend's design: split (cuBLAS GEMMs + small r-wide Triton kernels, the default) or fused (the
# earlier one-kernel-per-tile design, kept as an ablation). Read at every call, so benchmarks can switch it.
KERNEL_ENV = "MRGFAST_LORA_KERNEL"
TRITON_DESIGNS = ("split", "fused")


def triton_design() -> str:
    """MRGFAST_LORA_KERNEL: split (default) or fused; anything else is an error naming the choices."""
    value = os.environ.get(KERNEL_ENV, "").strip().lower() or TRITON_DESIGNS[0]
    if value not in TRITON_DESIGNS:
        raise ValueError(f"{KERNEL_ENV}={value!r}: expected one of {', '.join(TRITON_DESIGNS)}")
    return value


def kernels(backend: str, design: Optional[str] = None):
    """The kernels of `backend`: torch ("cpu"), or Triton's split or fused design (imported here: triton is
    optional); `design` defaults to triton_design()."""
    if backend == "triton":
        if (design or triton_design()) == "fused":
            from mrgfast.ops.backends.triton import lora_fused
            return lora_fused
        from mrgfast.ops.backends.triton import lora_linear as triton_split
        return triton_split
    return torch_kernels


def reference_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                          scaling: float, keep_mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """Eager LoRA linear exactly as PEFT computes it; `keep_mask` [tokens, in] selects dropped inputs."""
    dropped = x
    if keep_mask is not None:
        dropped = x * keep_mask.reshape(x.shape).to(x.dtype) / (1.0 - dropout_p)
    base = torch.nn.functional.linear(x, weight, bias)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(dropped, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return base + scaling * lora


def check_lora_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                    dropout_p: float) -> None:
    """Raise ValueError naming the argument whose shape, dtype or value is wrong."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must end in in_features={in_features} (weight is [out, in]), got shape {tuple(x.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[0] <= 0 or lora_a.shape[1] != in_features:
        raise ValueError(f"lora_a must be [r, in] with r > 0 and in={in_features}, got shape {tuple(lora_a.shape)}")
    rank = lora_a.shape[0]
    if tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(f"lora_b must be [out, r] = [{out_features}, {rank}], got shape {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [out] = [{out_features}], got shape {tuple(bias.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scaling: float, dropout_p: float = 0.0, training: bool = False,
                seed: Optional[int] = None) -> Tensor:
    """LoRA linear on any leading dims of x: A is [r, in], B is [out, r]; dropout only when training."""
    if torch.is_autocast_enabled(x.device.type):
        # As F.linear does under autocast: compute in the autocast dtype, whatever the stored dtypes.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    check_lora_args(x, weight, bias, lora_a, lora_b, dropout_p)
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = new_seed()
    backend = select_backend("lora_linear", x, IMPLEMENTED)
    x2d = x.reshape(-1, x.shape[-1])
    if bias is not None:
        bias = bias.to(x.dtype)
    if backend == "reference":
        keep = torch_keep_mask(x2d.shape[0], x2d.shape[1], p, seed, x.device) if p > 0.0 else None
        y = reference_lora_linear(x2d, weight, bias, lora_a.to(x.dtype), lora_b.to(x.dtype), float(scaling), keep, p)
    else:
        module = kernels(backend)  # chosen once: backward runs the same design as forward
        y = LoRALinearFunction.apply(x2d, weight, bias, lora_a, lora_b, float(scaling), p, seed, module)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for 2-D LoRA linear; saves x, the r-wide x A^T and what the backend keeps (`saved`): the GPU designs
    redraw the dropout mask from its seed; the CPU one keeps it as bits (1/8 byte an element of x).

    Adapters may be kept in fp32 beside a bf16 base (PEFT's autocast_adapter_dtype): the kernels compute in x's
    dtype (the adapters cast, [r, in] and [out, r] only), and the adapters' gradients come back in their own dtype
    (the split design accumulates them in fp32 over every token; the others return x's dtype, cast up here).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, module):
        adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        y, saved = module.lora_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
        ctx.save_for_backward(x, weight, lora_a, lora_b, *saved)
        ctx.config = (scaling, dropout_p, seed, module, bias is not None, adapter_dtypes)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, *saved = ctx.saved_tensors
        scaling, dropout_p, seed, module, has_bias, (a_dtype, b_dtype) = ctx.config
        needs = ctx.needs_input_grad
        grad_x, grad_w, grad_bias, grad_a, grad_b = module.lora_backward(
            grad_y.contiguous(), x, weight, lora_a, lora_b, tuple(saved), scaling, dropout_p, seed,
            need_x=needs[0], need_weight=needs[1], need_bias=has_bias and needs[2],
            need_a=needs[3], need_b=needs[4])
        grad_a = grad_a.to(a_dtype) if grad_a is not None else None
        grad_b = grad_b.to(b_dtype) if grad_b is not None else None
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None
