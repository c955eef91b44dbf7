"""Shared pieces of every op test: backends, tolerances, and the keep mask each backend draws (dropout in LoRA)."""

import pytest
import torch

from mrgfast.ops.backend import triton_interpreting
from mrgfast.ops.dropout import torch_keep_mask

# Relative-to-max error allowed against the fp32 reference, by input dtype (one table for every op).
TOLERANCE = {torch.float32: 5e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)]
# The LoRA ops also run the Triton backend's fused design (MRGFAST_LORA_KERNEL=fused, the split design's ablation).
LORA_BACKENDS = BACKENDS + [pytest.param("triton-fused", marks=pytest.mark.triton)]
# The backends of the tests marked gpu, never skipped there: an mrgfast._C built without CUDA kernels fails loudly.
GPU_BACKENDS = ["triton", "cuda"]


def use_backend(monkeypatch, backend: str) -> None:
    """Force `backend` for this test ("triton-fused": Triton's fused LoRA design); Triton on CPU tensors needs the
    interpreter."""
    if backend.startswith("triton") and not triton_interpreting():
        pytest.skip("Triton on CPU tensors runs only in the interpreter (TRITON_INTERPRET=1); GPU runs: -m gpu")
    name, _, design = backend.partition("-")
    monkeypatch.setenv("MRGFAST_BACKEND", name)
    if design:
        monkeypatch.setenv("MRGFAST_LORA_KERNEL", design)
    else:
        monkeypatch.delenv("MRGFAST_LORA_KERNEL", raising=False)


def keep_mask_of(backend: str, rows: int, cols: int, p: float, seed: int, device="cpu"):
    """The dropout keep mask `backend` draws for `seed`, to build the reference with."""
    if p == 0.0:
        return None
    if backend.startswith("triton"):
        from mrgfast.ops.backends.triton.common import triton_keep_mask
        return triton_keep_mask(rows, cols, p, seed, device)
    return torch_keep_mask(rows, cols, p, seed, torch.device(device))


def assert_close(actual, expected, dtype, what: str, tolerance: dict = None) -> None:
    """Max abs error relative to the reference's max magnitude, within the dtype's tolerance."""
    tolerance = tolerance or TOLERANCE
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return  # shapes matched: an empty tensor has nothing else to compare (max() of it would raise)
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = ((actual.float() - expected.float()).abs().max() / scale).item()
    assert error <= tolerance[dtype], f"{what}: relative error {error:.3g} > {tolerance[dtype]} ({dtype})"
