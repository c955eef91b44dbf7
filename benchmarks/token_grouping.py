"""Benchmark: visual-token grouping, forward+backward. The projector (LayerNorm -> group -> Linear) as eager
torch modules vs mrgfast's GroupedProjection, with x frozen (PeFoMed) and trainable; and the plain 2d
group_tokens op (torch pad + permute copy vs mrgfast's kernel)."""

import contextlib
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from torch import nn

from benchmarks import harness
from mrgfast.ops.backend import ENV_VAR, select_backend
from mrgfast.layers.grouped_projection import GroupedProjection
from mrgfast.ops.backends.native.extension import cuda_kernels_built
from mrgfast.ops.group_tokens import IMPLEMENTED, group_layout, group_tokens, reference_group_tokens

NAME = "token_grouping"
# Projector cases: (batch, tokens, dim, out, group, mode, grid). PeFoMed: EVA-g 1024 x 1408 -> 256 x 4096.
# Qwen2-VL: ln_q(1280) -> 2x2 merge of a 32 x 32 grid -> the merger's first Linear(5120, 5120).
FULL = dict(projector={"pefomed_1d": (2, 1024, 1408, 4096, 4, "1d", None),
                       "qwen2vl_2d": (2, 1024, 1280, 5120, 4, "2d", (32, 32))},
            grouping={"group_2d": (4, 1024, 1408, (32, 32), False), "group_2d_pad": (4, 33 * 33, 1408, (33, 33), True)},
            warmup=1, repeats=7)
QUICK = dict(projector={"small_1d": (2, 256, 256, 512, 4, "1d", None),
                        "small_2d": (2, 256, 256, 512, 4, "2d", (16, 16))},
             grouping={"group_2d": (2, 256, 256, (16, 16), False), "group_2d_pad": (2, 15 * 15, 256, (15, 15), True)},
             warmup=2, repeats=9)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |diff| relative to max |expected|


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


def relative_error(got, want) -> float:
    """max |got - want| / max |want| in fp32."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def outputs_and_grads(fn, x, g, params):
    """fn(x), then the gradients of x (if it requires one) and params after backward with g."""
    for t in [x, *params]:
        t.grad = None
    y = fn(x)
    y.backward(g)
    return [y.detach().clone()] + [t.grad.clone() for t in [x, *params] if t.requires_grad]


def check(label, fns, x, g, params_of, dtype):
    """Every variant against the first: output and every gradient; exit non-zero on a mismatch."""
    names = list(fns)
    want = outputs_and_grads(fns[names[0]], x, g, params_of[names[0]])
    for name in names[1:]:
        got = outputs_and_grads(fns[name], x, g, params_of[name])
        for i, (a, b) in enumerate(zip(got, want)):
            error = relative_error(a, b)
            if not error <= TOLERANCE[dtype]:
                raise SystemExit(f"{NAME}: {label}: {name} tensor {i} differs from {names[0]}: {error:.3e}")


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


def step(fn, x, g):
    """One training step: forward, backward with the fixed g."""
    return lambda: fn(x).backward(g)


def gpu_variants(make):
    """On GPU: the auto backend (Triton) and, when built, the CUDA-kernel backend as a second variant."""
    variants = {"mrgfast": make(None)}
    if torch.cuda.is_available() and cuda_kernels_built():
        variants["mrgfast_cuda"] = make("cuda")
    return variants


def projector_cases(shapes, device, dtype, warmup, repeats):
    """Eager vs GroupedProjection, x frozen (PeFoMed: ViT and ln_vision frozen) and x + norm trainable."""
    results = {}
    for case, (batch, tokens, dim, out, group, mode, grid) in shapes.items():
        torch.manual_seed(0)
        mine = GroupedProjection(dim, out, group, mode=mode, grid=grid, device=device, dtype=dtype)
        with torch.no_grad():
            mine.norm.weight.normal_(1.0, 0.1)
            mine.norm.bias.normal_(0.0, 0.1)
        eager = EagerProjector(mine, grid)
        x = torch.randn(batch, tokens, dim, device=device, dtype=dtype)
        g = torch.randn(batch, -(-tokens // group), out, device=device, dtype=dtype)
        for train_x in (False, True):
            x.requires_grad_(train_x)
            for module in (mine, eager):
                module.norm.requires_grad_(train_x)

            def run(backend):
                def fn(inp):
                    with forced_backend(backend):
                        return mine(inp)
                return fn

            fns = {"eager": eager, **gpu_variants(run)}
            params_of = {name: [p for p in (eager if name == "eager" else mine).parameters() if p.requires_grad]
                         for name in fns}
            label = f"{case}_{'train_x' if train_x else 'frozen_x'}"
            check(label, fns, x, g, params_of, dtype)
            grads = [x, *mine.parameters(), *eager.parameters()]
            reset = lambda: [setattr(t, "grad", None) for t in grads]  # noqa: E731
            results[label] = harness.measure_case({n: step(f, x, g) for n, f in fns.items()}, device, warmup,
                                                  repeats, baseline="eager", candidate="mrgfast", reset=reset)
            results[label]["shape"] = dict(batch=batch, tokens=tokens, dim=dim, out=out, group=group, mode=mode,
                                           grid=grid, train_x=train_x)
            every_param = [*mine.parameters(), *eager.parameters()]
            results[label]["saved_activation_MiB"] = {
                name: saved_activation_bytes(fn, x, every_param) / harness.MIB for name, fn in fns.items()}
    return results


def grouping_cases(shapes, device, dtype, warmup, repeats):
    """The plain op, forward + backward with x requiring grad: torch pad + permute copy vs mrgfast's kernel."""
    results = {}
    for case, (batch, tokens, dim, grid, pad) in shapes.items():
        x = torch.randn(batch, tokens, dim, device=device, dtype=dtype, requires_grad=True)
        layout = group_layout(x.shape, 4, "2d", grid, pad)
        g = torch.randn(batch, layout.groups, 4 * dim, device=device, dtype=dtype)

        def run(backend):
            def fn(inp):
                with forced_backend(backend):
                    return group_tokens(inp, 4, "2d", grid, pad)
            return fn

        fns = {"torch": lambda inp: reference_group_tokens(inp, layout), **gpu_variants(run)}
        check(case, fns, x, g, {name: [] for name in fns}, dtype)
        results[case] = harness.measure_case({n: step(f, x, g) for n, f in fns.items()}, device, warmup, repeats,
                                             baseline="torch", candidate="mrgfast",
                                             reset=lambda: setattr(x, "grad", None))
        results[case]["shape"] = dict(batch=batch, tokens=tokens, dim=dim, grid=grid, pad=pad)
    return results


def main() -> None:
    """Check every variant against the eager one, then time and memory-profile them."""
    args = harness.parse_args(NAME, __doc__)
    run = harness.start_run()
    config = QUICK if args.quick else FULL
    device = harness.default_device()
    dtype = harness.compute_dtype(device)
    probe = torch.empty(1, device=device)
    results = projector_cases(config["projector"], device, dtype, config["warmup"], config["repeats"])
    results.update(grouping_cases(config["grouping"], device, dtype, config["warmup"], config["repeats"]))
    report_config = {
        "mode": "quick" if args.quick else "full", "device": device.type, "dtype": str(dtype).split(".")[-1],
        "warmup": config["warmup"], "repeats": config["repeats"],
        "mrgfast_backend": select_backend("group_tokens", probe, IMPLEMENTED),
        "step": "y = f(x); y.backward(g); projector weights trainable; *_frozen_x: x and the LayerNorm frozen "
                "(PeFoMed), *_train_x: both trainable; group_2d*: the plain op with x requiring grad",
        "headline": "least favourable case: lowest eager/mrgfast time, highest mrgfast/eager peak memory"}
    harness.write_report(NAME, report_config, results, args.out, run)


if __name__ == "__main__":
    main()
