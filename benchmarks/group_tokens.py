"""Benchmark: the plain group_tokens op where it is a copy (2d neighbours, padded 2d, padded 1d), forward + backward
with x requiring grad: torch's pad + permute copy (the op's torch path) vs mrgfast's kernels."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from benchmarks import harness
from benchmarks.variants import (
    backend_variants, check_variants, forced_backend, op_config, training_step, with_routing,
)
from mrgfast.ops.group_tokens import IMPLEMENTED, group_layout, group_tokens, reference_group_tokens, routing_case

NAME = "group_tokens"
GROUP = 4
# Cases: (batch, tokens, dim, mode, grid, pad), groups of 4. Qwen2-VL's 32 x 32 x 1280 grid, 33 x 33 padded, and
# EVA-g's 1024 tokens + CLS (1025 x 1408) in PeFoMed's 1d groups, padded at the end.
QWEN2VL_2D = (1024, 1280, "2d", (32, 32), False)
QWEN2VL_2D_PAD = (33 * 33, 1280, "2d", (33, 33), True)
EVA_1D_PAD = (1025, 1408, "1d", None, True)
# The GPU sweep: images per step, the training size (16) first, so that a run its deadline cuts short keeps it.
IMAGES = (16, 8, 4, 2, 1)


def sweep(shapes: dict, images) -> dict:
    """{"<name>_<n>img": (n, *shape)} for every image count n (outer) and shape (inner)."""
    return {f"{name}_{n}img": (n, *shape) for n in images for name, shape in shapes.items()}


FULL = dict(cases={"group_2d": (4, 1024, 1408, "2d", (32, 32), False),
                   "group_2d_pad": (4, 33 * 33, 1408, "2d", (33, 33), True),
                   "group_1d_pad": (4, *EVA_1D_PAD)}, warmup=1, repeats=7, deadline_s=None)
# deadline_s: no case after the first starts past it (seconds since the run opened), inside the GPU suite's 10 s
# box less start-up.
GPU = dict(cases=sweep({"group_2d": QWEN2VL_2D, "group_2d_pad": QWEN2VL_2D_PAD, "group_1d_pad": EVA_1D_PAD}, IMAGES),
           warmup=5, repeats=20, deadline_s=5)
QUICK = dict(cases=sweep({"group_2d": (256, 256, "2d", (16, 16), False),
                          "group_2d_pad": (15 * 15, 256, "2d", (15, 15), True),
                          "group_1d_pad": (257, 256, "1d", None, True)}, (8, 2, 1)),
             warmup=2, repeats=9, deadline_s=None)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |diff| relative to max |expected|
STEP = ("y = group_tokens(x, 4, mode, grid, pad); y.backward(g); x requires grad; torch = the op's torch path; "
        "mrgfast = auto (the routing table's choice), triton / cuda / cpu = that kernel forced")
HEADLINE = "least favourable case: lowest torch/mrgfast (auto) time, highest mrgfast/torch peak memory"


def measure_grouping(run: harness.Run, case: str, batch, tokens, dim, mode, grid, pad) -> dict:
    """One case, forward + backward with x requiring grad: torch's pad + permute copy vs mrgfast's kernels."""
    x = torch.randn(batch, tokens, dim, device=run.device, dtype=run.dtype, requires_grad=True)
    layout = group_layout(x.shape, GROUP, mode, grid, pad)
    g = torch.randn(batch, layout.groups, GROUP * dim, device=run.device, dtype=run.dtype)

    def forced(backend):
        def fn(inp):
            with forced_backend(backend):
                return group_tokens(inp, GROUP, mode, grid, pad)
        return fn

    fns = {"torch": lambda inp: reference_group_tokens(inp, layout),
           **backend_variants(forced, IMPLEMENTED, run.device)}
    check_variants(NAME, case, fns, x, g, {name: [] for name in fns}, TOLERANCE[run.dtype])
    result = harness.measure_case({n: training_step(f, x, g) for n, f in fns.items()}, run.device,
                                  run.shape["warmup"], run.shape["repeats"], baseline="torch", candidate="mrgfast",
                                  reset=lambda: setattr(x, "grad", None))
    result = with_routing(result, NAME, routing_case(layout), x.numel(), IMPLEMENTED, run.device)
    return {**result, "shape": dict(batch=batch, tokens=tokens, dim=dim, mode=mode, grid=grid, pad=pad)}


def main() -> None:
    """Check every variant against torch's copy, then time and memory-profile them, case by case (until the
    deadline), writing the report after each."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL, GPU)
    config = op_config(run, NAME, IMPLEMENTED, STEP, HEADLINE)
    run.sweep(config, [(case, lambda case=case, shape=shape: {case: measure_grouping(run, case, *shape)})
                       for case, shape in run.shape["cases"].items()])


if __name__ == "__main__":
    main()
