"""Pieces shared by the Triton kernels: program ordering, seeded dropout masks, launch settings."""

import functools
from dataclasses import dataclass
from typing import Optional

import numpy
import torch
import triton
import triton.language as tl

from mrgfast.ops.backend import triton_interpreting


@triton.jit
def grouped_program_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a 1-D program id to (row block, column block), GROUP_M row blocks at a time for L2 reuse."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def keep_mask(seed, p, offs_row, offs_col, n_cols):
    """Keep mask of the seeded dropout at (row, col) of a [rows, n_cols] tensor; 64-bit offsets never wrap."""
    offsets = offs_row[:, None].to(tl.int64) * n_cols + offs_col[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit
def keep_mask_kernel(OUT, M, K, p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Write the keep mask (int8) the LoRA kernels draw for `seed`, so tests can build references."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, p, offs_m, offs_k, K)
    tl.store(OUT + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def triton_keep_mask(rows: int, cols: int, p: float, seed: int, device) -> torch.Tensor:
    """The boolean keep mask [rows, cols] the Triton kernels draw for `seed`."""
    out = torch.empty((rows, cols), dtype=torch.int8, device=device)
    if rows and cols:
        grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
        keep_mask_kernel[grid](out, rows, cols, float(p), int(seed), BLOCK_M=32, BLOCK_K=32)
    return out.bool()


@dataclass(frozen=True)
class LaunchSettings:
    """How kernels are launched for a tensor: interpreter or GPU, and the tl.dot flags that follow."""

    interpret: bool
    flags: dict


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands: TF32 only where torch itself allows it for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def interpreter_conflict(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why this Triton's interpreter cannot run beside this numpy, or None.

    Triton up to 3.6 turns a one-element array into a loop bound with int(array), which numpy 2.4 refuses for arrays
    with a dimension; Triton 3.7 squeezes first. Every kernel with a runtime loop bound then fails in the
    interpreter with "only 0-dimensional arrays can be converted to Python scalars". Compiled kernels are unaffected.
    """
    def major_minor(version: str) -> tuple:
        return tuple(int(part) for part in version.split(".")[:2])

    if major_minor(triton_version) <= (3, 6) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run beside numpy {numpy_version}: "
                "it calls int() on one-element arrays, which numpy 2.4 refuses; install numpy<2.4 or triton>=3.7")
    return None


@functools.cache
def check_interpreter() -> None:
    """RuntimeError naming the versions when the installed Triton interpreter cannot run with the installed numpy."""
    conflict = interpreter_conflict(triton.__version__, numpy.__version__)
    if conflict:
        raise RuntimeError(conflict)


def launch_settings(tensor: torch.Tensor) -> LaunchSettings:
    """Launch settings for kernels reading `tensor`."""
    interpret = not tensor.is_cuda
    if interpret and not triton_interpreting():
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    if interpret:
        check_interpreter()
    # The interpreter multiplies raw bf16 bit patterns in tl.dot, so tiles go to fp32 there.
    return LaunchSettings(interpret, {"DOT_FP32": interpret, "PRECISION": dot_precision(tensor.dtype)})


def padded_rank(n: int) -> int:
    """The power-of-two tile (at least 16, tl.dot's minimum) that holds n."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def split_for_parallelism(reduction: int, tiles: int, device: torch.device, rows_per_split: int = 256) -> int:
    """How many programs share a long reduction so small outputs still fill the GPU (1 when deterministic)."""
    if torch.are_deterministic_algorithms_enabled() or tiles <= 0:
        return 1
    programs_wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    by_parallelism = max(1, programs_wanted // tiles)
    by_length = max(1, reduction // rows_per_split)
    return min(by_parallelism, by_length)


def aot_specs():
    """The mask kernel, compiled ahead of time like every other kernel (no tensor cores involved)."""
    from mrgfast.ops.backends.triton.aot import AotSpec

    return [AotSpec("int8 mask", keep_mask_kernel, {"OUT": "*i8"}, dict(BLOCK_M=32, BLOCK_K=32),
                    floats=("p",), tensor_cores=())]
