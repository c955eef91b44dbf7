"""Fused Triton LoRA linear (the split design's ablation): fused forward, fused dX, a transposed GEMM for dW, dA, dB."""

import functools

import torch
import triton
import triton.language as tl

from mrgfast.ops.backends.triton.common import (
    grouped_program_ids, keep_mask, launch_settings, padded_rank, split_for_parallelism,
)
from mrgfast.ops.backends.triton.tuning import Tuned, token_bucket

MAX_RANK = 256


@triton.jit
def lora_forward_kernel(
    X, W, BIAS, A, B, Y, XA,
    M, N, K, RANK,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_ym, stride_yn,
    scaling, dropout_p, seed,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Y = X W^T + b + scaling * (drop(X) A^T) B^T; X is read once per tile, X A^T stays on chip."""
    pid_m, pid_n = grouped_program_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    mask_m, mask_n, mask_r = offs_m < M, offs_n < N, offs_r < RANK

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(W + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a = tl.load(A + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DOT_FP32:  # the interpreter multiplies raw bf16 bit patterns in tl.dot
            x, w, a = x.to(tl.float32), w.to(tl.float32), a.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(seed, dropout_p, offs_m, offs_k, K), x, tl.zeros_like(x))
        xa = tl.dot(x, a, xa, input_precision=PRECISION)
    if HAS_DROPOUT:
        xa = xa * (1.0 / (1.0 - dropout_p))
    if pid_n == 0:  # one tile column saves drop(X) A^T for the dB of backward
        tl.store(XA + offs_m[:, None] * RANK + offs_r[None, :], xa, mask=mask_m[:, None] & mask_r[None, :])

    b = tl.load(B + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    xa = xa * scaling
    if DOT_FP32:
        b = b.to(tl.float32)
    else:
        xa = xa.to(b.dtype)
    acc = tl.dot(xa, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def lora_grad_input_kernel(
    DY, W, A, B, DX, DYB,
    M, N, K, RANK,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_dxm, stride_dxk,
    scaling, dropout_p, seed,
    COMPUTE_DX: tl.constexpr, HAS_DROPOUT: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """DX = DY W + scaling * mask/(1-p) * (DY B) A in one pass over DY; also saves scaling * DY B for dA."""
    if COMPUTE_DX:
        pid_m, pid_k = grouped_program_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    else:  # only DY B is wanted (x needs no gradient): one program per row block
        pid_m, pid_k = tl.program_id(0), 0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R)
    mask_m, mask_k, mask_r = offs_m < M, offs_k < K, offs_r < RANK

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    dyb = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(B + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if DOT_FP32:
            dy, b = dy.to(tl.float32), b.to(tl.float32)
        if COMPUTE_DX:
            w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if DOT_FP32:
                w = w.to(tl.float32)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
        dyb = tl.dot(dy, b, dyb, input_precision=PRECISION)
    dyb = dyb * scaling
    if pid_k == 0:
        tl.store(DYB + offs_m[:, None] * RANK + offs_r[None, :], dyb, mask=mask_m[:, None] & mask_r[None, :])

    if COMPUTE_DX:
        a = tl.load(A + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
        else:
            dyb = dyb.to(a.dtype)
        lora = tl.dot(dyb, a, input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = keep_mask(seed, dropout_p, offs_m, offs_k, K)
            lora = tl.where(keep, lora * (1.0 / (1.0 - dropout_p)), tl.zeros_like(lora))
        acc += lora
        tl.store(DX + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, acc.to(DX.dtype.element_ty),
                 mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def matmul_tn_kernel(
    L, RIGHT, C,
    M, P, Q,
    stride_lm, stride_lp, stride_rm, stride_rq, stride_cp, stride_cq,
    alpha, dropout_p, seed,
    RIGHT_DROPOUT: tl.constexpr, SPLIT_M: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """C (+)= alpha * L^T drop(RIGHT) with L [M, P], RIGHT [M, Q]; SPLIT_M > 1 adds partial sums atomically."""
    pid_p, pid_q, pid_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p, mask_q = offs_p < P, offs_q < Q
    # The op's dtype: the operand that is not an fp32 side buffer (x A^T and dY B are saved in fp32).
    compute_dtype = RIGHT.dtype.element_ty if L.dtype.element_ty == tl.float32 else L.dtype.element_ty
    if DOT_FP32:
        compute_dtype = tl.float32

    rows_per_split = tl.cdiv(tl.cdiv(M, SPLIT_M), BLOCK_M) * BLOCK_M
    m_start = pid_split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        left_t = tl.load(L + offs_p[:, None] * stride_lp + offs_m[None, :] * stride_lm,
                         mask=mask_p[:, None] & mask_m[None, :], other=0.0)
        right = tl.load(RIGHT + offs_m[:, None] * stride_rm + offs_q[None, :] * stride_rq,
                        mask=mask_m[:, None] & mask_q[None, :], other=0.0)
        if RIGHT_DROPOUT:  # RIGHT is x [M, K]: the same (row, col) offsets as the forward's mask
            right = tl.where(keep_mask(seed, dropout_p, offs_m, offs_q, Q), right, tl.zeros_like(right))
        acc = tl.dot(left_t.to(compute_dtype), right.to(compute_dtype), acc, input_precision=PRECISION)
    acc = acc * alpha
    c_ptrs = C + offs_p[:, None] * stride_cp + offs_q[None, :] * stride_cq
    c_mask = mask_p[:, None] & mask_q[None, :]
    if SPLIT_M == 1:
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_mask)


# (rows, output columns, reduction, warps, stages): candidates for the two fused GEMM kernels.
_GEMM_SHAPES = [(64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 64, 64, 4, 3), (64, 64, 32, 4, 3)]
_GEMM_SHAPES_NARROW_RANK = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 256, 64, 8, 3)]


def _gemm_configs(out_block: str, reduction_block: str, large_rank: bool):
    """Autotune candidates; a wide rank keeps a wide on-chip accumulator, so it gets the smaller tiles."""
    shapes = _GEMM_SHAPES + ([] if large_rank else _GEMM_SHAPES_NARROW_RANK)
    return [triton.Config({"BLOCK_M": m, out_block: n, reduction_block: k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


# The token count M is tuned by its power-of-two bucket: packed batches change length every step.
@functools.cache
def _tuned_forward(large_rank: bool) -> Tuned:
    """lora_forward_kernel under the tuner (built lazily: the interpreter has no benchmarker)."""
    return Tuned(lora_forward_kernel, _gemm_configs("BLOCK_N", "BLOCK_K", large_rank), key=["M", "N", "K", "R"],
                 buckets=["M"])


@functools.cache
def _tuned_grad_input(large_rank: bool) -> Tuned:
    """lora_grad_input_kernel under the tuner: DX's columns are tiled by BLOCK_K, N is reduced."""
    return Tuned(lora_grad_input_kernel, _gemm_configs("BLOCK_K", "BLOCK_N", large_rank), key=["M", "N", "K", "R"],
                 buckets=["M"])


@functools.cache
def _tuned_matmul_tn() -> Tuned:
    """matmul_tn_kernel under the tuner; split-M partial sums and accumulation add into C, restored after tuning."""
    configs = [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)
               for m, w, s in [(32, 4, 4), (64, 4, 4), (64, 8, 3), (128, 8, 3)]]
    return Tuned(matmul_tn_kernel, configs, key=["M", "P", "Q"], buckets=["M"], restore=["C"])


def _check_rank(rank: int) -> int:
    """The padded on-chip rank tile, or a clear error beyond what fits on chip."""
    if rank > MAX_RANK:
        raise ValueError(f"lora_linear (triton): r={rank} exceeds the on-chip limit r <= {MAX_RANK}")
    return padded_rank(rank)


def lora_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    """Return (y, (xa,)): y [M, N] in x's dtype and xa = drop(x) A^T [M, r] in fp32 for backward."""
    (M, K), N, rank = x.shape, weight.shape[0], lora_a.shape[0]
    R = _check_rank(rank)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    xa = torch.empty((M, rank), dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return y, (xa,)
    settings = launch_settings(x)
    args = (x, weight, bias if bias is not None else x, lora_a, lora_b, y, xa, M, N, K, rank,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
            lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
            float(scaling), float(dropout_p), int(seed or 0))
    flags = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, R=R, GROUP_M=8, **settings.flags)
    if settings.interpret:
        blocks = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)
        grid = (triton.cdiv(M, 16) * triton.cdiv(N, 32),)
        lora_forward_kernel[grid](*args, **flags, **blocks)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _tuned_forward(R > 64)(grid, *args, **flags)
    return y, (xa,)


def _grad_input(grad_y, weight, lora_a, lora_b, scaling, dropout_p, seed, compute_dx):
    """Return (dx or None, scaling * dY B [M, r] in fp32)."""
    (M, N), K, rank = grad_y.shape, weight.shape[1], lora_a.shape[0]
    R = _check_rank(rank)
    dyb = torch.empty((M, rank), dtype=torch.float32, device=grad_y.device)
    dx = torch.empty((M, K), dtype=grad_y.dtype, device=grad_y.device) if compute_dx else None
    if M == 0:
        return dx, dyb
    out = dx if compute_dx else dyb  # a placeholder pointer when DX is not written
    settings = launch_settings(grad_y)
    args = (grad_y, weight, lora_a, lora_b, out, dyb, M, N, K, rank,
            grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
            lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
            out.stride(0), out.stride(1), float(scaling), float(dropout_p), int(seed or 0))
    flags = dict(COMPUTE_DX=compute_dx, HAS_DROPOUT=dropout_p > 0.0, R=R, GROUP_M=8, **settings.flags)

    def grid(meta):
        rows = triton.cdiv(M, meta["BLOCK_M"])
        return (rows * triton.cdiv(K, meta["BLOCK_K"]),) if compute_dx else (rows,)

    if settings.interpret:
        blocks = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)
        lora_grad_input_kernel[grid(blocks)](*args, **flags, **blocks)
    else:
        _tuned_grad_input(R > 64)(grid, *args, **flags)
    return dx, dyb


def matmul_tn(left, right, alpha=1.0, out_dtype=None, dropout_p=0.0, seed=None, out=None):
    """alpha * left^T @ drop(right) for left [M, P], right [M, Q]; added into fp32 `out` when given.

    Dropout regenerates the forward's mask of x (right is x then).
    """
    (M, P), Q = left.shape, right.shape[1]
    if out is not None and (out.dtype != torch.float32 or tuple(out.shape) != (P, Q) or not out.is_contiguous()):
        raise ValueError(f"matmul_tn: out must be a contiguous fp32 [{P}, {Q}] tensor, got "
                         f"{out.dtype} {tuple(out.shape)}")
    out_dtype = out_dtype or right.dtype
    settings = launch_settings(right)
    block_p, block_q = (min(128, padded_rank(P)), min(128, padded_rank(Q)))
    tiles = triton.cdiv(P, block_p) * triton.cdiv(Q, block_q)
    # Split by M's bucket, not M: SPLIT_M is a constexpr in the tuning key, so it must not change with every length.
    split = 1 if settings.interpret else split_for_parallelism(token_bucket(M), tiles, right.device)
    if P == 0 or Q == 0:
        return out if out is not None else torch.zeros((P, Q), dtype=out_dtype, device=right.device)
    if out is not None:
        c = out
    elif split > 1:  # split reductions add fp32 partial sums atomically, then cast once
        c = torch.zeros((P, Q), dtype=torch.float32, device=right.device)
    else:
        c = torch.empty((P, Q), dtype=out_dtype, device=right.device)
    args = (left, right, c, M, P, Q, left.stride(0), left.stride(1), right.stride(0), right.stride(1),
            c.stride(0), c.stride(1), float(alpha), float(dropout_p), int(seed or 0))
    flags = dict(RIGHT_DROPOUT=dropout_p > 0.0, SPLIT_M=split, ACCUMULATE=out is not None,
                 BLOCK_P=block_p, BLOCK_Q=block_q, **settings.flags)
    if settings.interpret:  # with M == 0 the kernel still writes C: zeros, or out unchanged
        matmul_tn_kernel[(triton.cdiv(P, block_p), triton.cdiv(Q, block_q), 1)](*args, **flags, BLOCK_M=16)
    else:
        grid = (triton.cdiv(P, block_p), triton.cdiv(Q, block_q), split)
        _tuned_matmul_tn()(grid, *args, **flags)
    return out if out is not None else c.to(out_dtype)


def lora_backward(grad_y, x, weight, lora_a, lora_b, saved, scaling, dropout_p, seed, *,
                  need_x, need_weight, need_bias, need_a, need_b):
    """Gradients (x, weight, bias, lora_a, lora_b); None where not needed. The mask is redrawn from seed."""
    (xa,) = saved
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need_x or need_a:
        grad_x, dyb = _grad_input(grad_y, weight, lora_a, lora_b, scaling, dropout_p, seed, compute_dx=need_x)
        if need_a:
            keep_scale = 1.0 / (1.0 - dropout_p)
            grad_a = matmul_tn(dyb, x, alpha=keep_scale, out_dtype=lora_a.dtype, dropout_p=dropout_p, seed=seed)
    if need_b:
        grad_b = matmul_tn(grad_y, xa, alpha=scaling, out_dtype=lora_b.dtype)
    if need_weight:
        grad_w = matmul_tn(grad_y, x, out_dtype=weight.dtype)
    if need_bias:
        grad_bias = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype)
    return grad_x, grad_w, grad_bias, grad_a, grad_b


def aot_specs():
    """The variants CI compiles ahead of time for sm_80 and sm_90 (see mrgfast.ops.backends.triton.aot)."""
    from mrgfast.ops.backends.triton.aot import AotSpec

    floats = ("scaling", "dropout_p", "alpha")
    # (dtype, dot precision, ranks, dropout settings, (BLOCK_M, output block, warps)): bf16 is the training
    # dtype and gets every variant; fp32 tiles are smaller because 4-byte tiles fill shared memory.
    plans = [("bf16", "ieee", (16, 128), (False, True), (128, 128, 8)),
             ("fp16", "ieee", (16,), (True,), (128, 128, 8)),
             ("fp32", "tf32", (16,), (True,), (64, 64, 4)),
             ("fp32", "ieee", (16,), (True,), (64, 64, 4))]
    specs = []
    for dtype, precision, ranks, dropouts, (block_m, block_out, warps) in plans:
        ptr = f"*{dtype}"
        # fp32 at IEEE precision runs on CUDA cores by design; every other variant must use tensor cores.
        cores = () if (dtype, precision) == ("fp32", "ieee") else (80, 90)
        narrow_cores = tuple(arch for arch in cores if arch != 90)  # 16-row tiles are below wgmma's 64
        for rank in ranks:
            for dropout in dropouts:
                name = f"{dtype}-{precision} r{rank} drop={int(dropout)}"
                bm = block_m if rank <= 64 else 64
                common = dict(HAS_DROPOUT=dropout, R=rank, GROUP_M=8, DOT_FP32=False, PRECISION=precision)
                specs.append(AotSpec(name, lora_forward_kernel,
                                     {"X": ptr, "W": ptr, "BIAS": ptr, "A": ptr, "B": ptr, "Y": ptr, "XA": "*fp32"},
                                     dict(common, HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=block_out, BLOCK_K=32),
                                     floats, num_warps=warps, tensor_cores=cores))
                specs.append(AotSpec(name, lora_grad_input_kernel,
                                     {"DY": ptr, "W": ptr, "A": ptr, "B": ptr, "DX": ptr, "DYB": "*fp32"},
                                     dict(common, COMPUTE_DX=True, BLOCK_M=bm, BLOCK_N=32, BLOCK_K=block_out),
                                     floats, num_warps=warps, tensor_cores=cores))
        tn = dict(DOT_FP32=False, PRECISION=precision, BLOCK_M=32)
        specs += [
            AotSpec(f"{dtype}-{precision} dW", matmul_tn_kernel, {"L": ptr, "RIGHT": ptr, "C": ptr},
                    dict(tn, RIGHT_DROPOUT=False, SPLIT_M=1, ACCUMULATE=True, BLOCK_P=block_m, BLOCK_Q=block_out), floats,
                    num_warps=warps, tensor_cores=cores),
            AotSpec(f"{dtype}-{precision} dA drop=1", matmul_tn_kernel, {"L": "*fp32", "RIGHT": ptr, "C": ptr},
                    dict(tn, RIGHT_DROPOUT=True, SPLIT_M=1, ACCUMULATE=False, BLOCK_P=16, BLOCK_Q=128), floats,
                    tensor_cores=narrow_cores),
            AotSpec(f"{dtype}-{precision} dB split", matmul_tn_kernel, {"L": ptr, "RIGHT": "*fp32", "C": "*fp32"},
                    dict(tn, RIGHT_DROPOUT=False, SPLIT_M=4, ACCUMULATE=False, BLOCK_P=128, BLOCK_Q=16), floats,
                    tensor_cores=narrow_cores),
        ]
    specs.append(AotSpec("bf16 dY B only", lora_grad_input_kernel,
                         {"DY": "*bf16", "W": "*bf16", "A": "*bf16", "B": "*bf16", "DX": "*fp32", "DYB": "*fp32"},
                         dict(COMPUTE_DX=False, HAS_DROPOUT=False, R=16, GROUP_M=8, DOT_FP32=False,
                              PRECISION="ieee", BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), floats))
    return specs
