"""Triton grouped projection: LayerNorm -> token grouping -> Linear without materialising the grouped matrix.

Column k of the virtual grouped matrix Z is feature k % D of neighbour k // D. The GEMM kernels walk k as
(neighbour, feature tile) pairs, so each tile is a gather of BLOCK_M token rows, normalised in the tile load
with per-token mean/rstd from a small pre-pass (token_stats_kernel: two passes over x, fp32, 8 bytes per token,
reused by every output tile instead of being recomputed per tile). Backward recomputes Z tiles the same way for
dW, and only when x (or the norm weights) need a gradient computes dZ = dY W, stored straight into token layout
(the inverse permutation), followed by the LayerNorm backward.
"""

import functools

import torch
import triton
import triton.language as tl

from mrgfast.ops.backends.triton.common import grouped_program_ids, launch_settings
from mrgfast.ops.backends.triton.group_tokens import layout_args, slot_source
from mrgfast.ops.backends.triton.tuning import Tuned

MAX_DIM = 16384  # the LayerNorm backward keeps a whole token row on chip


@triton.jit
def token_stats_kernel(X, MEAN, RSTD, N_TOKENS, D, eps, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-token LayerNorm mean and 1/sqrt(var + eps) in fp32: two passes over each row (no cancellation)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = tokens < N_TOKENS
    rows = X + tokens.to(tl.int64)[:, None] * D
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(rows + offs_d[None, :], mask=mask_t[:, None] & (offs_d < D)[None, :], other=0.0)
        total += tl.sum(x.to(tl.float32), axis=1)
    mean = total / D
    squares = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_t[:, None] & (offs_d < D)[None, :]
        x = tl.load(rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, x - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, axis=1)
    tl.store(MEAN + tokens, mean, mask=mask_t)
    tl.store(RSTD + tokens, 1.0 / tl.sqrt(squares / D + eps), mask=mask_t)


@triton.jit
def normalized_tile(X, MEAN, RSTD, GAMMA, BETA, token, real, offs_d, mask_d,
                    D, NORMALIZE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """The [rows, features] tile of Z for source tokens `token` (fp32): LayerNorm applied, padding slots zero."""
    mask = real[:, None] & mask_d[None, :]
    z = tl.load(X + token[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        mean = tl.load(MEAN + token, mask=real, other=0.0)
        rstd = tl.load(RSTD + token, mask=real, other=0.0)
        z = (z - mean[:, None]) * rstd[:, None]
        if HAS_GAMMA:
            z = z * tl.load(GAMMA + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        if HAS_BETA:
            z = z + tl.load(BETA + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        z = tl.where(mask, z, 0.0)  # padding is zero after the norm, as in group_tokens(LayerNorm(x), pad=True)
    return z


@triton.jit
def grouped_linear_forward_kernel(
    X, MEAN, RSTD, GAMMA, BETA, W, BIAS, Y,
    M, N, D, GROUPS, TOKENS, HEIGHT, WIDTH, BLOCKS_W,
    stride_wn, stride_wk,
    GROUP_H: tl.constexpr, GROUP_W: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Y [M, N] = Z W^T + b with Z [M, group*D] gathered and normalised tile by tile, never stored."""
    pid_m, pid_n = grouped_program_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    d_tiles = tl.cdiv(D, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (neighbour, feature tile) pairs, so the compiler pipelines all of K's tiles.
    for step in range(0, GROUP_H * GROUP_W * d_tiles):
        j = step // d_tiles
        offs_d = (step % d_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_d = offs_d < D
        token, real = slot_source(offs_m, j, GROUPS, TOKENS, HEIGHT, WIDTH, BLOCKS_W, GROUP_H, GROUP_W)
        z = normalized_tile(X, MEAN, RSTD, GAMMA, BETA, token, real & mask_m, offs_d, mask_d, D,
                            NORMALIZE, HAS_GAMMA, HAS_BETA)
        w = tl.load(W + offs_n[None, :] * stride_wn + (j * D + offs_d)[:, None] * stride_wk,
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:  # the interpreter multiplies raw bf16 bit patterns in tl.dot
            w = w.to(tl.float32)
        else:  # the eager composition rounds LayerNorm's output to x's dtype before the Linear, as this does
            z = z.to(w.dtype)
        acc = tl.dot(z, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def grouped_linear_grad_weight_kernel(
    X, MEAN, RSTD, GAMMA, BETA, DY, DW,
    M, N, D, GROUPS, TOKENS, HEIGHT, WIDTH, BLOCKS_W,
    GROUP_H: tl.constexpr, GROUP_W: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """DW [N, group*D] = DY^T Z, with Z's tiles recomputed from x exactly as in the forward."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    d_tiles = tl.cdiv(D, BLOCK_K)
    j = pid_k // d_tiles
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = (pid_k % d_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_d = offs_n < N, offs_d < D
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        token, real = slot_source(offs_m, j, GROUPS, TOKENS, HEIGHT, WIDTH, BLOCKS_W, GROUP_H, GROUP_W)
        z = normalized_tile(X, MEAN, RSTD, GAMMA, BETA, token, real & mask_m, offs_d, mask_d, D,
                            NORMALIZE, HAS_GAMMA, HAS_BETA)
        dy_t = tl.load(DY + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None],
                       mask=mask_m[None, :] & mask_n[:, None], other=0.0)
        if DOT_FP32:
            dy_t = dy_t.to(tl.float32)
        else:
            z = z.to(dy_t.dtype)
        acc = tl.dot(dy_t, z, acc, input_precision=PRECISION)
    tl.store(DW + offs_n.to(tl.int64)[:, None] * (GROUP_H * GROUP_W * D) + (j * D + offs_d)[None, :],
             acc.to(DW.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def grouped_linear_grad_input_kernel(
    DY, W, GZ,
    M, N, D, GROUPS, TOKENS, HEIGHT, WIDTH, BLOCKS_W,
    stride_wn, stride_wk,
    GROUP_H: tl.constexpr, GROUP_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dZ = DY W, each [rows, features] tile stored at its source tokens' rows of GZ [B*TOKENS, D]."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    d_tiles = tl.cdiv(D, BLOCK_K)
    j = pid_k // d_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = (pid_k % d_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m, mask_d = offs_m < M, offs_d < D
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(DY + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(W + offs_n[:, None] * stride_wn + (j * D + offs_d)[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if DOT_FP32:
            dy, w = dy.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    token, real = slot_source(offs_m, j, GROUPS, TOKENS, HEIGHT, WIDTH, BLOCKS_W, GROUP_H, GROUP_W)
    # Padding slots have no source token: their gradient belongs to a constant zero and is dropped.
    tl.store(GZ + token[:, None] * D + offs_d[None, :], acc.to(GZ.dtype.element_ty),
             mask=(mask_m & real)[:, None] & mask_d[None, :])


@triton.jit
def layernorm_backward_kernel(
    GZ, X, MEAN, RSTD, GAMMA, DX, DGAMMA_PART, DBETA_PART,
    N_TOKENS, D,
    HAS_GAMMA: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx = rstd * (g*gamma - mean(g*gamma) - xhat*mean(g*gamma*xhat)) per token row; this program's sums of
    g*xhat and g over its tokens go to row pid of the partial buffers (summed afterwards: deterministic)."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    gamma = tl.full((BLOCK_D,), 1.0, dtype=tl.float32)
    if HAS_GAMMA:
        gamma = tl.load(GAMMA + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    sum_gx = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sum_g = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(pid * BLOCK_T, N_TOKENS, tl.num_programs(0) * BLOCK_T):
        tokens = t0 + tl.arange(0, BLOCK_T)
        mask_t = tokens < N_TOKENS
        mask = mask_t[:, None] & mask_d[None, :]
        offsets = tokens.to(tl.int64)[:, None] * D + offs_d[None, :]
        g = tl.load(GZ + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + tokens, mask=mask_t, other=0.0)
        rstd = tl.load(RSTD + tokens, mask=mask_t, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if WRITE_WEIGHTS:
            sum_gx += tl.sum(g * xhat, axis=0)
            sum_g += tl.sum(g, axis=0)
        if WRITE_DX:
            gg = g * gamma[None, :]
            c1 = tl.sum(gg, axis=1) / D
            c2 = tl.sum(gg * xhat, axis=1) / D
            dx = rstd[:, None] * (gg - c1[:, None] - xhat * c2[:, None])
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    if WRITE_WEIGHTS:
        tl.store(DGAMMA_PART + pid * D + offs_d, sum_gx, mask=mask_d)
        tl.store(DBETA_PART + pid * D + offs_d, sum_g, mask=mask_d)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) candidates of the GEMM kernels on a GPU.
_GEMM_SHAPES = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                (64, 64, 64, 4, 3)]


def _configs():
    """Autotune candidates shared by the three GEMM kernels."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in _GEMM_SHAPES]


@functools.cache
def _tuned(kernel_name: str) -> Tuned:
    """One GEMM kernel under the tuner (built lazily: the interpreter has no benchmarker); M, the visual tokens
    of the batch, by its power-of-two bucket."""
    return Tuned(globals()[kernel_name], _configs(), key=["M", "N", "D"], buckets=["M"])


INTERPRET_BLOCKS = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)


def _stats(x, layout, eps):
    """(mean, rstd) [B*N] fp32 per token."""
    n_tokens = layout.batch * layout.tokens
    mean = torch.empty(n_tokens, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if n_tokens:
        block_d = min(256, triton.next_power_of_2(layout.dim))
        token_stats_kernel[(triton.cdiv(n_tokens, 16),)](x, mean, rstd, n_tokens, layout.dim, float(eps),
                                                          BLOCK_T=16, BLOCK_D=block_d)
    return mean, rstd


def _norm_flags(normalize, norm_weight, norm_bias):
    """Constexpr flags for the normalised tile load."""
    return dict(NORMALIZE=bool(normalize), HAS_GAMMA=normalize and norm_weight is not None,
                HAS_BETA=normalize and norm_bias is not None)


def _launch(kernel_name, grid_of, args, flags, settings):
    """Run a GEMM kernel: fixed small blocks in the interpreter, autotuned on a GPU."""
    if settings.interpret:
        globals()[kernel_name][grid_of(INTERPRET_BLOCKS)](*args, **flags, **INTERPRET_BLOCKS)
    else:
        _tuned(kernel_name)(grid_of, *args, **flags)


def forward(x, weight, bias, norm_weight, norm_bias, layout, normalize, eps):
    """(y [B*groups, out], saved tensors for backward: the per-token (mean, rstd) when normalising)."""
    if layout.dim > MAX_DIM:
        raise ValueError(f"grouped_projection (triton): feature dim {layout.dim} exceeds {MAX_DIM}")
    settings = launch_settings(x)
    M, N = layout.batch * layout.groups, weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean, rstd = _stats(x, layout, eps) if normalize else (x, x)  # placeholders the kernel never reads
    if M and N:
        args = (x, mean, rstd, norm_weight if norm_weight is not None else x, norm_bias if norm_bias is not None else x,
                weight, bias if bias is not None else x, y, M, N, layout.dim, *layout_args(layout),
                weight.stride(0), weight.stride(1))
        flags = dict(GROUP_H=layout.block_h, GROUP_W=layout.block_w, HAS_BIAS=bias is not None, GROUP_M=8,
                     **_norm_flags(normalize, norm_weight, norm_bias), **settings.flags)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _launch("grouped_linear_forward_kernel", grid, args, flags, settings)
    return y, ((mean, rstd) if normalize else ())


def _grad_weight(grad_y, x, mean, rstd, norm_weight, norm_bias, weight, layout, normalize, settings):
    """DY^T Z [out, group*D] in the weight's dtype."""
    M, N = grad_y.shape
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=x.device)
    if M == 0:
        return grad_w.zero_()
    args = (x, mean, rstd, norm_weight if norm_weight is not None else x, norm_bias if norm_bias is not None else x,
            grad_y, grad_w, M, N, layout.dim, *layout_args(layout))
    flags = dict(GROUP_H=layout.block_h, GROUP_W=layout.block_w, **_norm_flags(normalize, norm_weight, norm_bias),
                 **settings.flags)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),  # noqa: E731
                         layout.group * triton.cdiv(layout.dim, meta["BLOCK_K"]))
    _launch("grouped_linear_grad_weight_kernel", grid, args, flags, settings)
    return grad_w


def _grad_tokens(grad_y, weight, layout, out_dtype, settings):
    """dZ = DY W in token layout [B*N, D] (the inverse permutation applied in the GEMM's store)."""
    M, N = grad_y.shape
    gz = torch.empty((layout.batch * layout.tokens, layout.dim), dtype=out_dtype, device=grad_y.device)
    if M == 0 or N == 0:
        return gz.zero_()
    args = (grad_y, weight, gz, M, N, layout.dim, *layout_args(layout), weight.stride(0), weight.stride(1))
    flags = dict(GROUP_H=layout.block_h, GROUP_W=layout.block_w, **settings.flags)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),  # noqa: E731
                         layout.group * triton.cdiv(layout.dim, meta["BLOCK_K"]))
    _launch("grouped_linear_grad_input_kernel", grid, args, flags, settings)
    return gz


def _layernorm_backward(gz, x, mean, rstd, norm_weight, layout, need_x, need_weights):
    """(dx [B, N, D] or None, dgamma fp32 or None, dbeta fp32 or None) from dZ in token layout."""
    n_tokens, dim = layout.batch * layout.tokens, layout.dim
    block_d = triton.next_power_of_2(dim)
    block_t = max(1, min(16, 4096 // block_d))
    programs = max(1, min(triton.cdiv(n_tokens, block_t), 1024))
    dx = torch.empty((layout.batch, layout.tokens, dim), dtype=x.dtype, device=x.device) if need_x else None
    parts = [torch.empty((programs, dim), dtype=torch.float32, device=x.device) if need_weights else None
             for _ in range(2)]
    if n_tokens:
        placeholder = gz
        layernorm_backward_kernel[(programs,)](
            gz, x, mean, rstd, norm_weight if norm_weight is not None else placeholder,
            dx if need_x else placeholder, parts[0] if need_weights else placeholder,
            parts[1] if need_weights else placeholder, n_tokens, dim,
            HAS_GAMMA=norm_weight is not None, WRITE_DX=need_x, WRITE_WEIGHTS=need_weights,
            BLOCK_T=block_t, BLOCK_D=block_d)
    if not need_weights:
        return dx, None, None
    if n_tokens == 0:
        return dx, parts[0].new_zeros(dim), parts[0].new_zeros(dim)
    return dx, parts[0].sum(0), parts[1].sum(0)


def backward(grad_y, x, weight, norm_weight, norm_bias, saved, layout, normalize, eps, *,
             need_x, need_weight, need_bias, need_gamma, need_beta):
    """Gradients (x [B, N, D], weight, bias, norm weight fp32, norm bias fp32); None where not needed."""
    settings = launch_settings(grad_y)
    mean, rstd = saved if normalize else (x, x)
    grad_x = grad_w = grad_b = grad_gamma = grad_beta = None
    if need_weight:
        grad_w = _grad_weight(grad_y, x, mean, rstd, norm_weight, norm_bias, weight, layout, normalize, settings)
    if need_bias:
        grad_b = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype)
    need_weights = normalize and (need_gamma or need_beta)
    if need_x or need_weights:
        if not normalize:  # no norm: dZ in token layout is dx itself
            return _grad_tokens(grad_y, weight, layout, x.dtype, settings).view(x.shape), grad_w, grad_b, None, None
        gz = _grad_tokens(grad_y, weight, layout, torch.float32, settings)
        grad_x, grad_gamma, grad_beta = _layernorm_backward(gz, x, mean, rstd, norm_weight, layout, need_x,
                                                            need_weights)
    return grad_x, grad_w, grad_b, grad_gamma if need_gamma else None, grad_beta if need_beta else None


def aot_specs():
    """The variants CI compiles ahead of time for sm_80 and sm_90 (see mrgfast.ops.backends.triton.aot)."""
    from mrgfast.ops.backends.triton.aot import AotSpec

    specs = []
    plans = [("bf16", "ieee", (128, 128, 64, 8), (80, 90)), ("fp32", "tf32", (64, 64, 32, 4), (80, 90)),
             ("fp32", "ieee", (64, 64, 32, 4), ())]
    for dtype, precision, (bm, bn, bk, warps), cores in plans:
        ptr = f"*{dtype}"
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_FP32=False, PRECISION=precision)
        for gh, gw in ((1, 4), (2, 2)):
            name = f"{dtype}-{precision} {gh}x{gw}"
            norm = dict(GROUP_H=gh, GROUP_W=gw, NORMALIZE=True, HAS_GAMMA=True, HAS_BETA=True)
            specs.append(AotSpec(name, grouped_linear_forward_kernel,
                                 {"X": ptr, "MEAN": "*fp32", "RSTD": "*fp32", "GAMMA": ptr, "BETA": ptr, "W": ptr,
                                  "BIAS": ptr, "Y": ptr},
                                 dict(norm, HAS_BIAS=True, GROUP_M=8, **blocks), num_warps=warps, tensor_cores=cores))
            specs.append(AotSpec(name, grouped_linear_grad_weight_kernel,
                                 {"X": ptr, "MEAN": "*fp32", "RSTD": "*fp32", "GAMMA": ptr, "BETA": ptr, "DY": ptr,
                                  "DW": ptr},
                                 dict(norm, **blocks), num_warps=warps, tensor_cores=cores))
            specs.append(AotSpec(name, grouped_linear_grad_input_kernel, {"DY": ptr, "W": ptr, "GZ": "*fp32"},
                                 dict(GROUP_H=gh, GROUP_W=gw, **blocks), num_warps=warps, tensor_cores=cores))
    # No norm (and no bias): dZ is stored straight into dx in x's dtype.
    plain = dict(GROUP_H=2, GROUP_W=2, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, DOT_FP32=False, PRECISION="ieee")
    off = dict(NORMALIZE=False, HAS_GAMMA=False, HAS_BETA=False)
    bf16 = {"X": "*bf16", "MEAN": "*bf16", "RSTD": "*bf16", "GAMMA": "*bf16", "BETA": "*bf16"}
    specs += [
        AotSpec("bf16 no norm", grouped_linear_forward_kernel, {**bf16, "W": "*bf16", "BIAS": "*bf16", "Y": "*bf16"},
                dict(plain, **off, HAS_BIAS=False, GROUP_M=8), num_warps=8),
        AotSpec("bf16 no norm", grouped_linear_grad_weight_kernel, {**bf16, "DY": "*bf16", "DW": "*bf16"},
                dict(plain, **off), num_warps=8),
        AotSpec("bf16 into dx", grouped_linear_grad_input_kernel, {"DY": "*bf16", "W": "*bf16", "GZ": "*bf16"},
                plain, num_warps=8),
    ]
    for dtype in ("bf16", "fp32"):  # the row kernels have no dots: one variant per storage dtype
        ptr = f"*{dtype}"
        specs.append(AotSpec(f"{dtype} d=1408", token_stats_kernel, {"X": ptr, "MEAN": "*fp32", "RSTD": "*fp32"},
                             dict(BLOCK_T=16, BLOCK_D=256), floats=("eps",), tensor_cores=()))
        specs.append(AotSpec(f"{dtype} d=1408", layernorm_backward_kernel,
                             {"GZ": "*fp32", "X": ptr, "MEAN": "*fp32", "RSTD": "*fp32", "GAMMA": ptr, "DX": ptr,
                              "DGAMMA_PART": "*fp32", "DBETA_PART": "*fp32"},
                             dict(HAS_GAMMA=True, WRITE_DX=True, WRITE_WEIGHTS=True, BLOCK_T=2, BLOCK_D=2048),
                             tensor_cores=()))
    return specs
