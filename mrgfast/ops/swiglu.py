"""SwiGLU's gate: silu(gate) * up, the elementwise step between the MLP's projections."""

import torch
import torch.nn.functional as F
from torch import Tensor

from mrgfast.ops.backend import select_backend

IMPLEMENTED = ("triton",)  # on CPU tensors "auto" runs the reference (torch autograd)


def kernels(backend: str):
    """The kernels of `backend` (only Triton's, imported here as triton is optional)."""
    if backend == "triton":
        from mrgfast.ops.backends.triton import swiglu as triton_kernels
        return triton_kernels
    raise ValueError(f"swiglu has no {backend!r} kernels")


def reference_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, eagerly."""
    return F.silu(gate) * up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in one pass (both gradients in one pass too); gate and up of one shape."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    backend = select_backend("swiglu", gate, IMPLEMENTED)
    if backend == "reference":
        return reference_swiglu(gate, up)
    return SwiGLUFunction.apply(gate, up, backend)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd for swiglu: saves gate and up (the MLP keeps them anyway), recomputes silu in backward."""

    @staticmethod
    def forward(ctx, gate, up, backend):
        dtype = torch.promote_types(gate.dtype, up.dtype)  # as the eager product promotes
        gate_c, up_c = gate.to(dtype).contiguous(), up.to(dtype).contiguous()
        ctx.save_for_backward(gate_c, up_c)
        ctx.config = (backend, gate.dtype, up.dtype)
        return kernels(backend).swiglu_forward(gate_c, up_c)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        backend, gate_dtype, up_dtype = ctx.config
        dgate, dup = kernels(backend).swiglu_backward(grad.contiguous(), gate, up)
        return dgate.to(gate_dtype), dup.to(up_dtype), None
