"""Benchmark: the plain 2d group_tokens op (Qwen2-VL's 2x2 neighbours, and padded), forward + backward with x
requiring grad: torch pad + permute copy vs mrgfast's kernel."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from benchmarks import harness
from benchmarks.variants import check_variants, forced_backend, gpu_variants, op_config, training_step
from mrgfast.ops.group_tokens import IMPLEMENTED, group_layout, group_tokens, reference_group_tokens

NAME = "group_tokens"
# Cases: (batch, tokens, dim, grid, pad), 2d groups of 4; EVA-g's 32 x 32 x 1408 grid, and 33 x 33 padded.
FULL = dict(cases={"group_2d": (4, 1024, 1408, (32, 32), False), "group_2d_pad": (4, 33 * 33, 1408, (33, 33), True)},
            warmup=1, repeats=7)
QUICK = dict(cases={"group_2d": (2, 256, 256, (16, 16), False), "group_2d_pad": (2, 15 * 15, 256, (15, 15), True)},
             warmup=2, repeats=9)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |diff| relative to max |expected|
STEP = "y = group_tokens(x, 4, '2d', grid, pad); y.backward(g); x requires grad"
HEADLINE = "least favourable case: lowest torch/mrgfast time, highest mrgfast/torch peak memory"


def measure_grouping(run: harness.Run, case: str, batch, tokens, dim, grid, pad) -> dict:
    """One case, forward + backward with x requiring grad: torch pad + permute copy vs mrgfast's kernel."""
    x = torch.randn(batch, tokens, dim, device=run.device, dtype=run.dtype, requires_grad=True)
    layout = group_layout(x.shape, 4, "2d", grid, pad)
    g = torch.randn(batch, layout.groups, 4 * dim, device=run.device, dtype=run.dtype)

    def forced(backend):
        def fn(inp):
            with forced_backend(backend):
                return group_tokens(inp, 4, "2d", grid, pad)
        return fn

    fns = {"torch": lambda inp: reference_group_tokens(inp, layout), **gpu_variants(forced)}
    check_variants(NAME, case, fns, x, g, {name: [] for name in fns}, TOLERANCE[run.dtype])
    result = harness.measure_case({n: training_step(f, x, g) for n, f in fns.items()}, run.device,
                                  run.shape["warmup"], run.shape["repeats"], baseline="torch", candidate="mrgfast",
                                  reset=lambda: setattr(x, "grad", None))
    return {**result, "shape": dict(batch=batch, tokens=tokens, dim=dim, grid=grid, pad=pad)}


def main() -> None:
    """Check every variant against torch's copy, then time and memory-profile them, case by case."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL)
    results = {case: measure_grouping(run, case, *shape) for case, shape in run.shape["cases"].items()}
    run.report(op_config(run, NAME, IMPLEMENTED, STEP, HEADLINE), results)


if __name__ == "__main__":
    main()
