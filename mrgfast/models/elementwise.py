"""How the decoder runs its elementwise work around the GEMMs (`fused_elementwise`): eagerly, through mrgfast's fused
ops, or as torch.compile'd regions.

The three regions are the same in every mode: RMSNorm (with the residual add before it, where a block has one),
RoPE of q or k, and SwiGLU's silu(gate) * up. `off` is the eager code exactly (bit-identical to the decoder before
this setting existed); which of `triton` and `compile` is faster is for a GPU measurement to say (benchmarks/README.md).
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from mrgfast.ops.rms_norm import reference_rms_norm, rms_norm
from mrgfast.ops.rope import reference_rope, rope
from mrgfast.ops.swiglu import reference_swiglu, swiglu

MODES = ("off", "triton", "compile")


def add_norm(x: Tensor, weight: Tensor, eps: float, residual: Optional[Tensor] = None):
    """(RMSNorm(x + residual) * weight, x + residual); without a residual, (RMSNorm(x) * weight, x)."""
    if residual is None:
        return reference_rms_norm(x, weight, eps)
    h = residual + x  # the residual stream first, as the block has always written it
    return reference_rms_norm(h, weight, eps)[0], h


class Elementwise:
    """The eager regions (`off`): HF's math, op for op."""

    mode = "off"

    def norm(self, x: Tensor, weight: Tensor, eps: float, residual: Optional[Tensor] = None):
        """(RMSNorm(x + residual) * weight, x + residual); without a residual, (RMSNorm(x) * weight, x)."""
        return add_norm(x, weight, eps, residual)

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [T, heads, head_dim] rotated by the tables [T, head_dim]."""
        return reference_rope(x, cos, sin)

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        """silu(gate) * up."""
        return reference_swiglu(gate, up)


class FusedOps(Elementwise):
    """`triton`: mrgfast's fused ops (Triton kernels on CUDA tensors; the reference on CPU unless MRGFAST_BACKEND says
    triton, with the interpreter)."""

    mode = "triton"

    def norm(self, x, weight, eps, residual=None):
        return rms_norm(x, weight, eps, residual)

    def rope(self, x, cos, sin):
        return rope(x, cos, sin)

    def swiglu(self, gate, up):
        return swiglu(gate, up)


@functools.cache
def compiled(region):
    """`region` under torch.compile (inductor), made once per process (dynamo then keeps a graph per shape class)."""
    return torch.compile(region)


class CompiledRegions(Elementwise):
    """`compile`: the eager regions, each one torch.compile'd graph (the add fused with the norm)."""

    mode = "compile"

    def norm(self, x, weight, eps, residual=None):
        return compiled(add_norm)(x, weight, eps, residual)

    def rope(self, x, cos, sin):
        return compiled(reference_rope)(x, cos, sin)

    def swiglu(self, gate, up):
        return compiled(reference_swiglu)(gate, up)


STRATEGIES = {"off": Elementwise(), "triton": FusedOps(), "compile": CompiledRegions()}


def elementwise(mode: str) -> Elementwise:
    """The regions of one `fused_elementwise` mode; an unknown mode is an error."""
    if mode not in STRATEGIES:
        raise ValueError(f"fused_elementwise must be one of {', '.join(MODES)}, got {mode!r}")
    return STRATEGIES[mode]
