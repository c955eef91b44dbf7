"""Native grouped projection: the native norm+gather (native/group_tokens.py) writes the grouped matrix Z, then
one GEMM (BLAS on CPU, cuBLAS on CUDA) projects it.

Z is dropped after the forward and recomputed in backward (a cheap O(tokens * D) pass against the GEMMs'
O(tokens * D * out)), so only x is kept alive for backward instead of LayerNorm's output and the grouped copy.
(The Triton backend never materialises Z at all.)
"""

import torch

from mrgfast.ops.backends.native import group_tokens


def grouped(x, layout, norm_weight, norm_bias, eps, normalize, with_output=True):
    """(Z [B, groups, group*D] or None, mean, rstd); a free view of x when grouping is a plain reshape."""
    if not normalize and layout.is_view:
        return x.view(layout.batch, layout.groups, layout.group * layout.dim), None, None
    return group_tokens.normalize_group(x, layout, norm_weight, norm_bias, eps, normalize, with_output)


def forward(x, weight, bias, norm_weight, norm_bias, layout, normalize, eps):
    """(y [B*groups, out], nothing saved): Z from the fused norm+gather, then y = Z W^T + b."""
    z = grouped(x, layout, norm_weight, norm_bias, eps, normalize)[0]
    z = z.view(layout.batch * layout.groups, layout.group * layout.dim)
    y = torch.addmm(bias, z, weight.t()) if bias is not None else torch.mm(z, weight.t())
    return y, ()


def backward(grad_y, x, weight, norm_weight, norm_bias, saved, layout, normalize, eps, *,
             need_x, need_weight, need_bias, need_gamma, need_beta):
    """Gradients (x, weight, bias, norm weight fp32, norm bias fp32), None where not needed; Z is recomputed
    only for dW, statistics only for the LayerNorm backward, dZ = dY W only when x or the norm need it."""
    grad_x = grad_w = grad_b = grad_gamma = grad_beta = None
    need_tokens = need_x or (normalize and (need_gamma or need_beta))
    z = mean = rstd = None
    if need_weight or (normalize and need_tokens):
        z, mean, rstd = grouped(x, layout, norm_weight, norm_bias, eps, normalize, need_weight)
    if need_weight:
        grad_w = torch.mm(grad_y.t(), z.view(grad_y.shape[0], weight.shape[1]))
    del z  # free the recomputed Z before dZ is allocated: the two are never alive together
    if need_bias:
        grad_b = grad_y.sum(0)
    if need_tokens:
        grad_z = torch.mm(grad_y, weight).view(layout.batch, layout.groups, weight.shape[1])
        if not normalize and layout.is_view:
            grad_x = grad_z.view(x.shape)
        else:
            grad_x, grad_gamma, grad_beta = group_tokens.ungroup_backward(
                grad_z, x, layout, mean, rstd, norm_weight, normalize, need_x, need_gamma, need_beta)
    return grad_x, grad_w, grad_b, grad_gamma, grad_beta
