"""CPU LoRA linear: in-place addmm into the base output, so no extra [tokens, out] temporaries."""

from typing import Optional

import torch
from torch import Tensor

from mrgfast.ops.dropout import torch_keep_mask


def keep_scale(x: Tensor, dropout_p: float, seed: Optional[int]) -> Optional[Tensor]:
    """keep_mask / (1 - p) in x's dtype for the seeded dropout, or None without dropout."""
    if dropout_p == 0.0:
        return None
    keep = torch_keep_mask(x.shape[0], x.shape[1], dropout_p, seed, x.device)
    return keep.to(x.dtype).mul_(1.0 / (1.0 - dropout_p))


def lora_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    """Return (y, xa) with xa = drop(x) A^T kept for backward."""
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    scale = keep_scale(x, dropout_p, seed)
    xa = torch.mm(x if scale is None else x * scale, lora_a.t())
    y.addmm_(xa, lora_b.t(), alpha=scaling)
    return y, xa


def lora_backward(grad_y, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, *,
                  need_x, need_weight, need_bias, need_a, need_b):
    """Gradients (x, weight, bias, lora_a, lora_b); None where not needed. The mask is redrawn from seed."""
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    dyb = torch.mm(grad_y, lora_b).mul_(scaling) if (need_x or need_a) else None
    # The dropout mask is redrawn from the seed rather than saved: [tokens, in] bytes are not kept alive.
    scale = keep_scale(x, dropout_p, seed) if (need_x or need_a) else None
    if need_x:
        grad_x = torch.mm(grad_y, weight)
        if scale is None:
            grad_x.addmm_(dyb, lora_a)
        else:
            grad_x.addcmul_(torch.mm(dyb, lora_a), scale)
    if need_weight:
        grad_w = torch.mm(grad_y.t(), x)
    if need_bias:
        grad_bias = grad_y.sum(0)
    if need_a:
        grad_a = torch.mm(dyb.t(), x if scale is None else x * scale)
    if need_b:
        grad_b = torch.mm(grad_y.t(), xa).mul_(scaling)
    return grad_x, grad_w, grad_bias, grad_a, grad_b
