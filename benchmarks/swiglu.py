"""Benchmark: SwiGLU's silu(gate) * up, forward + backward (both requiring grad): eager (F.silu(gate) * up) vs
mrgfast's fused op vs torch.compile of the eager code."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from benchmarks import harness
from benchmarks.variants import REGION_HEADLINE, compiled_variant, measure_regions, op_config
from mrgfast.ops.swiglu import IMPLEMENTED, reference_swiglu, swiglu

NAME = "swiglu"
# Cases: (tokens, intermediate). Full: Llama-3.2-1B's MLP (intermediate 8192), 4 x 4096 tokens.
FULL = dict(cases={"gate_up": (16384, 8192)}, warmup=2, repeats=9)
QUICK = dict(cases={"gate_up": (512, 704)}, warmup=2, repeats=9)
STEP = "y = swiglu(gate, up); y.backward(g)"


def measure_gate_up(run: harness.Run, case: str, tokens: int, inner: int) -> dict:
    """One case: eager vs the fused op vs torch.compile."""
    gate = torch.randn(tokens, inner, device=run.device, dtype=run.dtype, requires_grad=True)
    up = torch.randn(tokens, inner, device=run.device, dtype=run.dtype, requires_grad=True)
    upstream = [torch.randn_like(gate)]
    compiled = compiled_variant(reference_swiglu)
    fns = {"eager": lambda: reference_swiglu(gate, up), "mrgfast": lambda: swiglu(gate, up),
           "compile": lambda: compiled(gate, up)}
    result = measure_regions(NAME, run, case, fns, [gate, up], upstream)
    return {**result, "shape": dict(tokens=tokens, intermediate=inner)}


def main() -> None:
    """Check the variants agree, then time and memory-profile them."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL)
    results = {case: measure_gate_up(run, case, *shape) for case, shape in run.shape["cases"].items()}
    run.report(op_config(run, NAME, IMPLEMENTED, STEP, REGION_HEADLINE), results)


if __name__ == "__main__":
    main()
