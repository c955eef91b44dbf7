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
