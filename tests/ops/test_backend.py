"""MRGFAST_BACKEND parsing, per-device backend selection, and the kernel module each backend runs."""

import importlib

import pytest
import torch

from mrgfast.ops.backend import select_backend

CPU = torch.zeros(1)


@pytest.mark.parametrize("forced,expected", [("auto", "cpu"), ("", "cpu"), ("reference", "reference"),
                                             ("cpu", "cpu"), ("CPU", "cpu")])
def test_cpu_tensor_selection(monkeypatch, forced, expected):
    monkeypatch.setenv("MRGFAST_BACKEND", forced)
    assert select_backend("op", CPU, ("cpu", "triton")) == expected


def test_auto_without_cpu_kernel_uses_reference(monkeypatch):
    monkeypatch.delenv("MRGFAST_BACKEND", raising=False)
    assert select_backend("op", CPU, ("triton",)) == "reference"


@pytest.mark.parametrize("forced,implemented,error,message", [
    ("fast", ("cpu",), ValueError, "MRGFAST_BACKEND='fast' is not a backend; expected one of auto"),  # unknown
    ("cuda", ("cpu", "triton"), RuntimeError, "op has no 'cuda' backend"),  # one the op lacks
    ("cuda", ("cuda",), RuntimeError, "needs CUDA tensors"),  # one this device cannot run
])
def test_a_forced_backend_that_cannot_run_is_an_error(monkeypatch, forced, implemented, error, message):
    monkeypatch.setenv("MRGFAST_BACKEND", forced)
    with pytest.raises(error, match=message):
        select_backend("op", CPU, implemented)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("MRGFAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend("op", CPU, ("triton",))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("op", CPU, ("triton",)) == "triton"


# Every backend each op implements, and the module in mrgfast/ops/backends/ that runs it.
KERNEL_MODULES = {
    "affine_prompt": {"cpu": "native", "cuda": "native", "triton": "triton"},
    "group_tokens": {"cpu": "native", "cuda": "native", "triton": "triton"},
    "grouped_projection": {"cpu": "native", "cuda": "native", "triton": "triton"},
    "lora_linear": {"cpu": "torch", "triton": "triton"},
    "linear_cross_entropy": {"cpu": "torch", "triton": "triton"},
    "rms_norm": {"triton": "triton"},
    "rope": {"triton": "triton"},
    "swiglu": {"triton": "triton"},
}


@pytest.mark.parametrize("op", KERNEL_MODULES)
def test_each_backend_runs_its_own_kernel_module(op):
    module = importlib.import_module(f"mrgfast.ops.{op}")  # the op's module (mrgfast.ops.<op> is its function)
    assert set(module.IMPLEMENTED) == set(KERNEL_MODULES[op])
    for backend, kind in KERNEL_MODULES[op].items():
        assert module.kernels(backend).__name__ == f"mrgfast.ops.backends.{kind}.{op}"


class CudaLike:
    """What select_backend reads of a tensor (its device), on a CUDA device this machine need not have."""

    device = torch.device("cuda")
    is_cuda = True


@pytest.fixture
def gpu_kernels(monkeypatch):
    """Triton installed and mrgfast._C built with its CUDA kernels, as on the GPU machine; MRGFAST_BACKEND unset."""
    from mrgfast.ops import backend
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setattr(backend, "cuda_kernels_built", lambda: True)
    monkeypatch.delenv("MRGFAST_BACKEND", raising=False)


@pytest.mark.parametrize("op,case,size,expected", [
    ("grouped_projection", "1d_frozen_x", 16 * 1024 * 1408, "reference"),
    ("grouped_projection", "2d_train_x", 16 * 1024 * 1280, "reference"),
    ("group_tokens", "2d", 16 * 1024 * 1280, "reference"),
    ("group_tokens", "2d_pad", 16 * 1089 * 1280, "cuda"),
    ("affine_prompt", "prompt_out", 32 * 32 * 4096, "reference"),
    ("affine_prompt", "book_new", 32 * 32 * 4096, "triton"),
])
def test_auto_on_cuda_follows_the_routing_table(gpu_kernels, op, case, size, expected):
    implemented = importlib.import_module(f"mrgfast.ops.{op}").IMPLEMENTED
    assert select_backend(op, CudaLike(), implemented, case, size) == expected


def test_auto_on_cuda_without_a_case_runs_the_kernel_as_before(gpu_kernels):
    assert select_backend("lora_linear", CudaLike(), ("cpu", "triton")) == "triton"


@pytest.mark.parametrize("forced", ["triton", "cuda", "reference"])
def test_a_forced_backend_ignores_the_routing_table(gpu_kernels, monkeypatch, forced):
    monkeypatch.setenv("MRGFAST_BACKEND", forced)
    assert select_backend("grouped_projection", CudaLike(), ("cpu", "triton", "cuda"), "1d_frozen_x", 10 ** 8) == forced


def test_forced_cpu_runs_the_cpu_kernel_where_auto_would_not(monkeypatch):
    from mrgfast.ops import routing
    monkeypatch.setitem(routing.TABLE, ("cpu", "group_tokens", "2d"), None)
    monkeypatch.delenv("MRGFAST_BACKEND", raising=False)
    assert select_backend("group_tokens", CPU, ("cpu", "triton", "cuda"), "2d", 10 ** 8) == "reference"
    monkeypatch.setenv("MRGFAST_BACKEND", "cpu")
    assert select_backend("group_tokens", CPU, ("cpu", "triton", "cuda"), "2d", 10 ** 8) == "cpu"


def test_available_kernels(monkeypatch):
    from mrgfast.ops import backend
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setattr(backend, "cuda_kernels_built", lambda: False)
    assert backend.available_kernels("cuda", ("cpu", "triton", "cuda")) == ("triton",)
    assert backend.available_kernels("cuda", ("cpu",)) == ()
    assert backend.available_kernels("cpu", ("cpu", "triton")) == ("cpu",)
    assert backend.available_kernels("cpu", ("triton",)) == ()
