"""Ahead-of-time compilation of every Triton kernel for real GPUs, on a machine without one.

`python -m mrgfast.ops.backends.triton.aot` compiles each kernel variant listed by the kernel modules'
`aot_specs()` for sm_80 and sm_90 and fails on a compile error, on a kernel (a `*_kernel`
JIT function) that no spec covers, or on a tensor-core path that went missing from the PTX.
"""

import argparse
import importlib
import inspect
import os
import pkgutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# Under TRITON_INTERPRET=1, @triton.jit yields InterpretedFunction; both are kernels to cover.
KERNEL_TYPES = (JITFunction, InterpretedFunction)

# The PTX instruction that proves tl.dot reached the tensor cores, per architecture.
TENSOR_CORE_INSTRUCTION = {80: "mma.sync", 90: "wgmma"}
# Shared memory one block may opt into: A100 (sm_80) and H100 (sm_90). A kernel above it cannot launch.
MAX_SHARED_BYTES = {80: 166912, 90: 232448}


@dataclass(frozen=True)
class AotSpec:
    """One compiled variant of a kernel: argument types, constexpr values and launch options."""

    variant: str
    kernel: KERNEL_TYPES
    pointers: dict
    constexprs: dict
    floats: tuple = ()
    num_warps: int = 4
    num_stages: int = 3
    # Architectures whose PTX must use tensor cores (a 16-row tile cannot use sm_90's wgmma, for example).
    tensor_cores: tuple = field(default=(80, 90))

    def signature(self) -> dict:
        """Triton's signature: pointers as given, listed floats fp32, constexprs, other scalars i32."""
        types = {}
        for name in self.kernel.arg_names:
            if name in self.constexprs:
                types[name] = "constexpr"
            elif name in self.pointers:
                types[name] = self.pointers[name]
            else:
                types[name] = "fp32" if name in self.floats else "i32"
        return types


def constexpr_names(kernel) -> set:
    """Names of the kernel's tl.constexpr parameters, read from its Python signature."""
    parameters = inspect.signature(kernel.fn).parameters.values()
    return {p.name for p in parameters if p.annotation is tl.constexpr or "constexpr" in str(p.annotation)}


def kernel_modules():
    """Every module of mrgfast.ops.backends.triton (each may define aot_specs())."""
    package = importlib.import_module("mrgfast.ops.backends.triton")
    names = [info.name for info in pkgutil.iter_modules(package.__path__) if info.name != "aot"]
    return [importlib.import_module(f"mrgfast.ops.backends.triton.{name}") for name in sorted(names)]


def collect_specs():
    """All specs, and the names of `*_kernel` JIT functions that no spec compiles."""
    specs, kernels = [], {}
    for module in kernel_modules():
        for name, value in vars(module).items():
            if isinstance(value, KERNEL_TYPES) and name.endswith("_kernel") and value.fn.__module__ == module.__name__:
                kernels[name] = value
        specs.extend(getattr(module, "aot_specs", lambda: [])())
    covered = {spec.kernel.fn.__name__ for spec in specs}
    return specs, sorted(set(kernels) - covered)


def compile_spec(spec: AotSpec, arch: int):
    """Compile one spec for sm_<arch>; return the compiled kernel."""
    source = ASTSource(fn=spec.kernel, signature=spec.signature(), constexprs=spec.constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def check_one(job):
    """Compile spec number `index` for `arch` in a worker; return (shared bytes, problems, seconds)."""
    index, arch = job
    spec = collect_specs()[0][index]
    start = time.perf_counter()
    try:
        compiled = compile_spec(spec, arch)
    except Exception as error:  # noqa: BLE001 - every compiler error is reported and fails the run
        message = str(error).strip().splitlines()
        return None, [f"compile error: {type(error).__name__}: {message[0] if message else ''}"], 0.0
    problems = []
    shared = compiled.metadata.shared
    if shared > MAX_SHARED_BYTES[arch]:
        problems.append(f"needs {shared} B of shared memory, sm_{arch} allows {MAX_SHARED_BYTES[arch]}")
    instruction = TENSOR_CORE_INSTRUCTION[arch]
    if arch in spec.tensor_cores and instruction not in compiled.asm["ptx"]:
        problems.append(f"no {instruction} in the PTX: the tensor-core path was missed")
    return shared, problems, time.perf_counter() - start


def main(argv=None) -> int:
    """Compile every spec for every requested architecture; return 1 on any failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(MAX_SHARED_BYTES))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET: ahead-of-time compilation needs the real compiler", file=sys.stderr)
        return 1
    specs, uncovered = collect_specs()
    failures = [f"{name}: no aot_specs() entry compiles this kernel" for name in uncovered]
    jobs = [(index, arch) for index in range(len(specs)) for arch in args.arch]
    print(f"{'kernel':<24} {'variant':<24} {'arch':>5} {'smem B':>7} {'s':>5}  problems")
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for (index, arch), (shared, problems, seconds) in zip(jobs, pool.map(check_one, jobs)):
            spec = specs[index]
            name = spec.kernel.fn.__name__
            print(f"{name:<24} {spec.variant:<24} sm_{arch} {shared if shared is not None else '-':>7} "
                  f"{seconds:>5.1f}  {'; '.join(problems) or 'ok'}")
            failures += [f"{name} {spec.variant} sm_{arch}: {problem}" for problem in problems]
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"aot: {len(jobs)} compilations with Triton {triton.__version__}, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
