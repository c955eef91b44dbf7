"""MRGFAST_BACKEND parsing and per-device backend selection."""

import pytest
import torch

from mrgfast.backend import select_backend

CPU = torch.zeros(1)


@pytest.mark.parametrize("forced,expected", [("auto", "cpu"), ("", "cpu"), ("reference", "reference"),
                                             ("cpu", "cpu"), ("CPU", "cpu")])
def test_cpu_tensor_selection(monkeypatch, forced, expected):
    monkeypatch.setenv("MRGFAST_BACKEND", forced)
    assert select_backend("op", CPU, ("cpu", "triton")) == expected


def test_auto_without_cpu_kernel_uses_reference(monkeypatch):
    monkeypatch.delenv("MRGFAST_BACKEND", raising=False)
    assert select_backend("op", CPU, ("triton",)) == "reference"


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("MRGFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="MRGFAST_BACKEND='fast' is not a backend; expected one of auto"):
        select_backend("op", CPU, ("cpu",))


def test_forced_backend_the_op_lacks_is_an_error(monkeypatch):
    monkeypatch.setenv("MRGFAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="op has no 'cuda' backend"):
        select_backend("op", CPU, ("cpu", "triton"))


def test_cuda_backend_needs_cuda_tensors(monkeypatch):
    monkeypatch.setenv("MRGFAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        select_backend("op", CPU, ("cuda",))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("MRGFAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend("op", CPU, ("triton",))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("op", CPU, ("triton",)) == "triton"


def test_kernel_modules_follow_the_naming_convention():
    from mrgfast.backend import kernel_module

    assert kernel_module("lora_linear", "cpu").__name__ == "mrgfast.ops.lora_linear_cpu"
    assert kernel_module("linear_cross_entropy", "triton").__name__ == "mrgfast.ops.triton.linear_cross_entropy"
    with pytest.raises(ValueError, match="no kernel module for backend 'reference'"):
        kernel_module("lora_linear", "reference")
