"""Rotary position embedding of q or k: x * cos + rotate_half(x) * sin with per-token tables (RoPE and M-RoPE)."""

import torch
from torch import Tensor

from mrgfast.ops.backend import select_backend

IMPLEMENTED = ("triton",)  # on CPU tensors "auto" runs the reference (torch autograd)


def kernels(backend: str):
    """The kernels of `backend` (only Triton's, imported here as triton is optional)."""
    if backend == "triton":
        from mrgfast.ops.backends.triton import rope as triton_kernels
        return triton_kernels
    raise ValueError(f"rope has no {backend!r} kernels")


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [T, heads, head_dim] by the tables [T, head_dim], computed in x's dtype as HF does."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """reference_rope in one pass: x [T, heads, head_dim] (even head_dim), tables [T, head_dim] (fp32, say; M-RoPE's
    too, as they are per token). The tables are constants here: they get no gradient."""
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"rope: x must be [tokens, heads, head_dim] with an even head_dim, got {tuple(x.shape)}")
    tables = (x.shape[0], x.shape[2])
    if tuple(cos.shape) != tables or tuple(sin.shape) != tables:
        raise ValueError(f"rope: cos and sin must be [tokens, head_dim] = {list(tables)}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    backend = select_backend("rope", x, IMPLEMENTED)
    if backend == "reference":
        return reference_rope(x, cos, sin)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: the cos/sin tables get no gradient from the fused op; use the reference backend")
    return RoPEFunction.apply(x, cos.contiguous(), sin.contiguous(), backend)


def last_dim_contiguous(t: Tensor) -> Tensor:
    """t itself when its last dim is dense (q and k may be views of a fused q/k/v output), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


class RoPEFunction(torch.autograd.Function):
    """Autograd for rope: the gradient is the transposed rotation of the incoming one; only the tables are saved."""

    @staticmethod
    def forward(ctx, x, cos, sin, backend):
        ctx.save_for_backward(cos, sin)
        ctx.backend = backend
        return kernels(backend).rope_apply(last_dim_contiguous(x), cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return kernels(ctx.backend).rope_apply(last_dim_contiguous(grad), cos, sin, backward=True), None, None, None
