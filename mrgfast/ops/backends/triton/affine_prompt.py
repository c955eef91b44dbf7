"""Triton kernels for affine prompt modulation: fused forward, per-sample gradients, prompt-bank gradient.

Shapes as in mrgfast.ops.affine_prompt: P [K, L, D] (K = 1 without weights), w [B, K], gamma/beta [B, D] or
[B, L, D], out/grad [B, T, D] with sample b's prompts at rows OFFSETS[b] + l. No atomics: every output
element is reduced by one program in a fixed order, so results are deterministic.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mrgfast.ops.backends.triton.common import launch_settings


@triton.jit
def buffer_rows(OFFSETS, b, T, HAS_OFFSETS: tl.constexpr):
    """Row of out/grad that holds prompt token 0 of sample b (int64: B*T*D may exceed int32)."""
    row = tl.cast(b, tl.int64) * T
    if HAS_OFFSETS:
        row += tl.load(OFFSETS + b)
    return row


@triton.jit
def bank_tile(P, W, b, l, K, L, D, offs_d, mask_d, HAS_WEIGHTS: tl.constexpr, BLOCK_K: tl.constexpr):
    """(P[:, l, offs_d] as a [BLOCK_K, BLOCK_D] fp32 tile, w[b, :] as [BLOCK_K]); one row of ones without weights."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    tile = tl.load(P + tl.cast(offs_k[:, None] * L + l, tl.int64) * D + offs_d[None, :],
                   mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    if HAS_WEIGHTS:
        wk = tl.load(W + b * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    else:
        wk = tl.where(mask_k, 1.0, 0.0)
    return tile, wk


@triton.jit
def affine_prompt_forward_kernel(
    P, GAMMA, BETA, W, OUT, OFFSETS, K, L, D, T,
    HAS_WEIGHTS: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (sample, token) row per program axis 0, BLOCK_D features per axis 1: out = mix * (1 + gamma) + beta."""
    row = tl.program_id(0)
    b, l = row // L, row % L
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    tile, wk = bank_tile(P, W, b, l, K, L, D, offs_d, mask_d, HAS_WEIGHTS, BLOCK_K)
    mix = tl.sum(wk[:, None] * tile, axis=0)
    mod = tl.cast(row if PER_TOKEN else b, tl.int64) * D + offs_d
    gamma = tl.load(GAMMA + mod, mask=mask_d, other=0.0).to(tl.float32)
    beta = tl.load(BETA + mod, mask=mask_d, other=0.0).to(tl.float32)
    dst = (buffer_rows(OFFSETS, b, T, HAS_OFFSETS) + l) * D + offs_d
    tl.store(OUT + dst, (mix * (1.0 + gamma) + beta).to(OUT.dtype.element_ty), mask=mask_d)


@triton.jit
def affine_prompt_grad_rows_kernel(
    G, P, GAMMA, W, OFFSETS, DGAMMA, DBETA, DW_PART, K, L, D, T, N_DBLOCKS,
    HAS_WEIGHTS: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    NEED_GAMMA: tl.constexpr, NEED_BETA: tl.constexpr, NEED_W: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per (sample, feature block), one pass over its L grad rows: dgamma, dbeta (summed over L when [B, D])
    and the block's dw partial sums DW_PART[b, block, :]."""
    b = tl.program_id(0)
    block = tl.program_id(1)
    offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    first_row = buffer_rows(OFFSETS, b, T, HAS_OFFSETS)
    sum_gamma = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sum_beta = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dw = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for l in range(0, L):
        g = tl.load(G + (first_row + l) * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        mod = tl.cast((b * L + l) if PER_TOKEN else b, tl.int64) * D + offs_d
        if NEED_BETA:
            if PER_TOKEN:
                tl.store(DBETA + mod, g.to(DBETA.dtype.element_ty), mask=mask_d)
            else:
                sum_beta += g
        if NEED_GAMMA or NEED_W:
            tile, wk = bank_tile(P, W, b, l, K, L, D, offs_d, mask_d, HAS_WEIGHTS, BLOCK_K)
            if NEED_GAMMA:
                dgamma = g * tl.sum(wk[:, None] * tile, axis=0)
                if PER_TOKEN:
                    tl.store(DGAMMA + mod, dgamma.to(DGAMMA.dtype.element_ty), mask=mask_d)
                else:
                    sum_gamma += dgamma
            if NEED_W:
                dm = g * (1.0 + tl.load(GAMMA + mod, mask=mask_d, other=0.0).to(tl.float32))
                dw += tl.sum(tile * dm[None, :], axis=1)
    if not PER_TOKEN:
        row = tl.cast(b, tl.int64) * D + offs_d
        if NEED_BETA:
            tl.store(DBETA + row, sum_beta.to(DBETA.dtype.element_ty), mask=mask_d)
        if NEED_GAMMA:
            tl.store(DGAMMA + row, sum_gamma.to(DGAMMA.dtype.element_ty), mask=mask_d)
    if NEED_W:
        offs_k = tl.arange(0, BLOCK_K)
        tl.store(DW_PART + tl.cast(b * N_DBLOCKS + block, tl.int64) * K + offs_k, dw, mask=offs_k < K)


@triton.jit
def affine_prompt_grad_prompts_kernel(
    G, GAMMA, W, OFFSETS, DP, B, K, L, D, T,
    HAS_WEIGHTS: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per (token l, feature block): dP[k, l, d] = sum_b w[b, k] * grad * (1 + gamma), b in order."""
    l = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_d, mask_k = offs_d < D, offs_k < K
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for b in range(0, B):
        g = tl.load(G + (buffer_rows(OFFSETS, b, T, HAS_OFFSETS) + l) * D + offs_d,
                    mask=mask_d, other=0.0).to(tl.float32)
        mod = tl.cast((b * L + l) if PER_TOKEN else b, tl.int64) * D + offs_d
        dm = g * (1.0 + tl.load(GAMMA + mod, mask=mask_d, other=0.0).to(tl.float32))
        if HAS_WEIGHTS:
            wk = tl.load(W + b * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        else:
            wk = tl.where(mask_k, 1.0, 0.0)
        acc += wk[:, None] * dm[None, :]
    dst = tl.cast(offs_k[:, None] * L + l, tl.int64) * D + offs_d[None, :]
    tl.store(DP + dst, acc.to(DP.dtype.element_ty), mask=mask_k[:, None] & mask_d[None, :])


# A program holds one [BLOCK_K, BLOCK_D] tile of the whole bank: BLOCK_K covers K and BLOCK_D shrinks as K grows,
# keeping the tile at TILE_ELEMENTS fp32 values (registers, no spills).
TILE_ELEMENTS = 2048


def block_sizes(book: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D): the bank in one tile; small feature blocks in the interpreter so tests cross block edges."""
    block_k = triton.next_power_of_2(max(book, 1))
    if interpret:
        return block_k, 64
    return block_k, max(16, min(256, TILE_ELEMENTS // block_k))


def shape_of(prompts: Tensor, gamma: Tensor, buffer: Tensor) -> tuple[int, int, int, int, int]:
    """(B, K, L, D, T) of a call."""
    length, dim = prompts.shape[-2:]
    return gamma.shape[0], prompts.shape[0] if prompts.dim() == 3 else 1, length, dim, buffer.shape[1]


def affine_forward(prompts: Tensor, gamma: Tensor, beta: Tensor, weights: Optional[Tensor], out: Tensor,
                   offsets: Optional[Tensor]) -> None:
    """Write the modulated prompts into out [B, T, D] at rows offsets[b] + l (offsets None: out is [B, L, D])."""
    batch, book, length, dim, rows = shape_of(prompts, gamma, out)
    settings = launch_settings(prompts)
    block_k, block_d = block_sizes(book, settings.interpret)
    grid = (batch * length, triton.cdiv(dim, block_d))
    affine_prompt_forward_kernel[grid](
        prompts, gamma, beta, weights if weights is not None else prompts, out,
        offsets if offsets is not None else prompts, book, length, dim, rows,
        HAS_WEIGHTS=weights is not None, PER_TOKEN=gamma.dim() == 3, HAS_OFFSETS=offsets is not None,
        BLOCK_K=block_k, BLOCK_D=block_d)


def affine_backward(grad: Tensor, prompts: Tensor, gamma: Tensor, weights: Optional[Tensor],
                    offsets: Optional[Tensor], *, need_prompts: bool, need_gamma: bool, need_beta: bool,
                    need_weights: bool) -> tuple:
    """(dP, dgamma, dbeta, dw) from grad [B, T, D]; None (and no kernel work) for gradients not needed."""
    batch, book, length, dim, rows = shape_of(prompts, gamma, grad)
    settings = launch_settings(prompts)
    block_k, block_d = block_sizes(book, settings.interpret)
    n_dblocks = triton.cdiv(dim, block_d)
    flags = dict(HAS_WEIGHTS=weights is not None, PER_TOKEN=gamma.dim() == 3, HAS_OFFSETS=offsets is not None,
                 BLOCK_K=block_k, BLOCK_D=block_d)
    placeholder = prompts  # never read: the constexpr flags switch the unused pointers off
    offsets_arg = offsets if offsets is not None else placeholder
    weights_arg = weights if weights is not None else placeholder
    grad_prompts = torch.empty_like(prompts) if need_prompts else None
    grad_gamma = torch.empty_like(gamma) if need_gamma else None
    grad_beta = torch.empty_like(gamma) if need_beta else None
    dw_part = torch.empty((batch, n_dblocks, book), dtype=torch.float32, device=prompts.device) \
        if need_weights else None
    if need_gamma or need_beta or need_weights:
        affine_prompt_grad_rows_kernel[(batch, n_dblocks)](
            grad, prompts, gamma, weights_arg, offsets_arg,
            grad_gamma if need_gamma else placeholder, grad_beta if need_beta else placeholder,
            dw_part if need_weights else placeholder, book, length, dim, rows, n_dblocks,
            NEED_GAMMA=need_gamma, NEED_BETA=need_beta, NEED_W=need_weights, **flags)
    if need_prompts:
        affine_prompt_grad_prompts_kernel[(length, n_dblocks)](
            grad, gamma, weights_arg, offsets_arg, grad_prompts, batch, book, length, dim, rows, **flags)
    # Block partials summed in a fixed order (torch's reduction over a fixed shape is deterministic).
    grad_weights = dw_part.sum(1).to(weights.dtype) if need_weights else None
    return grad_prompts, grad_gamma, grad_beta, grad_weights


def aot_specs():
    """The variants CI compiles ahead of time for sm_80 and sm_90 (no tl.dot, so no tensor cores)."""
    from mrgfast.ops.backends.triton.aot import AotSpec

    specs = []
    for dtype in ("bf16", "fp32"):
        ptr = f"*{dtype}"
        for book, per_token in ((False, False), (True, True)):
            common = dict(HAS_WEIGHTS=book, PER_TOKEN=per_token, HAS_OFFSETS=True, BLOCK_K=8 if book else 1,
                          BLOCK_D=256)
            variant = f"{dtype} book={int(book)} per_token={int(per_token)}"
            specs.append(AotSpec(variant, affine_prompt_forward_kernel,
                                 {"P": ptr, "GAMMA": ptr, "BETA": ptr, "W": ptr, "OUT": ptr, "OFFSETS": "*i64"},
                                 common, tensor_cores=()))
            specs.append(AotSpec(variant, affine_prompt_grad_rows_kernel,
                                 {"G": ptr, "P": ptr, "GAMMA": ptr, "W": ptr, "OFFSETS": "*i64", "DGAMMA": ptr,
                                  "DBETA": ptr, "DW_PART": "*fp32"},
                                 dict(common, NEED_GAMMA=True, NEED_BETA=True, NEED_W=book), tensor_cores=()))
            specs.append(AotSpec(variant, affine_prompt_grad_prompts_kernel,
                                 {"G": ptr, "GAMMA": ptr, "W": ptr, "OFFSETS": "*i64", "DP": ptr},
                                 common, tensor_cores=()))
    return specs
