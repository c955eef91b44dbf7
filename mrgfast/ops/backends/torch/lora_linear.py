"""Torch LoRA linear ("cpu" backend): base GEMMs accumulate onto the r-wide LoRA terms; dropout by row blocks."""

import functools
import threading
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from mrgfast.ops.dropout import torch_keep_mask

# Rows per dropout block hold about this many elements (a 4 MiB fp32 mask): no [tokens, in] mask or masked
# copy of x is ever alive, and blocks are big enough that per-block op overheads stay small (measured:
# 2^16..2^18 were slower at 512 x 1024 on 2 cores, and no faster at 2048 x 4096).
BLOCK_ELEMENTS = 1 << 20
DRAW_BITS = 24  # torch.rand's float32 value is the low 24 bits of one mt19937 word, divided by 2**24
_local = threading.local()  # one numpy generator per thread: reseeding is ~50x cheaper than constructing


def seeded_state(seed: int) -> np.random.RandomState:
    """This thread's numpy MT19937, reseeded to `seed` (legacy seeding: the same as torch's manual_seed)."""
    state = getattr(_local, "state", None)
    if state is None:
        state = _local.state = np.random.RandomState()
    state.seed(seed)
    return state


@functools.cache
def numpy_matches_torch_rand() -> bool:
    """Whether numpy's legacy MT19937 reproduces torch.rand's CPU float32 stream here (checked once).

    torch.rand is serial and ~2x slower than numpy's generator; both are mt19937 seeded the same way.
    If a torch or numpy release changes either, this returns False and masks come from torch itself.
    """
    for seed in (0, 20240601, 2**32 - 1):
        want = torch.rand((3, 1000), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        state = seeded_state(seed)
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


def keep_blocks(rows: int, cols: int, p: float, seed: int,
                rows_per_block: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, flags) for consecutive row blocks of torch_keep_mask(rows, cols, p, seed), as numpy bools.

    `flags` is a view of one buffer that the next block overwrites: callers must be done with it before asking for
    the next block. Draws come from this thread's one generator: exhaust one keep_blocks before starting another in
    the same thread.
    """
    flags = np.empty((min(rows_per_block, rows), cols), dtype=bool)
    if not fast_draws_usable(seed):
        mask = torch_keep_mask(rows, cols, p, seed, torch.device("cpu")).numpy()
        for start in range(0, rows, rows_per_block):
            stop = min(start + rows_per_block, rows)
            yield start, stop, mask[start:stop]
        return
    state = seeded_state(seed)
    threshold = keep_threshold(p)
    for start in range(0, rows, rows_per_block):
        stop = min(start + rows_per_block, rows)
        draws = state.randint(0, 1 << DRAW_BITS, size=(stop - start, cols), dtype=np.uint32)
        yield start, stop, np.greater_equal(draws, threshold, out=flags[: stop - start])


def as_float(flags: np.ndarray, buffer: Tensor) -> Tensor:
    """The bool `flags` as 1/0 in the leading rows of `buffer` (a float mask: torch multiplies float by bool ~5x
    slower than float by float)."""
    return buffer[: flags.shape[0]].copy_(torch.from_numpy(flags))


def dropped_xa(x: Tensor, lora_a: Tensor, dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
    """(drop(x) A^T [tokens, r], the keep mask packed 8 flags a byte [tokens, ceil(in/8)]), block by block;
    1/(1-p) is applied to the r-wide result."""
    rows, cols = x.shape
    per_block = block_rows(cols)
    xa = torch.empty(rows, lora_a.shape[0], dtype=x.dtype)
    keep_bits = torch.empty(rows, (cols + 7) // 8, dtype=torch.uint8)
    keep = torch.empty(min(per_block, rows), cols, dtype=x.dtype)
    for start, stop, flags in keep_blocks(rows, cols, dropout_p, seed, per_block):
        keep_bits[start:stop] = torch.from_numpy(np.packbits(flags, axis=1))
        torch.mm(as_float(flags, keep).mul_(x[start:stop]), lora_a.t(), out=xa[start:stop])
    return xa.mul_(1.0 / (1.0 - dropout_p)), keep_bits


def dropped_grads(x: Tensor, lora_a: Tensor, dyb: Tensor, grad_x: Optional[Tensor], keep_bits: Tensor,
                  need_a: bool) -> Optional[Tensor]:
    """Write keep * (dyb A) into grad_x (if given); return dyb^T (keep * x) if need_a. dyb carries 1/(1-p); the
    mask comes from forward's `keep_bits`."""
    rows, cols = x.shape
    per_block = block_rows(cols)
    grad_a = torch.zeros(lora_a.shape, dtype=x.dtype) if need_a else None
    keep = torch.empty(min(per_block, rows), cols, dtype=x.dtype)
    for start in range(0, rows, per_block):
        stop = min(start + per_block, rows)
        block = as_float(np.unpackbits(keep_bits[start:stop].numpy(), axis=1, count=cols).view(bool), keep)
        if grad_x is not None:
            torch.mm(dyb[start:stop], lora_a, out=grad_x[start:stop]).mul_(block)
        if grad_a is not None:
            grad_a.addmm_(dyb[start:stop].t(), block.mul_(x[start:stop]))
    return grad_a


def lora_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    """Return (y, saved): saved = (xa,) with xa = drop(x) A^T, and with dropout the packed keep mask, for backward."""
    if dropout_p == 0.0:
        xa = torch.mm(x, lora_a.t())
        saved = (xa,)
    else:
        xa, keep_bits = dropped_xa(x, lora_a, dropout_p, seed)
        saved = (xa, keep_bits)
    # The r-wide LoRA product first, then the base GEMM accumulates onto it (beta=1 is free inside the GEMM,
    # which loads its output tiles anyway): one pass over y fewer than adding the LoRA term afterwards.
    if bias is not None:
        y = torch.addmm(bias, xa, lora_b.t(), alpha=scaling)
    else:
        y = torch.mm(xa, lora_b.t()).mul_(scaling)
    y.addmm_(x, weight.t())
    return y, saved


def lora_backward(grad_y, x, weight, lora_a, lora_b, saved, scaling, dropout_p, seed, *,
                  need_x, need_weight, need_bias, need_a, need_b):
    """Gradients (x, weight, bias, lora_a, lora_b); None where not needed. The mask is forward's, unpacked."""
    xa = saved[0]
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need_x or need_a:
        # scaling and 1/(1-p) go into the r-wide dyb, never into a [tokens, in] tensor.
        dyb = torch.mm(grad_y, lora_b).mul_(scaling / (1.0 - dropout_p))
    if need_x:
        # The r-wide term first, then the base GEMM accumulates onto it (as in forward).
        grad_x = torch.empty(x.shape, dtype=x.dtype) if dropout_p else torch.mm(dyb, lora_a)
    if dropout_p == 0.0:
        if need_a:
            grad_a = torch.mm(dyb.t(), x)
    elif need_x or need_a:
        # The mask comes back from forward's bits (1/8 byte an element of x): redrawing it from the seed, as the GPU
        # kernels do, costs a serial mt19937 draw here (about 5 % of the frozen layer's step at 2048 x 4096).
        grad_a = dropped_grads(x, lora_a, dyb, grad_x, saved[1], need_a)
    if need_x:
        grad_x.addmm_(grad_y, weight)
    if need_weight:
        grad_w = torch.mm(grad_y.t(), x)
    if need_bias:
        grad_bias = grad_y.sum(0)
    if need_b:
        # (xa^T dy)^T, not dy^T xa: MKL streams dy row-major this way, ~1.2-2x faster; the copy is [out, r].
        grad_b = torch.mm(xa.t(), grad_y).mul_(scaling).t().contiguous()
    return grad_x, grad_w, grad_bias, grad_a, grad_b
