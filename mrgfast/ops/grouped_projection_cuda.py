"""CUDA grouped projection: kernels/group_tokens.cu's fused LayerNorm+gather writes Z, cuBLAS does the GEMMs.

The second GPU backend beside the Triton kernels (which never materialise Z): the CPU strategy of
grouped_projection_cpu.py with the CUDA grouping kernels.
"""

from mrgfast.ops import group_tokens_cuda
from mrgfast.ops.grouped_projection_cpu import materialized_backward, materialized_forward


def forward(x, weight, bias, norm_weight, norm_bias, layout, normalize, eps):
    """(y [B*groups, out], saved tensors): the CUDA fused LayerNorm+gather, then addmm."""
    return materialized_forward(group_tokens_cuda, x, weight, bias, norm_weight, norm_bias, layout, normalize, eps)


def backward(grad_y, x, weight, norm_weight, norm_bias, saved, layout, normalize, eps, **needs):
    """Gradients (x, weight, bias, norm weight, norm bias); None where not needed."""
    return materialized_backward(group_tokens_cuda, grad_y, x, weight, norm_weight, norm_bias, saved, layout,
                                 normalize, eps, **needs)
