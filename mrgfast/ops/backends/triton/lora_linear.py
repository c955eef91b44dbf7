"""Split LoRA linear on CUDA: cuBLAS runs the big GEMMs, two small Triton kernels do dropout's r-wide work.

The fused kernels (lora_fused.py, the ablation) recompute drop(x) A^T in every output-column tile and the dropout
hash with it; here every big operand is read once:

- forward: u = drop(x) A^T / (1-p) [tokens, r] (lora_down_kernel: one pass over x, the keep mask redrawn from the
  seed, never stored; cuBLAS x A^T without dropout), then y = (s u) B^T + b and y += x W^T inside cuBLAS (beta=1).
- backward: g = s dY B / (1-p) [tokens, r], dB = s dY^T u and dx = dY W by cuBLAS; with dropout one kernel
  (lora_dropout_backward_kernel) reads x once, adds keep * (g A) into dx in place and reduces dA = g^T (keep * x)
  over token ranges into fp32 partial sums (summed after: deterministic); without dropout dx += g A, dA = g^T x.

dA and dB accumulate in fp32 and come back in fp32 (the op casts them to the adapters' dtype).
MRGFAST_LORA_ORDER=base_first makes the base GEMM write y (and dx) first and the r-wide term accumulate onto it;
the default lora_first writes the r-wide term and lets the big GEMM accumulate onto it.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from mrgfast.ops.backends.triton.common import keep_mask, launch_settings, padded_rank
from mrgfast.ops.backends.triton.tuning import Tuned

MAX_RANK = 256
ORDER_ENV = "MRGFAST_LORA_ORDER"
ORDERS = ("lora_first", "base_first")
ROWS_PER_SPLIT_MULTIPLE = 128  # token ranges of the dA reduction start on a multiple of every tuned BLOCK_M


@triton.jit
def lora_down_kernel(
    X, A, U,
    M, K, RANK,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_um,
    dropout_p, seed,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """U = drop(X) A^T / (1-p) [M, r]: one token block per program, looping over K; the mask is redrawn here."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    mask_m, mask_r = offs_m < M, offs_r < RANK
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(A + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        x = tl.where(keep_mask(seed, dropout_p, offs_m, offs_k, K), x, tl.zeros_like(x))
        if DOT_FP32:  # the interpreter multiplies raw bf16 bit patterns in tl.dot
            x, a = x.to(tl.float32), a.to(tl.float32)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    acc = acc * (1.0 / (1.0 - dropout_p))
    tl.store(U + offs_m[:, None] * stride_um + offs_r[None, :], acc.to(U.dtype.element_ty),
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def lora_dropout_backward_kernel(
    X, G, A, DX, DA_PARTIAL,
    M, K, RANK, rows_per_split,
    stride_xm, stride_xk, stride_gm, stride_ar, stride_ak, stride_dxm, stride_dxk,
    dropout_p, seed,
    COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """DX += keep * (G A) in place and DA_PARTIAL[split] = G^T (keep * X) over one token range; G carries 1/(1-p).

    Program (k block, split) walks the split's tokens: X and DX are each read once over the whole grid.
    """
    pid_k, pid_split = tl.program_id(0), tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R)
    mask_k, mask_r = offs_k < K, offs_r < RANK
    a = tl.load(A + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0)
    if DOT_FP32:
        a = a.to(tl.float32)
    m_start = pid_split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    # dA^T [BLOCK_K, r], not dA [r, BLOCK_K]: a dot whose rows are BLOCK_K (>= 64) reaches sm_90's wgmma; r rows
    # (16) would not.
    da_t = tl.zeros((BLOCK_K, R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        tile_mask = mask_m[:, None] & mask_k[None, :]
        g = tl.load(G + offs_m[:, None] * stride_gm + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                    other=0.0)
        if DOT_FP32:
            g = g.to(tl.float32)
        keep = keep_mask(seed, dropout_p, offs_m, offs_k, K)
        if COMPUTE_DX:
            lora = tl.dot(g, a, input_precision=PRECISION)
            dx_ptrs = DX + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
            dx = tl.load(dx_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
            dx += tl.where(keep, lora, tl.zeros_like(lora))
            tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=tile_mask)
        if COMPUTE_DA:
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=tile_mask, other=0.0)
            x = tl.where(keep, x, tl.zeros_like(x))
            if DOT_FP32:
                x = x.to(tl.float32)
            da_t = tl.dot(tl.trans(x), g, da_t, input_precision=PRECISION)
    if COMPUTE_DA:
        tl.store(DA_PARTIAL + pid_split * RANK * K + offs_r[None, :] * K + offs_k[:, None], da_t,
                 mask=mask_r[None, :] & mask_k[:, None])


# (BLOCK_M, BLOCK_K, warps, stages). The down kernel keeps a [BLOCK_M, r] accumulator; the backward one a
# [BLOCK_K, r] accumulator plus a [BLOCK_M, BLOCK_K] tile of dx and of x: a wide rank gets the smaller tiles first.
_DOWN_SHAPES = [(64, 128, 4, 3), (32, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4), (128, 128, 8, 3)]
_BACKWARD_SHAPES = [(64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (32, 128, 4, 4), (128, 128, 8, 3)]


def _configs(shapes, large_rank: bool):
    """Autotune candidates; a rank above 64 drops the 128 x 128 tiles (registers and shared memory)."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, k, w, s in shapes if not (large_rank and m * k >= 128 * 128)]


# Keys: (token bucket, K, padded rank) + the tensors' dtypes + the flags (Tuned adds those); packed batches change
# their token count every step, so M is tuned by its power-of-two bucket.
@functools.cache
def _tuned_down(large_rank: bool) -> Tuned:
    """lora_down_kernel under the tuner (built lazily: the interpreter has no benchmarker)."""
    return Tuned(lora_down_kernel, _configs(_DOWN_SHAPES, large_rank), key=["M", "K", "R"], buckets=["M"])


@functools.cache
def _tuned_backward(large_rank: bool) -> Tuned:
    """lora_dropout_backward_kernel under the tuner; dx is added into in place, so it is restored after tuning."""
    return Tuned(lora_dropout_backward_kernel, _configs(_BACKWARD_SHAPES, large_rank), key=["M", "K", "R"],
                 buckets=["M"], restore=["DX"])


def update_order() -> str:
    """MRGFAST_LORA_ORDER: lora_first (default: the big GEMM accumulates onto the r-wide term) or base_first."""
    value = os.environ.get(ORDER_ENV, "").strip().lower() or ORDERS[0]
    if value not in ORDERS:
        raise ValueError(f"{ORDER_ENV}={value!r}: expected one of {', '.join(ORDERS)}")
    return value


def _check_rank(rank: int) -> int:
    """The padded on-chip rank tile, or a clear error beyond what fits on chip."""
    if rank > MAX_RANK:
        raise ValueError(f"lora_linear (triton split): r={rank} exceeds the on-chip limit r <= {MAX_RANK}")
    return padded_rank(rank)


def multiprocessors(device: torch.device) -> int:
    """The GPU's SM count (the split of the dA reduction fills twice that many programs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def da_splits(rows: int, cols: int, device: torch.device, interpret: bool) -> int:
    """How many token ranges the dA reduction is cut into: enough programs for the GPU, ranges of >= 256 tokens.

    The interpreter cuts into ranges of 16 tokens (at most 4) so that tests exercise the partial sums.
    """
    if interpret:
        return max(1, min(4, triton.cdiv(rows, 16)))
    column_blocks = triton.cdiv(cols, 128)
    return max(1, min(triton.cdiv(2 * multiprocessors(device), column_blocks), triton.cdiv(rows, 256)))


def dropped_down(x, lora_a, dropout_p: float, seed: int):
    """drop(x) A^T / (1-p) [tokens, r] in x's dtype, the mask redrawn from seed (never stored)."""
    (M, K), rank = x.shape, lora_a.shape[0]
    R = _check_rank(rank)
    u = torch.empty((M, rank), dtype=x.dtype, device=x.device)
    if M == 0:
        return u
    settings = launch_settings(x)
    args = (x, lora_a, u, M, K, rank, x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), u.stride(0),
            float(dropout_p), int(seed))
    flags = dict(R=R, **settings.flags)
    if settings.interpret:
        lora_down_kernel[(triton.cdiv(M, 16),)](*args, **flags, BLOCK_M=16, BLOCK_K=16)
    else:
        _tuned_down(R > 64)(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),), *args, **flags)
    return u


def dropout_backward(x, g, lora_a, grad_x, dropout_p: float, seed: int, need_a: bool):
    """Add keep * (g A) into grad_x (when given) and return g^T (keep * x) in fp32 (when need_a); one pass over x."""
    (M, K), rank = x.shape, lora_a.shape[0]
    R = _check_rank(rank)
    if M == 0 or (grad_x is None and not need_a):
        return torch.zeros((rank, K), dtype=torch.float32, device=x.device) if need_a else None
    settings = launch_settings(x)
    splits = da_splits(M, K, x.device, settings.interpret)
    multiple = 16 if settings.interpret else ROWS_PER_SPLIT_MULTIPLE
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), multiple) * multiple
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty((splits if need_a else 1, rank, K), dtype=torch.float32, device=x.device)
    dx = grad_x if grad_x is not None else partial  # a placeholder pointer when dx is not written
    args = (x, g, lora_a, dx, partial, M, K, rank, rows_per_split, x.stride(0), x.stride(1), g.stride(0),
            lora_a.stride(0), lora_a.stride(1), dx.stride(0) if grad_x is not None else 0,
            dx.stride(1) if grad_x is not None else 0, float(dropout_p), int(seed))
    flags = dict(COMPUTE_DX=grad_x is not None, COMPUTE_DA=need_a, R=R, **settings.flags)
    if settings.interpret:
        lora_dropout_backward_kernel[(triton.cdiv(K, 16), splits)](*args, **flags, BLOCK_M=16, BLOCK_K=16)
    else:
        _tuned_backward(R > 64)(lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), splits), *args, **flags)
    if not need_a:
        return None
    return partial[0] if splits == 1 else partial.sum(0)  # a fixed-order sum: deterministic


def mm_fp32(left, right):
    """left @ right accumulated and returned in fp32 (dA, dB sum over every token).

    cuBLAS multiplies bf16/fp16 operands into an fp32 output directly; CPU tensors (the interpreter's tests) have
    no mixed-dtype mm and multiply the operands upcast, which is the same arithmetic.
    """
    if left.dtype == torch.float32:
        return torch.mm(left, right)
    if left.is_cuda:
        return torch.mm(left, right, out_dtype=torch.float32)
    return torch.mm(left.float(), right.float())


def lora_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    """Return (y, (u,)): y [M, N] in x's dtype and u = drop(x) A^T / (1-p) [M, r] in x's dtype for backward."""
    _check_rank(lora_a.shape[0])
    u = torch.mm(x, lora_a.t()) if dropout_p == 0.0 else dropped_down(x, lora_a, dropout_p, seed)
    scaled_u = u * scaling  # [M, r]: scaling rides on the r-wide factor, never on a [M, N] tensor
    if update_order() == "lora_first":
        # The r-wide product writes y, then cuBLAS accumulates the base GEMM onto it (beta=1 is free in the GEMM).
        y = torch.mm(scaled_u, lora_b.t()) if bias is None else torch.addmm(bias, scaled_u, lora_b.t())
        y.addmm_(x, weight.t())
    else:
        y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        y.addmm_(scaled_u, lora_b.t())
    return y, (u,)


def lora_backward(grad_y, x, weight, lora_a, lora_b, saved, scaling, dropout_p, seed, *,
                  need_x, need_weight, need_bias, need_a, need_b):
    """Gradients (x, weight, bias, lora_a, lora_b); None where not needed; dA and dB in fp32. Mask redrawn."""
    (u,) = saved
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need_x or need_a:
        # scaling and 1/(1-p) go into the r-wide g, never into a [tokens, in] tensor.
        g = torch.mm(grad_y, lora_b).mul_(scaling / (1.0 - dropout_p))
    if dropout_p == 0.0:
        if need_x:
            if update_order() == "lora_first":
                grad_x = torch.mm(g, lora_a)
                grad_x.addmm_(grad_y, weight)
            else:
                grad_x = torch.mm(grad_y, weight)
                grad_x.addmm_(g, lora_a)
        if need_a:
            grad_a = mm_fp32(g.t(), x)
    elif need_x or need_a:
        grad_x = torch.mm(grad_y, weight) if need_x else None
        grad_a = dropout_backward(x, g, lora_a, grad_x, dropout_p, seed, need_a)
    if need_b:
        grad_b = mm_fp32(grad_y.t(), u).mul_(scaling)
    if need_weight:
        grad_w = torch.mm(grad_y.t(), x)
    if need_bias:
        grad_bias = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype)
    return grad_x, grad_w, grad_bias, grad_a, grad_b


def aot_specs():
    """The variants CI compiles ahead of time for sm_80 and sm_90 (see mrgfast.ops.backends.triton.aot)."""
    from mrgfast.ops.backends.triton.aot import AotSpec

    floats = ("dropout_p",)
    # (dtype, dot precision, ranks, (BLOCK_M, BLOCK_K, warps)): bf16 is the training dtype and gets both ranks.
    plans = [("bf16", "ieee", (16, 64, 128), (64, 128, 4)), ("fp16", "ieee", (16,), (64, 128, 4)),
             ("fp32", "tf32", (16,), (64, 64, 4)), ("fp32", "ieee", (16,), (64, 64, 4))]
    specs = []
    for dtype, precision, ranks, (block_m, block_k, warps) in plans:
        ptr = f"*{dtype}"
        # fp32 at IEEE precision runs on CUDA cores by design; every other variant must use tensor cores.
        cores = () if (dtype, precision) == ("fp32", "ieee") else (80, 90)
        for rank in ranks:
            name = f"{dtype}-{precision} r{rank}"
            common = dict(R=rank, DOT_FP32=False, PRECISION=precision, BLOCK_M=block_m,
                          BLOCK_K=block_k if rank <= 64 else 64)
            specs.append(AotSpec(name, lora_down_kernel, {"X": ptr, "A": ptr, "U": ptr}, common, floats,
                                 num_warps=warps, tensor_cores=cores))
            for dx, da in ((True, True), (True, False), (False, True)):
                specs.append(AotSpec(f"{name} dx={int(dx)} dA={int(da)}", lora_dropout_backward_kernel,
                                     {"X": ptr, "G": ptr, "A": ptr, "DX": ptr, "DA_PARTIAL": "*fp32"},
                                     dict(common, COMPUTE_DX=dx, COMPUTE_DA=da), floats, num_warps=warps,
                                     tensor_cores=cores))
    return specs
