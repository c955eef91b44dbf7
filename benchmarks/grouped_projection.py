"""Benchmark: the grouped projection (LayerNorm -> token grouping -> Linear) of PeFoMed and Qwen2-VL, forward +
backward: eager torch modules vs mrgfast's GroupedProjection, with x frozen (PeFoMed) and trainable."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from torch import nn

from benchmarks import harness
from benchmarks.variants import (
    backend_variants, check_variants, forced_backend, op_config, training_step, with_routing,
)
from mrgfast.layers.grouped_projection import GroupedProjection
from mrgfast.ops.group_tokens import group_layout, reference_group_tokens
from mrgfast.ops.grouped_projection import IMPLEMENTED

NAME = "grouped_projection"
# Cases: (batch, tokens, dim, out, group, mode, grid). PeFoMed: EVA-g 1024 x 1408 -> 256 x 4096.
# Qwen2-VL: ln_q(1280) -> 2x2 merge of a 32 x 32 grid -> the merger's first Linear(5120, 5120).
PEFOMED = (1024, 1408, 4096, 4, "1d", None)
QWEN2VL = (1024, 1280, 5120, 4, "2d", (32, 32))
# The GPU sweep: images per step, the training size (16) first, so that a run its deadline cuts short keeps it.
IMAGES = (16, 8, 4, 2, 1)


def sweep(shapes: dict, images) -> dict:
    """{"<name>_<n>img": (n, *shape)} for every image count n (outer) and shape (inner)."""
    return {f"{name}_{n}img": (n, *shape) for n in images for name, shape in shapes.items()}


FULL = dict(cases={"pefomed_1d": (2, *PEFOMED), "qwen2vl_2d": (2, *QWEN2VL)}, warmup=1, repeats=7, deadline_s=None)
# deadline_s: no case after the first starts past it (seconds since the run opened), inside the GPU suite's 20 s box
# (gpu_suite/parts.py) less the process's start-up; the rest of the sweep is listed as not measured.
GPU = dict(cases=sweep({"pefomed_1d": PEFOMED, "qwen2vl_2d": QWEN2VL}, IMAGES), warmup=5, repeats=20, deadline_s=12)
QUICK = dict(cases=sweep({"small_1d": (256, 256, 512, 4, "1d", None), "small_2d": (256, 256, 512, 4, "2d", (16, 16))},
                         (8, 2, 1)), warmup=2, repeats=9, deadline_s=None)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |diff| relative to max |expected|
STEP = ("y = f(x); y.backward(g); projector weights trainable; *_frozen_x: x and the LayerNorm frozen (PeFoMed), "
        "*_train_x: both trainable; mrgfast = auto (the routing table's choice), triton / cuda / cpu = that kernel "
        "forced (their ratios under each case's 'kernels')")
HEADLINE = "least favourable case: lowest eager/mrgfast (auto) time, highest mrgfast/eager peak memory"


class EagerProjector(nn.Module):
    """What PeFoMed / Qwen2-VL run: nn.LayerNorm, the view / permute grouping, nn.Linear, under autograd."""

    def __init__(self, mine: GroupedProjection, grid):
        super().__init__()
        self.norm = nn.LayerNorm(mine.in_dim, eps=mine.eps, device=mine.proj.weight.device,
                                 dtype=mine.proj.weight.dtype)
        self.proj = nn.Linear(mine.proj.in_features, mine.out_dim, device=mine.proj.weight.device,
                              dtype=mine.proj.weight.dtype)
        self.load_state_dict(mine.state_dict())
        self.group, self.mode, self.grid = mine.group, mine.mode, grid

    def forward(self, x):
        """LayerNorm -> group -> Linear."""
        h = self.norm(x)
        if self.mode == "1d":
            grouped = h.view(h.shape[0], h.shape[1] // self.group, h.shape[2] * self.group)  # PeFoMed's code
        else:
            grouped = reference_group_tokens(h, group_layout(h.shape, self.group, self.mode, self.grid))
        return self.proj(grouped)


def saved_activation_bytes(fn, x, params) -> int:
    """Bytes autograd keeps alive from fn(x)'s forward until backward, beyond x and the parameters themselves:
    what sits in memory while the LLM runs between the projector's forward and its backward."""
    owned = {t.untyped_storage().data_ptr() for t in [x, *params]}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


def measure_projector(run: harness.Run, case: str, batch, tokens, dim, out, group, mode, grid) -> dict:
    """One case, eager vs GroupedProjection, with x frozen (PeFoMed: ViT and ln_vision frozen) and x + norm trained."""
    device, dtype, warmup, repeats = run.device, run.dtype, run.shape["warmup"], run.shape["repeats"]
    torch.manual_seed(0)
    mine = GroupedProjection(dim, out, group, mode=mode, grid=grid, device=device, dtype=dtype)
    with torch.no_grad():
        mine.norm.weight.normal_(1.0, 0.1)
        mine.norm.bias.normal_(0.0, 0.1)
    eager = EagerProjector(mine, grid)
    x = torch.randn(batch, tokens, dim, device=device, dtype=dtype)
    g = torch.randn(batch, -(-tokens // group), out, device=device, dtype=dtype)

    def forced(backend):
        def fn(inp):
            with forced_backend(backend):
                return mine(inp)
        return fn

    results = {}
    for train_x in (False, True):
        x.requires_grad_(train_x)
        for module in (mine, eager):
            module.norm.requires_grad_(train_x)
        fns = {"eager": eager, **backend_variants(forced, IMPLEMENTED, device)}
        params_of = {name: [p for p in (eager if name == "eager" else mine).parameters() if p.requires_grad]
                     for name in fns}
        label = f"{case}_{'train_x' if train_x else 'frozen_x'}"
        check_variants(NAME, label, fns, x, g, params_of, TOLERANCE[dtype])
        grads = [x, *mine.parameters(), *eager.parameters()]
        reset = lambda: [setattr(t, "grad", None) for t in grads]  # noqa: E731
        measured = harness.measure_case({n: training_step(f, x, g) for n, f in fns.items()}, device, warmup,
                                        repeats, baseline="eager", candidate="mrgfast", reset=reset)
        results[label] = with_routing(measured, NAME, f"{mode}_{'train_x' if train_x else 'frozen_x'}", x.numel(),
                                      IMPLEMENTED, device)
        results[label]["shape"] = dict(batch=batch, tokens=tokens, dim=dim, out=out, group=group, mode=mode,
                                       grid=grid, train_x=train_x)
        every_param = [*mine.parameters(), *eager.parameters()]
        results[label]["saved_activation_MiB"] = {
            name: saved_activation_bytes(fn, x, every_param) / harness.MIB for name, fn in fns.items()}
    return results


def main() -> None:
    """Check every variant against the eager one, then time and memory-profile them, case by case (until the
    deadline), writing the report after each."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL, GPU)
    config = op_config(run, NAME, IMPLEMENTED, STEP, HEADLINE)
    run.sweep(config, [(case, lambda case=case, shape=shape: measure_projector(run, case, *shape))
                       for case, shape in run.shape["cases"].items()])


if __name__ == "__main__":
    main()
