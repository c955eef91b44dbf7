"""The routing table auto follows: complete, in the crossover script's format, the H200 decisions case by case, the
kernel's availability, one log line per choice, and each op's routed torch path against its kernel."""

import importlib
import logging

import pytest
import torch

from mrgfast.ops import routing
from mrgfast.ops.affine_prompt import affine_prompt
from mrgfast.ops.affine_prompt import routing_case as affine_case
from mrgfast.ops.group_tokens import group_layout, group_tokens
from mrgfast.ops.group_tokens import routing_case as grouping_case
from mrgfast.ops.grouped_projection import grouped_projection
from mrgfast.ops.grouped_projection import routing_case as projection_case
from mrgfast.ops.routing import REFERENCE, Route, decide

GPU_KERNELS = ("triton", "cuda")
# The training sizes of the issue, in elements: 16 images of 1024 x 1408 (PeFoMed), of 32 x 32 x 1280 (Qwen2-VL);
# MRG-LLM's 32 images x 32 prompts x 4096.
PEFOMED, QWEN2VL, MRG_LLM = 16 * 1024 * 1408, 16 * 1024 * 1280, 32 * 32 * 4096


def test_the_table_has_every_case_on_every_device_and_routes_only_to_kernels_the_op_has():
    expected = {(device, op, case) for device in routing.DEVICES for op, cases in routing.CASES.items()
                for case in cases}
    assert set(routing.TABLE) == expected
    for (device, op, _), route in routing.TABLE.items():
        if route is not None:
            assert route.backend in importlib.import_module(f"mrgfast.ops.{op}").IMPLEMENTED
            assert route.backend in (GPU_KERNELS if device == "cuda" else ("cpu",)) and route.from_size > 0


def test_table_lines_are_the_tables_own_format():
    text = "{\n" + "\n".join(routing.table_lines(routing.TABLE)) + "\n}"
    assert eval(text, {"Route": Route}) == routing.TABLE  # noqa: S307 - our own generated literal


# On CUDA, with both kernels available: (op, case, size) -> what auto runs (the 2026-12-04 H200 figures).
H200_DECISIONS = [
    *[("grouped_projection", case, size, REFERENCE) for case in routing.CASES["grouped_projection"]
      for size in (1, PEFOMED, 100 * PEFOMED)],  # lost everywhere: 0.46-0.68 (Triton), 0.59-0.86 (CUDA)
    ("group_tokens", "2d", QWEN2VL, REFERENCE),  # 1.03: a tie against a torch path that copied x once more
    ("group_tokens", "1d_pad", QWEN2VL, REFERENCE),  # never measured
    ("group_tokens", "2d_pad", 6_133_248, "cuda"),  # the CUDA kernel 1.14 at B=4 33x33x1408
    ("group_tokens", "2d_pad", 6_133_247, REFERENCE),  # below the measured size
    ("group_tokens", "2d_pad", QWEN2VL, "cuda"),
    ("affine_prompt", "prompt_new", MRG_LLM, REFERENCE),  # 0.72-0.74
    ("affine_prompt", "prompt_out", MRG_LLM, REFERENCE),  # 0.86-0.90
    ("affine_prompt", "book_new", MRG_LLM, "triton"),  # 1.066-1.068 at 2,097,152 elements
    ("affine_prompt", "book_out", 2_097_152, "triton"),  # 1.056-1.167
    ("affine_prompt", "book_out", 2_097_151, REFERENCE),
    ("affine_prompt", "book_new", 16 * 4096, REFERENCE),
]


@pytest.mark.parametrize("op,case,size,expected", H200_DECISIONS)
def test_cuda_decisions_follow_the_h200_measurements(op, case, size, expected):
    backend, why = decide(op, case, "cuda", size, GPU_KERNELS)
    assert backend == expected, why


def test_a_winning_kernel_that_is_not_available_runs_the_torch_path():
    backend, why = decide("group_tokens", "2d_pad", "cuda", QWEN2VL, ("triton",))  # mrgfast._C without CUDA
    assert backend == REFERENCE and "not available" in why
    assert decide("affine_prompt", "book_new", "cuda", MRG_LLM, ())[0] == REFERENCE  # no triton installed


def test_sizes_from_the_route_up_run_the_kernel(monkeypatch):
    monkeypatch.setitem(routing.TABLE, ("cpu", "group_tokens", "2d"), Route("cpu", 1000))
    assert [decide("group_tokens", "2d", "cpu", n, ("cpu",))[0] for n in (999, 1000, 10 ** 9)] == \
        [REFERENCE, "cpu", "cpu"]
    monkeypatch.delitem(routing.TABLE, ("cpu", "group_tokens", "2d"))
    assert decide("group_tokens", "2d", "cpu", 10 ** 9, ("cpu",)) == (REFERENCE, "no measurement on cpu")


def test_an_unknown_case_is_an_error():
    with pytest.raises(ValueError, match="'group_tokens' has no case '3d'; expected one of 1d_pad, 2d, 2d_pad"):
        decide("group_tokens", "3d", "cuda", 1, GPU_KERNELS)


def test_auto_logs_each_choice_once(monkeypatch, caplog):
    monkeypatch.setattr(routing, "_logged", set())
    with caplog.at_level(logging.INFO, logger="mrgfast.ops.routing"):
        for size in (QWEN2VL, QWEN2VL, 2 * QWEN2VL):
            assert routing.auto_backend("group_tokens", "2d_pad", "cuda", size, GPU_KERNELS) == "cuda"
        assert routing.auto_backend("group_tokens", "2d_pad", "cuda", 10, GPU_KERNELS) == REFERENCE
        routing.auto_backend("grouped_projection", "1d_frozen_x", "cuda", PEFOMED, GPU_KERNELS)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "mrgfast auto: group_tokens [2d_pad] on cuda runs the cuda kernel: measured faster than eager from "
        "6,133,248 elements, this call has 20,971,520",
        "mrgfast auto: group_tokens [2d_pad] on cuda runs the torch path: cuda wins from 6,133,248 elements, "
        "this call has 10",
        "mrgfast auto: grouped_projection [1d_frozen_x] on cuda runs the torch path: no kernel measured faster "
        "than eager on cuda"]


def test_each_op_names_its_routing_case():
    x = torch.zeros(2, 16, 3)
    assert grouping_case(group_layout(x.shape, 4, "2d", (4, 4))) == "2d"
    assert grouping_case(group_layout((2, 15, 3), 4, "2d", (3, 5), pad=True)) == "2d_pad"
    assert grouping_case(group_layout((2, 15, 3), 4, "1d", pad=True)) == "1d_pad"
    assert grouping_case(group_layout((2, 5, 3), 4, "2d", (1, 5), pad=True)) == "2d_pad"  # one row high, still 2d
    layout = group_layout(x.shape, 4)
    assert projection_case(x, layout) == "1d_frozen_x"
    trainable = x.clone().requires_grad_()
    assert projection_case(trainable, layout) == "1d_train_x"
    with torch.no_grad():
        assert projection_case(trainable, layout) == "1d_frozen_x"  # nothing to differentiate
    assert projection_case(trainable, group_layout(x.shape, 4, "2d", (4, 4))) == "2d_train_x"
    assert [affine_case(b, o) for b in (False, True) for o in (False, True)] == list(routing.CASES["affine_prompt"])


def route_everything(monkeypatch, route):
    """Every CPU case of the table set to `route` (None: the torch path), as a measured table would say."""
    for op, cases in routing.CASES.items():
        for case in cases:
            monkeypatch.setitem(routing.TABLE, ("cpu", op, case), route)
    monkeypatch.delenv("MRGFAST_BACKEND", raising=False)


def outputs_and_grads(fn, inputs, grad):
    """fn()'s output and the gradients of `inputs` after backward with `grad`."""
    for t in inputs:
        t.grad = None
    out = fn()
    out.backward(grad)
    return [out.detach().clone()] + [t.grad.clone() for t in inputs]


def both_paths(monkeypatch, fn, inputs, grad):
    """fn under auto routed to the torch path, then routed to the C++ kernel (outputs and gradients of each); checks
    that auto ran what the table said each time."""
    chosen = []
    auto_backend = routing.auto_backend
    monkeypatch.setattr(routing, "auto_backend", lambda *args: chosen.append(auto_backend(*args)) or chosen[-1])
    route_everything(monkeypatch, None)
    torch_path = outputs_and_grads(fn, inputs, grad)
    assert chosen and set(chosen) == {REFERENCE}
    chosen.clear()
    route_everything(monkeypatch, Route("cpu", 1))
    kernel = outputs_and_grads(fn, inputs, grad)
    assert chosen and set(chosen) == {"cpu"}
    return torch_path, kernel


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@DTYPES
@pytest.mark.parametrize("mode,grid,tokens", [("1d", None, 23), ("2d", (5, 7), 35)])
def test_auto_torch_path_of_grouped_projection_matches_the_kernel(monkeypatch, dtype, mode, grid, tokens):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, tokens, 6, generator=g), torch.randn(5, 24, generator=g) * 0.2
    b, gamma, beta = torch.randn(5, generator=g), torch.randn(6, generator=g), torch.randn(6, generator=g)
    inputs = [t.to(dtype).requires_grad_() for t in (x, w, b, gamma, beta)]
    fn = lambda: grouped_projection(*inputs[:3], 4, mode, grid, pad=True, norm_weight=inputs[3],  # noqa: E731
                                    norm_bias=inputs[4])
    grad = torch.randn(3, -(-tokens // 4) if mode == "1d" else 3 * 4, 5, generator=g).to(dtype)
    for a, k in zip(*both_paths(monkeypatch, fn, inputs, grad)):
        torch.testing.assert_close(a.float(), k.float(), **TOL[dtype])


@DTYPES
@pytest.mark.parametrize("mode,grid,tokens,pad", [("1d", None, 23, True), ("2d", (6, 4), 24, False),
                                                  ("2d", (5, 7), 35, True)])
def test_auto_torch_path_of_group_tokens_matches_the_kernel(monkeypatch, dtype, mode, grid, tokens, pad):
    x = torch.randn(3, tokens, 5).to(dtype).requires_grad_()
    layout = group_layout(x.shape, 4, mode, grid, pad)
    grad = torch.randn(3, layout.groups, 20).to(dtype)
    torch_path, kernel = both_paths(monkeypatch, lambda: group_tokens(x, 4, mode, grid, pad), [x], grad)
    for a, k in zip(torch_path, kernel):
        assert torch.equal(a, k)  # a copy: exact


@DTYPES
@pytest.mark.parametrize("book,in_place", [(1, False), (1, True), (3, False), (3, True)])
def test_auto_torch_path_of_affine_prompt_matches_the_kernel(monkeypatch, dtype, book, in_place):
    g = torch.Generator().manual_seed(1)
    prompts = torch.randn(*((book,) if book > 1 else ()), 5, 7, generator=g)
    tensors = [prompts, torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)]
    if book > 1:
        tensors.append(torch.randn(3, book, generator=g).softmax(-1))
    inputs = [t.to(dtype).requires_grad_() for t in tensors]
    rows = 11

    def fn():
        out = torch.zeros(3, rows, 7, dtype=dtype) if in_place else None
        result = affine_prompt(*inputs[:3], inputs[3] if book > 1 else None, out=out,
                               offsets=torch.tensor([0, 2, 6]) if in_place else None)
        return result * 1  # a fresh tensor to call backward on
    grad = torch.randn(3, rows if in_place else 5, 7, generator=g).to(dtype)
    for a, k in zip(*both_paths(monkeypatch, fn, inputs, grad)):
        torch.testing.assert_close(a.float(), k.float(), **TOL[dtype])
