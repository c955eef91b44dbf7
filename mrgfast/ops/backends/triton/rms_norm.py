"""Triton RMSNorm with the residual add: one pass over each row forward, one backward (dx, fp32 dweight partials).

Each program holds whole rows on chip (hidden <= MAX_DIM). The forward rounds exactly where HF's LlamaRMSNorm does:
the sum to the stream's dtype, the normalised row to it before the weight.
"""

import functools

import torch
import triton
import triton.language as tl

from mrgfast.ops.backends.triton.common import launch_settings
from mrgfast.ops.backends.triton.tuning import Tuned

MAX_DIM = 16384  # a whole row stays on chip


@triton.jit
def rms_norm_forward_kernel(
    X, RESIDUAL, WEIGHT, Y, SUM, RSTD,
    M, N, stride_x, stride_r, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """h = x (+ residual), stored as SUM; y = weight * round(h / rms(h)); rstd per row in fp32."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    h = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(RESIDUAL + rows64 * stride_r + cols[None, :], mask=mask,
                                        other=0.0).to(tl.float32)).to(SUM.dtype.element_ty)
        tl.store(SUM + rows64 * N + cols[None, :], h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=1) / N + eps)
    normed = (hf * rstd[:, None]).to(SUM.dtype.element_ty).to(tl.float32)  # HF casts back before the weight
    w = tl.load(WEIGHT + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(Y + rows64 * N + cols[None, :], (normed * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def rms_norm_backward_kernel(
    DY, DSUM, H, RSTD, WEIGHT, DX, DW_PART,
    M, N,
    HAS_DSUM: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx = rstd * (dy*w - hhat * mean(dy*w*hhat)) (+ the sum's own gradient); this program's sum of dy * round(hhat)
    over its rows goes to row pid of DW_PART (summed afterwards: deterministic)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < N
    w = tl.load(WEIGHT + cols, mask=mask_d, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(pid * BLOCK_T, M, tl.num_programs(0) * BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask = (rows < M)[:, None] & mask_d[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + offsets, mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
        hhat = h.to(tl.float32) * rstd[:, None]
        if WRITE_DW:
            dw += tl.sum(dy * hhat.to(H.dtype.element_ty).to(tl.float32), axis=0)
        if WRITE_DX:
            dn = dy * w[None, :]
            dx = rstd[:, None] * (dn - hhat * (tl.sum(dn * hhat, axis=1) / N)[:, None])
            if HAS_DSUM:  # the sum x + residual is an output too: its gradient reaches x and residual unchanged
                dx += tl.load(DSUM + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    if WRITE_DW:
        tl.store(DW_PART + pid * N + cols, dw, mask=mask_d)


def _row_configs(block_d: int):
    """Candidates for rows of `block_d` features: rows per program and warps, tiles of at most 16K elements. The
    first (the one run untuned) is one row with about 512 features a warp."""
    first = (1, min(16, max(4, block_d // 512)))
    shapes = [first] + [(t, w) for t in (1, 2, 4, 8) for w in (4, 8, 16) if (t, w) != first and t * block_d <= 16384]
    return [triton.Config({"BLOCK_T": t}, num_warps=w, num_stages=1) for t, w in shapes]


@functools.cache
def _tuned(kernel_name: str, block_d: int) -> Tuned:
    """A row kernel under the tuner, by hidden size and the token count's power-of-two bucket."""
    return Tuned(globals()[kernel_name], _row_configs(block_d), key=["M", "N"], buckets=["M"])


def _launch(kernel_name, grid_of, args, flags, interpret):
    """Fixed blocks in the interpreter, tuned on a GPU."""
    if interpret:
        globals()[kernel_name][grid_of({"BLOCK_T": 4})](*args, **flags, BLOCK_T=4)
    else:
        _tuned(kernel_name, flags["BLOCK_D"])(grid_of, *args, **flags)


def _check_dim(n: int) -> int:
    """The on-chip row tile, or a clear error for rows wider than fit."""
    if n > MAX_DIM:
        raise ValueError(f"rms_norm (triton): hidden size {n} exceeds {MAX_DIM}")
    return triton.next_power_of_2(n)


def rms_norm_forward(x, residual, weight, eps, out_dtype):
    """(y [M, N] in out_dtype, h = x + residual [M, N] or x itself, rstd [M] fp32) for 2-D x (and residual)."""
    M, N = x.shape
    settings = launch_settings(x)
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    h = torch.empty((M, N), dtype=x.dtype, device=x.device) if residual is not None else x
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        args = (x, residual if residual is not None else x, weight, y, h, rstd, M, N, x.stride(0),
                (residual if residual is not None else x).stride(0), float(eps))
        flags = dict(HAS_RESIDUAL=residual is not None, BLOCK_D=_check_dim(N))
        _launch("rms_norm_forward_kernel", lambda meta: (triton.cdiv(M, meta["BLOCK_T"]),), args, flags,
                settings.interpret)
    return y, h, rstd


def _programs(M: int, device: torch.device, interpret: bool) -> int:
    """Programs of the backward: a few per SM, each walking its share of rows (the dweight partials stay small)."""
    if interpret:
        return max(1, min(M, 4))
    return max(1, min(M, 4 * torch.cuda.get_device_properties(device).multi_processor_count))


def rms_norm_backward(grad_y, grad_sum, h, rstd, weight, *, need_x, need_weight):
    """(dx for x and residual alike, dweight in weight's dtype); None where not needed."""
    M, N = h.shape
    settings = launch_settings(h)
    programs = _programs(M, h.device, settings.interpret)
    dx = torch.empty((M, N), dtype=h.dtype, device=h.device) if need_x else None
    parts = torch.empty((programs, N), dtype=torch.float32, device=h.device) if need_weight else None
    if M:
        placeholder = grad_y
        args = (grad_y, grad_sum if grad_sum is not None else placeholder, h, rstd, weight,
                dx if need_x else placeholder, parts if need_weight else placeholder, M, N)
        flags = dict(HAS_DSUM=grad_sum is not None, WRITE_DX=need_x, WRITE_DW=need_weight, BLOCK_D=_check_dim(N))
        _launch("rms_norm_backward_kernel", lambda meta: (programs,), args, flags, settings.interpret)
    grad_w = None
    if need_weight:
        grad_w = (parts.sum(0) if M else parts.new_zeros(N)).to(weight.dtype)
    return dx, grad_w


def aot_specs():
    """The variants CI compiles ahead of time for sm_80 and sm_90 (see mrgfast.ops.backends.triton.aot)."""
    from mrgfast.ops.backends.triton.aot import AotSpec

    specs = []
    # Row kernels, no dots: the training dtype (bf16, fp32 weight under autocast too) and fp32, at hidden 2048.
    for dtype, weight in (("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")):
        ptr, out = f"*{dtype}", f"*{weight if weight == 'fp32' else dtype}"  # y follows torch's type promotion
        specs.append(AotSpec(f"{dtype} w={weight} d=2048", rms_norm_forward_kernel,
                             {"X": ptr, "RESIDUAL": ptr, "WEIGHT": f"*{weight}", "Y": out, "SUM": ptr,
                              "RSTD": "*fp32"},
                             dict(HAS_RESIDUAL=True, BLOCK_T=2, BLOCK_D=2048), floats=("eps",), num_warps=8,
                             tensor_cores=()))
        specs.append(AotSpec(f"{dtype} w={weight} d=2048", rms_norm_backward_kernel,
                             {"DY": out, "DSUM": ptr, "H": ptr, "RSTD": "*fp32", "WEIGHT": f"*{weight}", "DX": ptr,
                              "DW_PART": "*fp32"},
                             dict(HAS_DSUM=True, WRITE_DX=True, WRITE_DW=True, BLOCK_T=2, BLOCK_D=2048), num_warps=8,
                             tensor_cores=()))
    return specs
