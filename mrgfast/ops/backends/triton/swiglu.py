"""Triton SwiGLU: silu(gate) * up in one pass, and both gradients in one pass (silu recomputed, never stored).

Flat over the elements; silu is rounded to the inputs' dtype before the product, as eager F.silu(gate) * up is.
"""

import torch
import triton
import triton.language as tl

from mrgfast.ops.backends.triton.common import launch_settings

BLOCK = 1024  # elements per program: a memory-bound pass, no shape to tune for


@triton.jit
def swiglu_forward_kernel(GATE, UP, Y, NUMEL, BLOCK: tl.constexpr):
    """y = round(silu(gate)) * up."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + offs, (silu * up).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_backward_kernel(DY, GATE, UP, DGATE, DUP, NUMEL, BLOCK: tl.constexpr):
    """dup = dy * round(silu(gate)); dgate = round(dy * up) * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    dtype = DGATE.dtype.element_ty
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = (gate * sig).to(dtype).to(tl.float32)
    dsilu = (dy * up).to(dtype).to(tl.float32)
    tl.store(DUP + offs, (dy * silu).to(dtype), mask=mask)
    tl.store(DGATE + offs, (dsilu * sig * (1.0 + gate * (1.0 - sig))).to(dtype), mask=mask)


def _grid(numel: int):
    """One program per BLOCK elements."""
    return (triton.cdiv(numel, BLOCK),)


def swiglu_forward(gate, up):
    """silu(gate) * up for contiguous gate and up of one shape and dtype."""
    launch_settings(gate)  # checks that Triton can run on gate's device
    y = torch.empty_like(gate)
    if gate.numel():
        swiglu_forward_kernel[_grid(gate.numel())](gate, up, y, gate.numel(), BLOCK=BLOCK)
    return y


def swiglu_backward(grad_y, gate, up):
    """(dgate, dup) for contiguous tensors."""
    launch_settings(gate)
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    if gate.numel():
        swiglu_backward_kernel[_grid(gate.numel())](grad_y, gate, up, dgate, dup, gate.numel(), BLOCK=BLOCK)
    return dgate, dup


def aot_specs():
    """The variants CI compiles ahead of time for sm_80 and sm_90 (see mrgfast.ops.backends.triton.aot)."""
    from mrgfast.ops.backends.triton.aot import AotSpec

    specs = []
    for dtype in ("bf16", "fp32"):  # elementwise, no dots
        ptr = f"*{dtype}"
        specs.append(AotSpec(dtype, swiglu_forward_kernel, {"GATE": ptr, "UP": ptr, "Y": ptr}, dict(BLOCK=BLOCK),
                             tensor_cores=()))
        specs.append(AotSpec(dtype, swiglu_backward_kernel,
                             {"DY": ptr, "GATE": ptr, "UP": ptr, "DGATE": ptr, "DUP": ptr}, dict(BLOCK=BLOCK),
                             tensor_cores=()))
    return specs
