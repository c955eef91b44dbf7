"""The native extension mrgfast._C: built, importable, and its pointer/dtype plumbing rejects what kernels can't take."""

import pytest
import torch

from mrgfast.ops.backends.native import extension


def test_extension_is_built_and_imports():
    module = extension.native_module()
    assert module.openmp_max_threads() >= 1
    assert isinstance(module.registered_ops, list)


def test_cuda_kernels_need_a_cuda_build():
    if extension.cuda_kernels_built():
        assert extension.cuda_native_module().with_cuda
    else:
        with pytest.raises(RuntimeError, match="built without the CUDA kernels"):
            extension.cuda_native_module()


def test_dtype_codes_match_csrc_common_h():
    assert extension.dtype_code(torch.zeros(1), "x") == 0
    assert extension.dtype_code(torch.zeros(1, dtype=torch.bfloat16), "x") == 1
    with pytest.raises(ValueError, match="prompts: the native kernels take float32 or bfloat16"):
        extension.dtype_code(torch.zeros(1, dtype=torch.float16), "prompts")


def test_address_requires_contiguous_tensors():
    x = torch.zeros(4, 6)
    assert extension.address(x) == x.data_ptr()
    assert extension.address(None) == 0
    with pytest.raises(ValueError, match="contiguous"):
        extension.address(x.t())


def test_cpu_threads_follow_torch(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert extension.cpu_threads() == 3


def test_cpu_tensors_get_the_cpu_build():
    assert extension.module_for(torch.zeros(1)) is extension.native_module()


@pytest.mark.gpu
def test_cuda_kernels_are_built():
    assert extension.cuda_kernels_built(), "mrgfast._C has no CUDA kernels: reinstall with nvcc and a CUDA torch present"
