"""Where `auto` runs an op's kernel and where its torch path: the measured crossover table (benchmarks/README.md).

A kernel runs under `auto` only where a benchmark measured it faster than eager (forward + backward), from the
smallest measured size at which it won and kept winning at every larger measured size; everywhere else, and in every
case no run has measured, `auto` runs the op's torch path (its reference composite, differentiated by autograd).
Sizes are elements: of x for the grouping ops, of the [B, L, D] prompts for affine_prompt. `python -m
benchmarks.crossover <suite folder or reports>` prints this table from a GPU suite run's JSONs.
"""

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

log = logging.getLogger(__name__)

REFERENCE = "reference"
# Every case of every routed op: what the benchmarks measure and what each op's routing_case() returns.
CASES = {
    "grouped_projection": ("1d_frozen_x", "1d_train_x", "2d_frozen_x", "2d_train_x"),
    "group_tokens": ("1d_pad", "2d", "2d_pad"),
    "affine_prompt": ("prompt_new", "prompt_out", "book_new", "book_out"),
}
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class Route:
    """A case's measured winner: `backend`'s kernel beat eager at `from_size` elements and every larger one measured."""

    backend: str
    from_size: int


# (device type, op, case) -> Route, or None: no kernel measured faster than eager there, so auto runs the torch path.
TABLE: dict[tuple[str, str, str], Optional[Route]] = {
    # H200, 2026-12-04 (shared/gpu-runs/2026-12-04/token_grouping.json, bf16, B=2; eager/kernel speed): the fused
    # LayerNorm + grouping + projection lost in every case, Triton and CUDA alike: 1d 0.46 / 0.61 (frozen / trainable
    # x), 2d 0.66 / 0.68; CUDA backend 0.59-0.86.
    ("cuda", "grouped_projection", "1d_frozen_x"): None,
    ("cuda", "grouped_projection", "1d_train_x"): None,
    ("cuda", "grouped_projection", "2d_frozen_x"): None,
    ("cuda", "grouped_projection", "2d_train_x"): None,
    # Same run, group_2d (B=4, 32x32x1408): Triton 1.03 (CUDA 0.96), a tie within that run's spread (min torch 0.30 ms
    # < min Triton 0.37 ms), against a torch path that also copied x through a zero-width F.pad (that copy is the
    # whole 0.67x memory figure: 34.6 vs 23.1 MB = one 11.5 MB copy of x). The torch path no longer makes it, so
    # nothing shows the kernel beating it: torch. group_2d_pad (B=4, 33x33x1408 = 6,133,248 elements, where the
    # torch path must pad): Triton 0.88, the CUDA kernel 1.14 (0.509 vs 0.578 ms): the CUDA kernel, from that size.
    # 1d with padding: not measured.
    ("cuda", "group_tokens", "1d_pad"): None,
    ("cuda", "group_tokens", "2d"): None,
    ("cuda", "group_tokens", "2d_pad"): Route("cuda", 6_133_248),
    # Same day, affine_prompt.json (D=4096, [B, D] gamma, Triton): prompt-wise (K=1) lost, op alone 0.72 / 0.74
    # (B16 L32 / B8 L64), in place in the sequence 0.86 / 0.90; a bank of K=8 won, op alone 1.066 / 1.068, in place
    # 1.056 / 1.167, both at 16 x 32 x 4096 = 8 x 64 x 4096 = 2,097,152 elements (the smallest and only size run).
    ("cuda", "affine_prompt", "prompt_new"): None,
    ("cuda", "affine_prompt", "prompt_out"): None,
    ("cuda", "affine_prompt", "book_new"): Route("triton", 2_097_152),
    ("cuda", "affine_prompt", "book_out"): Route("triton", 2_097_152),
    # The 2-core CPU machine (Intel Xeon KVM guest), 2026-12-04, fp32, 1 thread (OMP_NUM_THREADS=1), the benchmarks'
    # quick sweeps (repeats 15) and full shapes, printed by `python -m benchmarks.crossover`: other helpers' jobs used
    # 71-85% of the cores meanwhile (others_cpu_share), so ratios within ~10% of 1 are noise. The projector is
    # GEMM-bound (kernel and eager share the GEMMs); the C++ grouping copy lost to the torch path's single permute copy
    # where no padding is needed (2d), and won where torch must pad.
    # cpu affine_prompt book_new: 4,096: cpu 1.18; 16,384: cpu 1.05; 65,536: cpu 1.16; 2,097,152: cpu 1.28; 2,097,152:
    #   cpu 1.17
    # cpu affine_prompt book_out: 4,096: cpu 1.20; 16,384: cpu 1.24; 65,536: cpu 1.71; 2,097,152: cpu 2.22; 2,097,152:
    #   cpu 2.83
    # cpu affine_prompt prompt_new: 4,096: cpu 0.69; 16,384: cpu 0.68; 65,536: cpu 0.80; 2,097,152: cpu 1.80;
    #   2,097,152: cpu 3.89
    # cpu affine_prompt prompt_out: 4,096: cpu 0.86; 16,384: cpu 1.01; 65,536: cpu 2.90; 2,097,152: cpu 1.74;
    #   2,097,152: cpu 2.52
    # cpu group_tokens 1d_pad: 65,792: cpu 0.74; 131,584: cpu 0.81; 526,336: cpu 1.16; 5,772,800: cpu 1.11
    # cpu group_tokens 2d: 65,536: cpu 0.70; 131,072: cpu 0.70; 524,288: cpu 0.73; 5,767,168: cpu 0.99
    # cpu group_tokens 2d_pad: 57,600: cpu 1.07; 115,200: cpu 1.14; 460,800: cpu 1.79; 6,133,248: cpu 2.42
    # cpu grouped_projection 1d_frozen_x: 65,536: cpu 2.04; 131,072: cpu 0.80; 524,288: cpu 0.92; 2,883,584: cpu 1.29
    # cpu grouped_projection 1d_train_x: 65,536: cpu 0.92; 131,072: cpu 0.95; 524,288: cpu 1.03; 2,883,584: cpu 0.96
    # cpu grouped_projection 2d_frozen_x: 65,536: cpu 0.14; 131,072: cpu 1.02; 524,288: cpu 1.11; 2,621,440: cpu 1.01
    # cpu grouped_projection 2d_train_x: 65,536: cpu 1.04; 131,072: cpu 1.01; 524,288: cpu 1.06; 2,621,440: cpu 1.02
    ('cpu', 'grouped_projection', '1d_frozen_x'): Route('cpu', 2_883_584),
    ('cpu', 'grouped_projection', '1d_train_x'): None,
    ('cpu', 'grouped_projection', '2d_frozen_x'): Route('cpu', 131_072),
    ('cpu', 'grouped_projection', '2d_train_x'): Route('cpu', 65_536),
    ('cpu', 'group_tokens', '1d_pad'): Route('cpu', 526_336),
    ('cpu', 'group_tokens', '2d'): None,
    ('cpu', 'group_tokens', '2d_pad'): Route('cpu', 57_600),
    ('cpu', 'affine_prompt', 'prompt_new'): Route('cpu', 2_097_152),
    ('cpu', 'affine_prompt', 'prompt_out'): Route('cpu', 16_384),
    ('cpu', 'affine_prompt', 'book_new'): Route('cpu', 4_096),
    ('cpu', 'affine_prompt', 'book_out'): Route('cpu', 4_096),
}

_logged: set = set()


def routed(op: str) -> bool:
    """Whether `auto` consults this table for `op`."""
    return op in CASES


def check_case(op: str, case: str) -> None:
    """Raise ValueError unless `case` is one of `op`'s routing cases."""
    if case not in CASES.get(op, ()):
        raise ValueError(f"routing: {op!r} has no case {case!r}; expected one of {', '.join(CASES.get(op, ()))}")


def decide(op: str, case: str, device: str, size: int, available: Iterable[str]) -> tuple[str, str]:
    """(backend, why) that `auto` runs for `op`'s `case` at `size` elements on a `device`-type tensor, given the
    kernels `available` there; "reference" (the torch path) unless the table says a kernel won at this size."""
    check_case(op, case)
    if (device, op, case) not in TABLE:
        return REFERENCE, f"no measurement on {device}"
    route = TABLE[(device, op, case)]
    if route is None:
        return REFERENCE, f"no kernel measured faster than eager on {device}"
    if size < route.from_size:
        return REFERENCE, f"{route.backend} wins from {route.from_size:,} elements, this call has {size:,}"
    if route.backend not in set(available):
        return REFERENCE, f"{route.backend} won here but is not available (not built or not installed)"
    return route.backend, f"measured faster than eager from {route.from_size:,} elements, this call has {size:,}"


def auto_backend(op: str, case: str, device: str, size: int, available: Iterable[str]) -> str:
    """decide()'s backend, logged (logging.info) the first time each (op, case, device, backend) is chosen."""
    backend, why = decide(op, case, device, size, available)
    key = (op, case, device, backend)
    if key not in _logged:
        _logged.add(key)
        path = "the torch path" if backend == REFERENCE else f"the {backend} kernel"
        log.info("mrgfast auto: %s [%s] on %s runs %s: %s", op, case, device, path, why)
    return backend


def table_lines(table: dict) -> list[str]:
    """`table` as the Python entries of TABLE (device, op, case order of CASES), for pasting into this module."""
    lines = []
    for device in DEVICES:
        for op, cases in CASES.items():
            for case in cases:
                if (device, op, case) not in table:
                    continue
                route = table[(device, op, case)]
                value = "None" if route is None else f"Route({route.backend!r}, {route.from_size:_})"
                lines.append(f"    ({device!r}, {op!r}, {case!r}): {value},")
    return lines
