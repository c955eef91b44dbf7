"""The torch ("cpu") LoRA backend's dropout: forward's keep mask, packed to bits, is the one backward uses."""

import numpy as np
import pytest
import torch

from mrgfast.ops.backends.torch import lora_linear as cpu_lora
from mrgfast.ops.dropout import torch_keep_mask


@pytest.mark.parametrize("rows, cols", [(1, 1), (37, 13), (300, 4100)])  # 4100: several row blocks, cols % 8 != 0
def test_dropped_xa_packs_the_torch_keep_mask(rows, cols):
    x, a = torch.randn(rows, cols), torch.randn(5, cols)
    xa, keep_bits = cpu_lora.dropped_xa(x, a, 0.3, 1234)
    keep = torch_keep_mask(rows, cols, 0.3, 1234, torch.device("cpu"))
    assert keep_bits.dtype == torch.uint8 and tuple(keep_bits.shape) == (rows, (cols + 7) // 8)
    unpacked = np.unpackbits(keep_bits.numpy(), axis=1, count=cols).astype(bool)
    assert np.array_equal(unpacked, keep.numpy())
    torch.testing.assert_close(xa, (x * keep / 0.7) @ a.t(), rtol=1e-4, atol=1e-4 * cols ** 0.5)  # sums of cols terms


def test_backward_uses_the_saved_mask_and_draws_nothing(monkeypatch):
    rows, cols = 33, 20
    x = torch.randn(rows, cols, requires_grad=True)
    weight, a, b = torch.randn(7, cols), torch.randn(4, cols, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    y, saved = cpu_lora.lora_forward(x.detach(), weight, None, a.detach(), b.detach(), 0.5, 0.25, 99)
    keep = torch_keep_mask(rows, cols, 0.25, 99, torch.device("cpu"))

    def no_draws(*args, **kwargs):
        raise AssertionError("backward drew a dropout mask instead of using forward's")

    monkeypatch.setattr(cpu_lora, "keep_blocks", no_draws)
    grad_y = torch.randn(rows, 7)
    grad_x, _, _, grad_a, grad_b = cpu_lora.lora_backward(
        grad_y, x.detach(), weight, a.detach(), b.detach(), saved, 0.5, 0.25, 99,
        need_x=True, need_weight=False, need_bias=False, need_a=True, need_b=True)
    reference = x @ weight.t() + 0.5 * ((x * keep / 0.75) @ a.t()) @ b.t()
    torch.testing.assert_close(y, reference.detach(), rtol=1e-5, atol=1e-5)
    want_x, want_a, want_b = torch.autograd.grad(reference, (x, a, b), grad_y)
    for got, want in ((grad_x, want_x), (grad_a, want_a), (grad_b, want_b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
