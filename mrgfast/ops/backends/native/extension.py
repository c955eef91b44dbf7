"""The native extension mrgfast._C (csrc/, kernels/): loading it and passing tensors to it as raw pointers."""

import functools
import importlib

import torch
from torch import Tensor

# Must match csrc/common.h (DType) and kernels/common.cuh.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


@functools.cache
def native_module():
    """mrgfast._C, or an ImportError saying how to build it (never a silent fallback to torch)."""
    try:
        return importlib.import_module("mrgfast._C")
    except ImportError as error:
        raise ImportError(
            "mrgfast._C (the C++/CUDA kernels) is not built: run `pip install -e .` in the repository "
            f"(needs cmake and a C++17 compiler with OpenMP) — {error}") from error


def native_available() -> bool:
    """Whether mrgfast._C imports."""
    try:
        native_module()
    except ImportError:
        return False
    return True


def cuda_kernels_built() -> bool:
    """Whether mrgfast._C carries the CUDA kernels of kernels/*.cu."""
    return native_available() and bool(native_module().with_cuda)


def cuda_native_module():
    """mrgfast._C with its CUDA kernels, or a RuntimeError saying it was built without them."""
    module = native_module()
    if not module.with_cuda:
        raise RuntimeError("mrgfast._C was built without the CUDA kernels (kernels/*.cu): reinstall with a CUDA "
                           "toolkit (nvcc) and a CUDA build of torch present, or MRGFAST_CUDA=1 pip install -e .")
    return module


def module_for(tensor: Tensor):
    """mrgfast._C for kernels on `tensor`'s device: with its CUDA kernels (else a RuntimeError) for CUDA tensors."""
    return cuda_native_module() if tensor.is_cuda else native_module()


def dtype_code(tensor: Tensor, name: str) -> int:
    """The native dtype code of `tensor`, or a ValueError naming the argument."""
    try:
        return DTYPE_CODES[tensor.dtype]
    except KeyError:
        raise ValueError(f"{name}: the native kernels take float32 or bfloat16, got {tensor.dtype}") from None


def address(tensor: Tensor | None) -> int:
    """tensor.data_ptr() for a contiguous tensor (0 for None): what the kernels index into."""
    if tensor is None:
        return 0
    if not tensor.is_contiguous():
        raise ValueError(f"native kernels need contiguous tensors, got strides {tensor.stride()} for shape "
                         f"{tuple(tensor.shape)}")
    return tensor.data_ptr()


def cpu_threads() -> int:
    """Threads for the OpenMP kernels: torch's intra-op setting, so both libraries share one budget."""
    return max(1, torch.get_num_threads())


def cuda_stream(tensor: Tensor) -> int:
    """The current CUDA stream handle for `tensor`'s device, as the kernels' launchers take it."""
    return torch.cuda.current_stream(tensor.device).cuda_stream
