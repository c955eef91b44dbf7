"""Triton token grouping: slot <-> token index maps shared with the fused projector, a gather and its inverse."""

import torch
import triton
import triton.language as tl

from mrgfast.ops.backends.triton.common import launch_settings

BLOCK_ROWS = 16  # slots (or tokens) per program: rows are copied whole, D is tiled by BLOCK_D


@triton.jit
def slot_source(m, j, GROUPS, TOKENS, HEIGHT, WIDTH, BLOCKS_W, GROUP_H: tl.constexpr, GROUP_W: tl.constexpr):
    """(flat source token b*TOKENS + row*WIDTH + col as int64, is-real) of neighbour j of flat grouped row m.

    Tokens form a row-major (HEIGHT, WIDTH) grid cut into (GROUP_H, GROUP_W) blocks, BLOCKS_W per block row;
    neighbour j is (j // GROUP_W, j % GROUP_W) inside its block; outside the grid it is zero padding.
    """
    b = m // GROUPS
    mi = m % GROUPS
    row = (mi // BLOCKS_W) * GROUP_H + j // GROUP_W
    col = (mi % BLOCKS_W) * GROUP_W + j % GROUP_W
    real = (row < HEIGHT) & (col < WIDTH)
    return b.to(tl.int64) * TOKENS + row * WIDTH + col, real


@triton.jit
def token_slot(token, GROUPS, TOKENS, WIDTH, BLOCKS_W, GROUP_H: tl.constexpr, GROUP_W: tl.constexpr):
    """Flat slot (grouped row * group + neighbour, int64) that flat token `token` lands in: slot_source's inverse."""
    b = token // TOKENS
    t = token % TOKENS
    row = t // WIDTH
    col = t % WIDTH
    m = b.to(tl.int64) * GROUPS + (row // GROUP_H) * BLOCKS_W + col // GROUP_W
    return m * (GROUP_H * GROUP_W) + (row % GROUP_H) * GROUP_W + col % GROUP_W


@triton.jit
def group_kernel(X, OUT, SLOTS, D, GROUPS, TOKENS, HEIGHT, WIDTH, BLOCKS_W,
                 GROUP_H: tl.constexpr, GROUP_W: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[slot, :] = X[source token of slot, :], zeros for padding slots (OUT is [SLOTS, D] flat)."""
    slots = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_range = slots < SLOTS
    mask_d = offs_d < D
    group = GROUP_H * GROUP_W
    token, real = slot_source(slots // group, slots % group, GROUPS, TOKENS, HEIGHT, WIDTH, BLOCKS_W,
                              GROUP_H, GROUP_W)
    values = tl.load(X + token[:, None] * D + offs_d[None, :], mask=(in_range & real)[:, None] & mask_d[None, :],
                     other=0.0)
    tl.store(OUT + slots.to(tl.int64)[:, None] * D + offs_d[None, :], values,
             mask=in_range[:, None] & mask_d[None, :])


@triton.jit
def ungroup_kernel(GRAD, DX, N_TOKENS, D, GROUPS, TOKENS, WIDTH, BLOCKS_W,
                   GROUP_H: tl.constexpr, GROUP_W: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """DX[token, :] = GRAD[slot of token, :]: the inverse permutation (padding slots are never read)."""
    tokens = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (tokens < N_TOKENS)[:, None] & (offs_d < D)[None, :]
    slot = token_slot(tokens, GROUPS, TOKENS, WIDTH, BLOCKS_W, GROUP_H, GROUP_W)
    values = tl.load(GRAD + slot[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DX + tokens.to(tl.int64)[:, None] * D + offs_d[None, :], values, mask=mask)


def layout_args(layout) -> tuple:
    """(GROUPS, TOKENS, HEIGHT, WIDTH, BLOCKS_W): the runtime layout arguments of the kernels."""
    return layout.groups, layout.tokens, layout.height, layout.width, layout.blocks_w


def _block_d(dim: int) -> int:
    """Feature tile: the whole row up to 256 features."""
    return min(256, triton.next_power_of_2(max(dim, 1)))


def group(x: torch.Tensor, layout) -> torch.Tensor:
    """x [B, N, D] grouped to [B, groups, group*D] (zero rows in padding slots)."""
    out = x.new_empty(layout.batch, layout.groups, layout.group * layout.dim)
    slots = layout.batch * layout.groups * layout.group
    if out.numel() == 0:
        return out
    launch_settings(x)  # raises outside the interpreter on CPU tensors
    block_d = _block_d(layout.dim)
    grid = (triton.cdiv(slots, BLOCK_ROWS), triton.cdiv(layout.dim, block_d))
    groups, tokens, height, width, blocks_w = layout_args(layout)
    group_kernel[grid](x, out, slots, layout.dim, groups, tokens, height, width, blocks_w,
                       GROUP_H=layout.block_h, GROUP_W=layout.block_w, BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=block_d)
    return out


def ungroup(grad: torch.Tensor, layout) -> torch.Tensor:
    """The gradient of group(): grouped [B, groups, group*D] back to [B, N, D], padding dropped."""
    dx = grad.new_empty(layout.batch, layout.tokens, layout.dim)
    if dx.numel() == 0:
        return dx
    launch_settings(grad)
    n_tokens = layout.batch * layout.tokens
    block_d = _block_d(layout.dim)
    grid = (triton.cdiv(n_tokens, BLOCK_ROWS), triton.cdiv(layout.dim, block_d))
    groups, tokens, _, width, blocks_w = layout_args(layout)
    ungroup_kernel[grid](grad, dx, n_tokens, layout.dim, groups, tokens, width, blocks_w,
                         GROUP_H=layout.block_h, GROUP_W=layout.block_w, BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=block_d)
    return dx


def aot_specs():
    """The gather and its inverse for bf16 and fp32, 1d (1 x 4) and 2d (2 x 2) groups; pure copies, no dots."""
    from mrgfast.ops.backends.triton.aot import AotSpec

    specs = []
    for dtype in ("bf16", "fp32"):
        for gh, gw in ((1, 4), (2, 2)):
            blocks = dict(GROUP_H=gh, GROUP_W=gw, BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=256)
            name = f"{dtype} {gh}x{gw}"
            specs.append(AotSpec(name, group_kernel, {"X": f"*{dtype}", "OUT": f"*{dtype}"}, blocks, tensor_cores=()))
            specs.append(AotSpec(name, ungroup_kernel, {"GRAD": f"*{dtype}", "DX": f"*{dtype}"}, blocks,
                                 tensor_cores=()))
    return specs
