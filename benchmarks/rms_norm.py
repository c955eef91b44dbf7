"""Benchmark: a pre-norm block's residual add + RMSNorm, forward + backward (the stream and the block's output
requiring grad, the norm weight frozen as under LoRA): eager (HF's LlamaRMSNorm after the add) vs mrgfast's fused
op vs torch.compile of the eager code."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from benchmarks import harness
from benchmarks.variants import REGION_HEADLINE, compiled_variant, measure_regions, op_config
from mrgfast.ops.rms_norm import IMPLEMENTED, reference_rms_norm, rms_norm

NAME = "rms_norm"
# Cases: (tokens, hidden). Full: a 1B-class step (Llama-3.2-1B's hidden 2048, 4 x 4096 tokens).
FULL = dict(cases={"add_norm": (16384, 2048)}, warmup=2, repeats=9)
QUICK = dict(cases={"add_norm": (512, 256)}, warmup=2, repeats=9)
STEP = "normed, stream = rms_norm(block_out, weight, eps, residual=stream); both backward; weight frozen"


def measure_add_norm(run: harness.Run, case: str, tokens: int, hidden: int) -> dict:
    """One case: eager vs the fused op vs torch.compile, both outputs given an upstream gradient."""
    def rand(*shape, grad=True):
        return torch.randn(*shape, device=run.device, dtype=run.dtype).requires_grad_(grad)

    block_out, stream, weight = rand(tokens, hidden), rand(tokens, hidden), rand(hidden, grad=False)
    upstream = [torch.randn(tokens, hidden, device=run.device, dtype=run.dtype) for _ in range(2)]
    compiled = compiled_variant(reference_rms_norm)
    fns = {"eager": lambda: reference_rms_norm(block_out, weight, 1e-5, stream),
           "mrgfast": lambda: rms_norm(block_out, weight, 1e-5, stream),
           "compile": lambda: compiled(block_out, weight, 1e-5, stream)}
    result = measure_regions(NAME, run, case, fns, [block_out, stream], upstream)
    return {**result, "shape": dict(tokens=tokens, hidden=hidden)}


def main() -> None:
    """Check the variants agree, then time and memory-profile them."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL)
    results = {case: measure_add_norm(run, case, *shape) for case, shape in run.shape["cases"].items()}
    run.report(op_config(run, NAME, IMPLEMENTED, STEP, REGION_HEADLINE), results)


if __name__ == "__main__":
    main()
