"""The variants a benchmark compares: mrgfast under a forced backend, its GPU backends, the check that all agree, and
the elementwise regions' eager / mrgfast / torch.compile comparison."""

import contextlib
import os
from typing import Callable

import torch

from benchmarks import harness
from mrgfast.ops import routing
from mrgfast.ops.backend import ENV_VAR, available_kernels, select_backend
from mrgfast.ops.backends.native.extension import cuda_kernels_built


@contextlib.contextmanager
def forced_backend(name):
    """MRGFAST_BACKEND=name inside the block (None: leave it as it is)."""
    old = os.environ.get(ENV_VAR)
    if name is not None:
        os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if name is not None:
            if old is None:
                del os.environ[ENV_VAR]
            else:
                os.environ[ENV_VAR] = old


def gpu_variants(make: Callable[[object], Callable]) -> dict:
    """mrgfast's variants, make(backend): the auto backend, plus on GPU the CUDA-kernel backend when it is built."""
    variants = {"mrgfast": make(None)}
    if torch.cuda.is_available() and cuda_kernels_built():
        variants["mrgfast_cuda"] = make("cuda")
    return variants


def kernel_backends(implemented: tuple, device: torch.device) -> tuple:
    """The kernel backends an op benchmark forces one by one here: Triton and the CUDA kernels on a GPU (those
    installed and built), the C++ kernels on the CPU (never Triton's interpreter: it times Python)."""
    return available_kernels(device.type, implemented)


def backend_variants(make: Callable[[object], Callable], implemented: tuple, device: torch.device) -> dict:
    """make(backend) for `auto` ("mrgfast": what the routing table runs) and for every kernel backend forced."""
    return {"mrgfast": make(None), **{b: make(b) for b in kernel_backends(implemented, device)}}


def with_routing(result: dict, op: str, case: str, size: int, implemented: tuple, device: torch.device) -> dict:
    """A measure_case result plus what the crossover table is made from: "kernels" (each forced kernel's speed_ratio
    and memory_ratio against the baseline) and "routing" (the op's case, its size in elements, what auto ran)."""
    variants, base = result["variants"], result["variants"][result["baseline"]]
    kernels = {b: {"speed_ratio": base["median_ms"] / variants[b]["median_ms"],
                   "memory_ratio": variants[b]["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None}
               for b in kernel_backends(implemented, device) if b in variants}
    auto, why = routing.decide(op, case, device.type, size, kernel_backends(implemented, device))
    return {**result, "kernels": kernels,
            "routing": {"op": op, "case": case, "size": int(size), "auto": auto, "why": why}}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in fp32."""
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def outputs_and_grads(fn, x, g, params) -> list[torch.Tensor]:
    """fn(x), then the gradients of x (if it requires one) and params after backward with g."""
    for t in [x, *params]:
        t.grad = None
    y = fn(x)
    y.backward(g)
    return [y.detach().clone()] + [t.grad.clone() for t in [x, *params] if t.requires_grad]


def check_variants(name: str, label: str, fns: dict, x, g, params_of: dict, tolerance: float) -> None:
    """Every variant against the first: output and every gradient; exit non-zero on a mismatch."""
    names = list(fns)
    want = outputs_and_grads(fns[names[0]], x, g, params_of[names[0]])
    for variant in names[1:]:
        got = outputs_and_grads(fns[variant], x, g, params_of[variant])
        for i, (a, b) in enumerate(zip(got, want)):
            error = relative_error(a, b)
            if not error <= tolerance:
                raise SystemExit(f"{name}: {label}: {variant} tensor {i} differs from {names[0]}: {error:.3e}")


def op_config(run, op: str, implemented: tuple, step: str, headline: str) -> dict:
    """An op benchmark's report fields: warm-up and repeats, the backend mrgfast picks here, the step, the headline."""
    backend = select_backend(op, torch.empty(1, device=run.device), implemented)
    return {"warmup": run.shape["warmup"], "repeats": run.shape["repeats"], "mrgfast_backend": backend,
            "step": step, "headline": headline}


def training_step(fn, x, g):
    """One training step as a no-argument function: forward, backward with the fixed g."""
    return lambda: fn(x).backward(g)


def compiled_variant(fn: Callable) -> Callable:
    """fn under torch.compile (inductor): the alternative to a hand-written kernel for elementwise regions."""
    return torch.compile(fn)


def outputs_of(fn: Callable) -> tuple:
    """fn()'s outputs as a tuple (one tensor or several)."""
    out = fn()
    return out if isinstance(out, tuple) else (out,)


def region_step(fn: Callable, upstream: list) -> Callable:
    """One forward + backward of fn() (one or more outputs, each with its upstream gradient) as a no-argument step."""
    return lambda: torch.autograd.backward(outputs_of(fn), upstream)


def check_regions(name: str, label: str, fns: dict, inputs: list, upstream: list, tolerance: float) -> None:
    """Every variant of a multi-input region against the first: each output and each input's gradient; exit non-zero
    on a mismatch."""
    def run(fn):
        for t in inputs:
            t.grad = None
        outputs = outputs_of(fn)
        torch.autograd.backward(outputs, upstream)
        return [o.detach().clone() for o in outputs] + [t.grad.clone() for t in inputs if t.requires_grad]

    names = list(fns)
    want = run(fns[names[0]])
    for variant in names[1:]:
        for i, (a, b) in enumerate(zip(run(fns[variant]), want)):
            error = relative_error(a, b)
            if not error <= tolerance:
                raise SystemExit(f"{name}: {label}: {variant} tensor {i} differs from {names[0]}: {error:.3e}")
    for t in inputs:
        t.grad = None


# The elementwise regions' agreement (max |diff| relative to max |expected|, by dtype) and their report's headline.
REGION_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
REGION_HEADLINE = "eager / mrgfast time and mrgfast / eager peak memory; the compile variant's figures beside them"


def measure_regions(name: str, run, case: str, fns: dict, inputs: list, upstream: list) -> dict:
    """An elementwise region's case: its "eager", "mrgfast" and "compile" variants checked to agree, then timed and
    memory-profiled as forward + backward steps, with the compile variant's ratios added."""
    check_regions(name, case, fns, inputs, upstream, REGION_TOLERANCE[run.dtype])
    result = harness.measure_case({n: region_step(f, upstream) for n, f in fns.items()}, run.device,
                                  run.shape["warmup"], run.shape["repeats"], baseline="eager", candidate="mrgfast",
                                  reset=lambda: [setattr(t, "grad", None) for t in inputs])
    return with_compile_ratios(result)


def with_compile_ratios(result: dict) -> dict:
    """A measure_case result plus the torch.compile variant's standing: eager / compile time (`compile_speed_ratio`)
    and compile / mrgfast time (`mrgfast_vs_compile`, > 1: mrgfast's kernels are the faster choice)."""
    medians = {name: v["median_ms"] for name, v in result["variants"].items()}
    return {**result, "compile_speed_ratio": medians[result["baseline"]] / medians["compile"],
            "mrgfast_vs_compile": medians["compile"] / medians[result["candidate"]]}
