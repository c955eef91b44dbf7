"""CPU LoRA linear: LoRA terms go in place into the base GEMM outputs; dropout works one row block at a time."""

import functools
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from mrgfast.ops.dropout import torch_keep_mask

# Rows per dropout block hold about this many elements (4 MiB fp32): the block's mask and masked copy stay
# in cache, and no [tokens, in] mask or masked copy of x is ever alive.
BLOCK_ELEMENTS = 1 << 20
DRAW_BITS = 24  # torch.rand's float32 value is the low 24 bits of one mt19937 word, divided by 2**24


@functools.cache
def numpy_matches_torch_rand() -> bool:
    """Whether numpy's legacy MT19937 reproduces torch.rand's CPU float32 stream here (checked once).

    torch.rand is serial and ~2x slower than numpy's generator; both are mt19937 seeded the same way.
    If a torch or numpy release changes either, this returns False and masks come from torch itself.
    """
    for seed in (0, 20240601, 2**32 - 1):
        want = torch.rand((3, 1000), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        state = np.random.RandomState(seed)
        # Two draws in a row, as keep_blocks makes them: the stream must continue across blocks.
        draws = np.concatenate([state.randint(0, 1 << DRAW_BITS, size=(1, 1000), dtype=np.uint32),
                                state.randint(0, 1 << DRAW_BITS, size=(2, 1000), dtype=np.uint32)])
        if not torch.equal(torch.from_numpy(draws.astype(np.float64)), want.double() * 2**DRAW_BITS):
            return False
    return True


@functools.lru_cache(maxsize=64)
def keep_threshold(p: float) -> int:
    """Smallest 24-bit draw k whose torch.rand value k / 2**24 passes `>= p`, compared exactly as torch does."""
    guess = int(p * 2**DRAW_BITS)
    draws = torch.arange(guess - 2, guess + 3, dtype=torch.float64)
    passes = (draws / 2**DRAW_BITS).to(torch.float32) >= p  # k / 2**24 is exact in float32
    return int(draws[passes.nonzero()[0, 0]].item())


def fast_draws_usable(seed: int) -> bool:
    """Whether keep_blocks may draw with numpy: same stream as torch_keep_mask for this seed and dtype."""
    return torch.get_default_dtype() == torch.float32 and 0 <= seed < 2**32 and numpy_matches_torch_rand()


def block_rows(cols: int) -> int:
    """Rows per dropout block for rows of `cols` elements."""
    return max(1, BLOCK_ELEMENTS // max(cols, 1))


def keep_blocks(rows: int, cols: int, p: float, seed: int, rows_per_block: int) -> Iterator[tuple[int, int, Tensor]]:
    """(start, stop, keep) for consecutive row blocks of torch_keep_mask(rows, cols, p, seed).

    `keep` is a bool view that the next block overwrites: use it before asking for the next one.
    """
    if not fast_draws_usable(seed):
        keep = torch_keep_mask(rows, cols, p, seed, torch.device("cpu"))
        for start in range(0, rows, rows_per_block):
            yield start, min(start + rows_per_block, rows), keep[start:start + rows_per_block]
        return
    state = np.random.RandomState(seed)
    threshold = keep_threshold(p)
    buffer = torch.empty(min(rows_per_block, rows), cols, dtype=torch.bool)
    for start in range(0, rows, rows_per_block):
        stop = min(start + rows_per_block, rows)
        keep = buffer[: stop - start]
        draws = state.randint(0, 1 << DRAW_BITS, size=(stop - start, cols), dtype=np.uint32)
        np.greater_equal(draws, threshold, out=keep.numpy())
        yield start, stop, keep


def dropped_xa(x: Tensor, lora_a: Tensor, dropout_p: float, seed: int) -> Tensor:
    """drop(x) A^T [tokens, r], built block by block; 1/(1-p) is applied to the r-wide result."""
    rows, cols = x.shape
    xa = torch.empty(rows, lora_a.shape[0], dtype=x.dtype)
    per_block = block_rows(cols)
    scratch = torch.empty(min(per_block, rows), cols, dtype=x.dtype)
    for start, stop, keep in keep_blocks(rows, cols, dropout_p, seed, per_block):
        masked = torch.mul(x[start:stop], keep, out=scratch[: stop - start])
        torch.mm(masked, lora_a.t(), out=xa[start:stop])
    return xa.mul_(1.0 / (1.0 - dropout_p))


def dropped_grads(x: Tensor, lora_a: Tensor, dyb: Tensor, grad_x: Optional[Tensor], dropout_p: float, seed: int,
                  need_a: bool) -> Optional[Tensor]:
    """Add keep * (dyb A) into grad_x (if given); return dyb^T (keep * x) if need_a. dyb carries 1/(1-p)."""
    rows, cols = x.shape
    grad_a = torch.zeros(lora_a.shape, dtype=x.dtype) if need_a else None
    per_block = block_rows(cols)
    scratch = torch.empty(min(per_block, rows), cols, dtype=x.dtype)
    for start, stop, keep in keep_blocks(rows, cols, dropout_p, seed, per_block):
        part = scratch[: stop - start]
        if grad_x is not None:
            torch.mm(dyb[start:stop], lora_a, out=part)
            grad_x[start:stop].addcmul_(part, keep)
        if grad_a is not None:
            torch.mul(x[start:stop], keep, out=part)
            grad_a.addmm_(dyb[start:stop].t(), part)
    return grad_a


def lora_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    """Return (y, xa) with xa = drop(x) A^T kept for backward."""
    xa = torch.mm(x, lora_a.t()) if dropout_p == 0.0 else dropped_xa(x, lora_a, dropout_p, seed)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    y.addmm_(xa, lora_b.t(), alpha=scaling)
    return y, xa


def lora_backward(grad_y, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, *,
                  need_x, need_weight, need_bias, need_a, need_b):
    """Gradients (x, weight, bias, lora_a, lora_b); None where not needed. The mask is redrawn from seed."""
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need_x or need_a:
        # scaling and 1/(1-p) go into the r-wide dyb, never into a [tokens, in] tensor.
        dyb = torch.mm(grad_y, lora_b).mul_(scaling / (1.0 - dropout_p))
    if need_x:
        grad_x = torch.mm(grad_y, weight)
    if dropout_p == 0.0:
        if need_x:
            grad_x.addmm_(dyb, lora_a)
        if need_a:
            grad_a = torch.mm(dyb.t(), x)
    elif need_x or need_a:
        # The dropout mask is redrawn from the seed rather than saved: [tokens, in] bytes are not kept alive.
        grad_a = dropped_grads(x, lora_a, dyb, grad_x, dropout_p, seed, need_a)
    if need_weight:
        grad_w = torch.mm(grad_y.t(), x)
    if need_bias:
        grad_bias = grad_y.sum(0)
    if need_b:
        grad_b = torch.mm(grad_y.t(), xa).mul_(scaling)
    return grad_x, grad_w, grad_bias, grad_a, grad_b
