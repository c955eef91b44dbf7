"""Backend selection: which implementation an op runs for a given tensor (MRGFAST_BACKEND).

Each op module maps the name chosen here to its kernel module in mrgfast.ops.backends (its `kernels()`).
"""

import importlib.util
import os
from typing import Optional

import torch

from mrgfast.ops import routing
from mrgfast.ops.backends.native.extension import cuda_kernels_built

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
ENV_VAR = "MRGFAST_BACKEND"


def requested_backend() -> str:
    """The backend forced by MRGFAST_BACKEND, or "auto"."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return value


def triton_interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """Whether the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def available_kernels(device: str, implemented: tuple[str, ...]) -> tuple[str, ...]:
    """The kernels of `implemented` that can run on a `device`-type tensor here (triton installed, CUDA kernels
    built into mrgfast._C)."""
    if device == "cuda":
        runnable = {"triton": triton_available(), "cuda": "cuda" in implemented and cuda_kernels_built()}
        return tuple(b for b in ("triton", "cuda") if b in implemented and runnable[b])
    return ("cpu",) if device == "cpu" and "cpu" in implemented else ()


def select_backend(op: str, tensor: torch.Tensor, implemented: tuple[str, ...], case: Optional[str] = None,
                   size: int = 0) -> str:
    """Pick the backend for `op` on `tensor`'s device, honouring MRGFAST_BACKEND.

    `implemented` lists the backends this op has (besides "reference", which every op has).
    A forced backend the op lacks, or one that cannot run on this device, is an error:
    mrgfast never silently falls back to a slower path. Under `auto`, an op that passes its routing `case` and
    `size` (elements) runs what mrgfast.ops.routing's measured table says for it (its torch path where no kernel
    was measured faster); other ops run their kernel.
    """
    forced = requested_backend()
    on_cuda = tensor.is_cuda
    device = tensor.device.type
    if forced == "auto" and case is not None and device in routing.DEVICES:
        return routing.auto_backend(op, case, device, size, available_kernels(device, implemented))
    if forced == "auto":
        if not on_cuda:
            return "cpu" if "cpu" in implemented else "reference"
        for candidate in ("triton", "cuda"):
            if candidate in implemented and (candidate != "triton" or triton_available()):
                return candidate
        raise RuntimeError(f"{op}: no GPU kernel is available (implemented: {implemented}); "
                           "install triton or set MRGFAST_BACKEND=reference")
    if forced == "reference":
        return "reference"
    if forced not in implemented:
        raise RuntimeError(f"{op} has no {forced!r} backend (it has: reference, {', '.join(implemented)})")
    if forced == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but the triton package is not installed")
        if not on_cuda and not triton_interpreting():
            raise RuntimeError(f"{op}: Triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter)")
    if forced == "cuda" and not on_cuda:
        raise RuntimeError(f"{op}: {ENV_VAR}=cuda needs CUDA tensors, got a tensor on {tensor.device}")
    if forced == "cpu" and on_cuda:
        raise RuntimeError(f"{op}: {ENV_VAR}=cpu needs CPU tensors, got a tensor on {tensor.device}")
    return forced

