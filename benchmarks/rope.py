"""Benchmark: RoPE of a step's q and k, forward + backward (both requiring grad, tables fixed): eager (HF's
rotate_half code) vs mrgfast's fused op vs torch.compile of the eager code."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from benchmarks import harness
from benchmarks.variants import REGION_HEADLINE, compiled_variant, measure_regions, op_config
from mrgfast.ops.rope import IMPLEMENTED, reference_rope, rope

NAME = "rope"
# Cases: (tokens, q heads, kv heads, head_dim). Full: Llama-3.2-1B's attention (32 / 8 heads of 64), 4 x 4096 tokens.
FULL = dict(cases={"q_and_k": (16384, 32, 8, 64)}, warmup=2, repeats=9)
QUICK = dict(cases={"q_and_k": (512, 4, 2, 64)}, warmup=2, repeats=9)
STEP = "rope(q, cos, sin), rope(k, cos, sin); both backward; cos/sin fp32 tables of random positions"


def measure_q_and_k(run: harness.Run, case: str, tokens: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """One case: eager vs the fused op vs torch.compile on q and k of one step."""
    q = torch.randn(tokens, heads, head_dim, device=run.device, dtype=run.dtype, requires_grad=True)
    k = torch.randn(tokens, kv_heads, head_dim, device=run.device, dtype=run.dtype, requires_grad=True)
    angles = torch.rand(tokens, head_dim // 2, device=run.device) * 1000
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    upstream = [torch.randn_like(q), torch.randn_like(k)]
    compiled = compiled_variant(reference_rope)
    fns = {"eager": lambda: (reference_rope(q, cos, sin), reference_rope(k, cos, sin)),
           "mrgfast": lambda: (rope(q, cos, sin), rope(k, cos, sin)),
           "compile": lambda: (compiled(q, cos, sin), compiled(k, cos, sin))}
    result = measure_regions(NAME, run, case, fns, [q, k], upstream)
    return {**result, "shape": dict(tokens=tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim)}


def main() -> None:
    """Check the variants agree, then time and memory-profile them."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL)
    results = {case: measure_q_and_k(run, case, *shape) for case, shape in run.shape["cases"].items()}
    run.report(op_config(run, NAME, IMPLEMENTED, STEP, REGION_HEADLINE), results)


if __name__ == "__main__":
    main()
