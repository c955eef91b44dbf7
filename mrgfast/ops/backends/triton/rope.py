"""Triton RoPE: x * cos + rotate_half(x) * sin over [tokens, heads, head_dim] in one pass, and its transpose.

Each program rotates one token's heads in blocks. Products and the sum are rounded to x's dtype where HF's eager
code rounds them, so bf16 results match it. The tables are per token, so M-RoPE's interleaved bands need nothing
more.
"""

import torch
import triton
import triton.language as tl

from mrgfast.ops.backends.triton.common import launch_settings

BLOCK_H = 16  # heads per program: the tile is [BLOCK_H, head_dim / 2], small for any head_dim


@triton.jit
def rope_kernel(
    X, COS, SIN, Y,
    H, HALF, stride_xt, stride_xh, stride_ct,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Forward: (y1, y2) = (x1 c1 - x2 s1, x2 c2 + x1 s2); BACKWARD applies the transpose,
    (x1 c1 + x2 s2, x2 c2 - x1 s1), to the incoming gradient. Y is contiguous [T, H, 2 * HALF]."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask_c = cols < HALF
    mask = (heads < H)[:, None] & mask_c[None, :]
    dtype = Y.dtype.element_ty
    # The tables are cast to x's dtype first, as HF does, then every product and the sum rounded to it.
    c1 = tl.load(COS + token * stride_ct + cols, mask=mask_c, other=0.0).to(dtype).to(tl.float32)[None, :]
    c2 = tl.load(COS + token * stride_ct + HALF + cols, mask=mask_c, other=0.0).to(dtype).to(tl.float32)[None, :]
    s1 = tl.load(SIN + token * stride_ct + cols, mask=mask_c, other=0.0).to(dtype).to(tl.float32)[None, :]
    s2 = tl.load(SIN + token * stride_ct + HALF + cols, mask=mask_c, other=0.0).to(dtype).to(tl.float32)[None, :]
    row = X + token * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    x1 = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = (x1 * c1).to(dtype).to(tl.float32) + (x2 * s2).to(dtype).to(tl.float32)
        y2 = (x2 * c2).to(dtype).to(tl.float32) - (x1 * s1).to(dtype).to(tl.float32)
    else:
        y1 = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
        y2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    out = Y + token * H * 2 * HALF + heads[:, None] * 2 * HALF + cols[None, :]
    tl.store(out, y1.to(dtype), mask=mask)
    tl.store(out + HALF, y2.to(dtype), mask=mask)


def rope_apply(x, cos, sin, backward: bool = False):
    """The rotation of x [T, H, D] (last dim contiguous) by tables [T, D] (rows contiguous); backward: its
    transpose, for a gradient. Returns a contiguous tensor in x's dtype."""
    T, H, D = x.shape
    settings = launch_settings(x)
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T and H:
        half = D // 2
        grid = (T, triton.cdiv(H, BLOCK_H))
        rope_kernel[grid](x, cos, sin, y, H, half, x.stride(0), x.stride(1), cos.stride(0),
                          BACKWARD=backward, BLOCK_H=BLOCK_H, BLOCK_HALF=triton.next_power_of_2(half),
                          num_warps=1 if settings.interpret else 4)
    return y


def aot_specs():
    """The variants CI compiles ahead of time for sm_80 and sm_90 (see mrgfast.ops.backends.triton.aot)."""
    from mrgfast.ops.backends.triton.aot import AotSpec

    specs = []
    for dtype in ("bf16", "fp32"):  # no dots; head_dim 128 (Llama, Qwen2-VL)
        for backward in (False, True):
            specs.append(AotSpec(f"{dtype} d=128 {'backward' if backward else 'forward'}", rope_kernel,
                                 {"X": f"*{dtype}", "COS": "*fp32", "SIN": "*fp32", "Y": f"*{dtype}"},
                                 dict(BACKWARD=backward, BLOCK_H=BLOCK_H, BLOCK_HALF=64), tensor_cores=()))
    return specs
