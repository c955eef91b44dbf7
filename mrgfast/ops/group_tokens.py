"""Visual-token grouping: concatenate each group of tokens into one (PeFoMed's 1d view, Qwen2-VL's 2x2 merge)."""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mrgfast.ops.backend import select_backend
from mrgfast.ops.backends.native import group_tokens as native_kernels

IMPLEMENTED = ("cpu", "triton", "cuda")
MODES = ("1d", "2d")


def kernels(backend: str):
    """The kernels of `backend`: native (C++ or CUDA by device), or Triton's, imported here as triton is optional."""
    if backend == "triton":
        from mrgfast.ops.backends.triton import group_tokens as triton_kernels
        return triton_kernels
    return native_kernels


@dataclass(frozen=True)
class GroupLayout:
    """Where every grouped slot reads from: tokens form an (height, width) row-major grid, cut into
    (block_h, block_w) blocks taken in row-major order, neighbours in (row, col) order inside a block.

    1d grouping is the 1 x N grid with 1 x group blocks; 2d is the h x w grid with s x s blocks. The grid is
    padded with zero tokens at the bottom / right up to whole blocks (only when pad=True was asked for).
    """

    batch: int
    height: int
    width: int
    block_h: int
    block_w: int
    dim: int

    @property
    def tokens(self) -> int:
        """Source tokens per image (height * width)."""
        return self.height * self.width

    @property
    def group(self) -> int:
        """Tokens concatenated into one grouped token."""
        return self.block_h * self.block_w

    @property
    def mode(self) -> str:
        """"1d" (blocks of one row) or "2d" (s x s blocks; a 2d grid one row high still has them)."""
        return "1d" if self.block_h == 1 else "2d"

    @property
    def blocks_h(self) -> int:
        """Block rows (padded grid height / block_h)."""
        return -(-self.height // self.block_h)

    @property
    def blocks_w(self) -> int:
        """Block columns (padded grid width / block_w)."""
        return -(-self.width // self.block_w)

    @property
    def groups(self) -> int:
        """Grouped tokens per image."""
        return self.blocks_h * self.blocks_w

    @property
    def padded(self) -> bool:
        """Whether some grouped slots are zero padding."""
        return self.height % self.block_h != 0 or self.width % self.block_w != 0

    @property
    def is_view(self) -> bool:
        """Whether grouping is a plain reshape of contiguous x (1d or 1 x 1 blocks, no padding)."""
        return not self.padded and (self.height == 1 or self.group == 1)

    def forward_buffers(self, x: Tensor, normalize: bool, with_output: bool = True):
        """Empty (z [B, groups, group*D] or None, mean [B*N] fp32 or None, rstd [B*N] fp32 or None) that the
        native norm+gather kernels fill."""
        z = x.new_empty(self.batch, self.groups, self.group * self.dim) if with_output else None
        mean, rstd = (x.new_empty(self.batch * self.tokens, dtype=torch.float32) if normalize else None
                      for _ in range(2))
        return z, mean, rstd

    def kernel_sizes(self) -> tuple[int, int, int, int, int, int]:
        """(batch, height, width, block_h, block_w, dim): the layout as every kernel takes it."""
        return self.batch, self.height, self.width, self.block_h, self.block_w, self.dim


def _positive_int(value, name: str) -> int:
    """`value` as an int >= 1, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def group_layout(shape, group: int, mode: str = "1d", grid: Optional[tuple[int, int]] = None,
                 pad: bool = False) -> GroupLayout:
    """Validate a grouping of tokens of `shape` [B, N, D]; ValueError naming what is wrong."""
    if len(shape) != 3:
        raise ValueError(f"x must be [batch, tokens, dim], got shape {tuple(shape)}")
    batch, tokens, dim = (int(s) for s in shape)
    group = _positive_int(group, "group")
    if mode not in MODES:
        raise ValueError(f"mode must be '1d' or '2d', got {mode!r}")
    if mode == "1d":
        if grid is not None:
            raise ValueError(f"grid is only used with mode='2d' (1d groups consecutive tokens), got grid={grid!r}")
        if tokens % group and not pad:
            raise ValueError(f"N={tokens} tokens is not divisible by group={group}; pass pad=True to pad with "
                             "zero tokens at the end")
        return GroupLayout(batch, 1, tokens, 1, group, dim)
    side = math.isqrt(group)
    if side * side != group:
        raise ValueError(f"mode='2d' groups s x s neighbours: group must be a square (4, 9, ...), got {group}")
    if grid is None or len(tuple(grid)) != 2:
        raise ValueError(f"mode='2d' needs grid=(h, w) with h * w = N={tokens}, got grid={grid!r}")
    height, width = (_positive_int(v, "grid") for v in grid)
    if height * width != tokens:
        raise ValueError(f"grid=({height}, {width}) holds {height * width} tokens but x has N={tokens}")
    if (height % side or width % side) and not pad:
        raise ValueError(f"grid h={height}, w={width} is not divisible by the {side} x {side} block of "
                         f"group={group}; pass pad=True to pad rows at the bottom / columns at the right")
    return GroupLayout(batch, height, width, side, side, dim)


def routing_case(layout: GroupLayout) -> str:
    """The op's case in mrgfast.ops.routing for a grouping that is not a free view: 1d (padded) or 2d, padded or not."""
    if layout.mode == "1d":
        return "1d_pad"
    return "2d_pad" if layout.padded else "2d"


def reference_group_tokens(x: Tensor, layout: GroupLayout) -> Tensor:
    """Pure-torch grouping: zero-pad the grid, cut it into blocks, permute neighbours next to each other."""
    batch, h, w, bh, bw, dim = layout.kernel_sizes()
    grid = x.reshape(batch, h, w, dim)
    if layout.padded:  # F.pad copies x even when it adds nothing: one more pass over memory each way
        grid = F.pad(grid, (0, 0, 0, layout.blocks_w * bw - w, 0, layout.blocks_h * bh - h))
    blocks = grid.reshape(batch, layout.blocks_h, bh, layout.blocks_w, bw, dim).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(batch, layout.groups, layout.group * dim)


def group_tokens(x: Tensor, group: int, mode: str = "1d", grid: Optional[tuple[int, int]] = None,
                 pad: bool = False) -> Tensor:
    """Concatenate groups of tokens: [B, N, D] -> [B, groups, group * D].

    mode="1d": each `group` consecutive tokens (PeFoMed's `x.view(B, N // 4, 4 * D)`); without padding on a
    contiguous x the result is that free view of x (no copy, no kernel). mode="2d": the s x s neighbours
    (s * s = group) of the row-major grid `grid=(h, w)`, blocks in row-major order, neighbours in (row, col)
    order (Qwen2-VL's 2x2 merge). Sizes that do not divide raise ValueError, or pad with zero tokens
    (1d: at the end; 2d: rows at the bottom, columns at the right) when pad=True.
    """
    layout = group_layout(x.shape, group, mode, grid, pad)
    if layout.is_view:
        return x.reshape(layout.batch, layout.groups, layout.group * layout.dim)
    backend = select_backend("group_tokens", x, IMPLEMENTED, routing_case(layout), x.numel())
    if backend == "reference":
        return reference_group_tokens(x, layout)
    return GroupTokensFunction.apply(x, layout, backend)


class GroupTokensFunction(torch.autograd.Function):
    """Grouping as a gather; its backward is the inverse permutation (pad slots dropped), nothing is saved."""

    @staticmethod
    def forward(ctx, x, layout, backend):
        ctx.config = (layout, backend)
        return kernels(backend).group(x.contiguous(), layout)

    @staticmethod
    def backward(ctx, grad_out):
        layout, backend = ctx.config
        return kernels(backend).ungroup(grad_out.contiguous(), layout), None, None
