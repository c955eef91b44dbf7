"""Benchmark: LoRA linear forward+backward, mrgfast vs PEFT's lora.Linear and the frozen nn.Linear floor.

Each layer of the preset's `layers` (in, out, r, adapters) runs without and with dropout. On CUDA the Triton backend's
ablations run beside its default split design: `mrgfast_fused` (MRGFAST_LORA_KERNEL=fused) and `mrgfast_base_first`
(MRGFAST_LORA_ORDER=base_first). `adapters` is "peft" (the dtype PEFT keeps them in: fp32 beside a bf16 base) or
"base" (the base's dtype, PEFT's autocast_adapter_dtype=False).
"""

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from benchmarks import harness
from benchmarks.variants import relative_error, training_step
from mrgfast.ops import lora_linear, reference_lora_linear
from mrgfast.ops.backend import select_backend
from mrgfast.ops.dropout import torch_keep_mask
from mrgfast.ops.lora_linear import IMPLEMENTED

NAME = "lora_linear"
FULL = dict(tokens=2048, layers=[(4096, 4096, 16, "peft")], warmup=1, repeats=11, ablated_layers=None)
QUICK = dict(tokens=512, layers=[(1024, 1024, 16, "peft")], warmup=3, repeats=31, ablated_layers=None)
# Issue 20's targets: 8192 tokens, 4096 x 4096 at r=16 and 64, in != out (Llama-7B's MLP), adapters in the base dtype.
# The ablations run on the first `ablated_layers` layers only (None: all): each compiles and tunes kernels of its own,
# and the GPU suite gives this benchmark 30 s.
GPU = dict(tokens=8192, layers=[(4096, 4096, 16, "peft"), (4096, 4096, 64, "peft"), (4096, 11008, 16, "peft"),
                                (11008, 4096, 16, "peft"), (4096, 4096, 16, "base")], warmup=5, repeats=30,
           ablated_layers=1)
# mrgfast / frozen nn.Linear targets on H100/H200 by (rank above 16, dropout): issue 20.
TARGET_OVER_FROZEN = {(False, False): 1.10, (True, False): 1.15, (False, True): 1.20, (True, True): 1.25}
ADAPTERS = ("peft", "base")
# The Triton backend's ablations: variant -> the environment it runs under.
ABLATIONS = {"mrgfast_fused": {"MRGFAST_LORA_KERNEL": "fused"},
             "mrgfast_base_first": {"MRGFAST_LORA_ORDER": "base_first"}}
LORA_ALPHA = 32
DROPOUT_P = 0.05  # PeFoMed's lora_dropout
CHECK_SEED = 1234
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |diff| relative to max |expected|


class OneLinear(nn.Module):
    """A module holding the single nn.Linear that PEFT wraps."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        """The wrapped linear."""
        return self.proj(x)


def build_peft(base: nn.Linear, r: int, dropout_p: float, adapter: tuple[torch.Tensor, torch.Tensor],
               adapters: str = "peft") -> nn.Module:
    """PEFT's lora.Linear around `base` (frozen, shared), built the way users build it, adapter set to `adapter`;
    adapters "base" keeps them in the base's dtype (autocast_adapter_dtype=False)."""
    config = LoraConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=dropout_p, target_modules=["proj"])
    layer = get_peft_model(OneLinear(base), config, autocast_adapter_dtype=adapters == "peft").base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(adapter[0])
        layer.lora_B["default"].weight.copy_(adapter[1])
    return layer.train()


def random_adapter(r: int, in_features: int, out_features: int, dtype, device):
    """Non-zero A [r, in] and B [out, r] (PEFT zeroes B at init, which would hide LoRA-path bugs)."""
    a = torch.randn(r, in_features, dtype=dtype, device=device) / in_features ** 0.5
    b = torch.randn(out_features, r, dtype=dtype, device=device) * 0.1 / r ** 0.5
    return a, b


def run_with_grads(forward, x, g, params) -> list[torch.Tensor]:
    """Output and the gradients of x and params after backward with grad g."""
    x.grad = None
    for p in params:
        p.grad = None
    y = forward(x)
    y.backward(g)
    return [y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in params]


def check_close(label: str, got: list[torch.Tensor], want: list[torch.Tensor], dtype) -> None:
    """Fail loudly when outputs or any gradient disagree."""
    for what, a, b in zip(("output", "grad x", "grad lora_A", "grad lora_B"), got, want):
        err = relative_error(a, b)
        if not err <= TOLERANCE[dtype]:
            raise SystemExit(f"{NAME}: {label}: {what} differs: relative error {err:.3e} > {TOLERANCE[dtype]:.0e}")


def keep_mask_for(backend: str):
    """The function that draws the dropout keep mask `backend` uses for a seed."""
    if backend == "triton":
        from mrgfast.ops.backends.triton.common import triton_keep_mask
        return triton_keep_mask
    return torch_keep_mask


def clear_grads(tensors: list[torch.Tensor]):
    """A reset that drops the gradients of `tensors`, so every step allocates its own."""
    def reset():
        for t in tensors:
            t.grad = None
    return reset


@dataclass
class Layers:
    """The three layers under test, sharing one frozen base weight, and the step's fixed inputs."""

    base: nn.Linear
    peft: dict[float, nn.Module]  # PEFT's lora.Linear per dropout p, all with the same adapter values
    mrg_a: torch.Tensor
    mrg_b: torch.Tensor
    scaling: float
    x: torch.Tensor
    g: torch.Tensor

    def mrgfast(self, p: float, seed=None):
        """mrgfast's LoRA linear in training mode as a function of x."""
        return lambda inp: lora_linear(inp, self.base.weight, None, self.mrg_a, self.mrg_b, self.scaling,
                                       dropout_p=p, training=True, seed=seed)

    def peft_params(self, p: float) -> list[torch.Tensor]:
        """PEFT's trainable adapter weights for dropout p."""
        return [self.peft[p].lora_A["default"].weight, self.peft[p].lora_B["default"].weight]


def build_layers(tokens: int, layer: tuple, device: torch.device, dtype: torch.dtype) -> Layers:
    """Frozen base, PEFT layers without and with dropout, and mrgfast adapter leaves with PEFT's values."""
    torch.manual_seed(0)
    n_in, n_out, r, adapters = layer
    base = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    adapter = random_adapter(r, n_in, n_out, dtype, device)
    peft = {p: build_peft(base, r, p, adapter, adapters) for p in (0.0, DROPOUT_P)}
    # Own leaves with PEFT's values and dtype (PEFT may keep adapters in fp32 beside a bf16 base).
    mrg_a = peft[0.0].lora_A["default"].weight.detach().clone().requires_grad_(True)
    mrg_b = peft[0.0].lora_B["default"].weight.detach().clone().requires_grad_(True)
    x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, n_out, device=device, dtype=dtype)
    return Layers(base, peft, mrg_a, mrg_b, peft[0.0].scaling["default"], x, g)


def check_agreement(layers: Layers, backend: str, dtype: torch.dtype) -> None:
    """Same weights, same numbers: without dropout against PEFT; with dropout against the reference fed
    the very mask mrgfast's backend draws for a fixed seed. Exits non-zero on any mismatch."""
    x, g, mine = layers.x, layers.g, [layers.mrg_a, layers.mrg_b]
    want = run_with_grads(layers.peft[0.0], x, g, layers.peft_params(0.0))
    check_close("mrgfast vs PEFT, no dropout", run_with_grads(layers.mrgfast(0.0), x, g, mine), want, dtype)
    dropout_layer = layers.peft[DROPOUT_P].eval()
    check_close("PEFT(dropout) in eval vs PEFT", run_with_grads(dropout_layer, x, g, layers.peft_params(DROPOUT_P)),
                want, dtype)
    dropout_layer.train()
    keep = keep_mask_for(backend)(x.shape[0], x.shape[1], DROPOUT_P, CHECK_SEED, x.device)
    reference = lambda inp: reference_lora_linear(inp, layers.base.weight, None, layers.mrg_a, layers.mrg_b,
                                                  layers.scaling, keep, DROPOUT_P)
    check_close("mrgfast vs reference, dropout", run_with_grads(layers.mrgfast(DROPOUT_P, CHECK_SEED), x, g, mine),
                run_with_grads(reference, x, g, mine), dtype)


@contextlib.contextmanager
def environment(settings: dict):
    """The environment variables of `settings` set inside the block, restored after."""
    old = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ablation_step(layers: Layers, p: float, settings: dict):
    """mrgfast's training step (forward and backward) under the ablation's environment."""
    step = training_step(layers.mrgfast(p), layers.x, layers.g)

    def run():
        with environment(settings):
            step()
    return run


def ablations(backend: str) -> dict:
    """The Triton backend's ablations (none on the CPU backend, which has one design)."""
    return ABLATIONS if backend == "triton" else {}


def check_ablations(layers: Layers, variants: dict, dtype: torch.dtype) -> None:
    """Each ablation in `variants` computes what the default design does, with and without dropout (same seed)."""
    x, g, mine = layers.x, layers.g, [layers.mrg_a, layers.mrg_b]
    for p in (0.0, DROPOUT_P):
        want = run_with_grads(layers.mrgfast(p, CHECK_SEED), x, g, mine)
        for name, settings in variants.items():
            with environment(settings):
                got = run_with_grads(layers.mrgfast(p, CHECK_SEED), x, g, mine)
            check_close(f"{name} vs mrgfast, dropout {p}", got, want, dtype)


def measure(layers: Layers, layer: tuple, variants: dict, shape: dict, device: torch.device) -> dict[str, dict]:
    """Floor / PEFT / mrgfast (and the ablations in `variants`) time and memory, without dropout and with PeFoMed's
    dropout."""
    results = {}
    x, g = layers.x, layers.g
    n_in, n_out, r, adapters = layer
    for case, p in (("no_dropout", 0.0), (f"dropout_{DROPOUT_P}", DROPOUT_P)):
        fns = {"floor": training_step(layers.base, x, g), "peft": training_step(layers.peft[p], x, g),
               "mrgfast": training_step(layers.mrgfast(p), x, g)}
        fns.update({name: ablation_step(layers, p, settings) for name, settings in variants.items()})
        reset = clear_grads([x, layers.mrg_a, layers.mrg_b] + layers.peft_params(p))
        result = harness.measure_case(fns, device, shape["warmup"], shape["repeats"], baseline="peft",
                                      candidate="mrgfast", reset=reset)
        times = {name: variant["median_ms"] for name, variant in result["variants"].items()}
        result["lora_over_frozen"] = times["mrgfast"] / times["floor"]
        result["mrgfast_over_peft"] = times["mrgfast"] / times["peft"]
        result["peft_over_frozen"] = times["peft"] / times["floor"]
        for name in variants:
            result[f"{name}_over_frozen"] = times[name] / times["floor"]
        result["target_lora_over_frozen"] = TARGET_OVER_FROZEN[r > 16, p > 0.0]
        result["layer"] = dict(in_features=n_in, out_features=n_out, r=r, adapters=adapters, dropout_p=p,
                               adapter_dtype=str(layers.mrg_a.dtype).split(".")[-1])
        results[f"{n_in}x{n_out}_r{r}_{adapters}_{case}"] = result
    return results


def check_layers(layers_field) -> list[tuple]:
    """The preset's `layers` as (in, out, r, adapters) tuples, or an error naming what is wrong."""
    checked = []
    for index, layer in enumerate(layers_field):
        if not (isinstance(layer, (tuple, list)) and len(layer) == 4 and all(isinstance(v, int) and v > 0
                                                                             for v in layer[:3])
                and layer[3] in ADAPTERS):
            raise SystemExit(f"{NAME}: layers[{index}] = {layer!r}: expected (in, out, r, adapters) with positive ints "
                             f"and adapters one of {', '.join(ADAPTERS)}")
        checked.append(tuple(layer))
    return checked


def main() -> None:
    """Check mrgfast against PEFT, then time and memory-profile floor / PEFT / mrgfast per layer and dropout case."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL, GPU)
    shape, device, dtype = run.shape, run.device, run.dtype
    results, adapter_dtypes = {}, {}
    layers_wanted = check_layers(shape["layers"])
    for index, layer in enumerate(layers_wanted):
        layers = build_layers(shape["tokens"], layer, device, dtype)
        backend = select_backend("lora_linear", layers.x, IMPLEMENTED)
        check_agreement(layers, backend, dtype)
        ablated = shape["ablated_layers"]
        variants = ablations(backend) if ablated is None or index < ablated else {}
        check_ablations(layers, variants, dtype)
        results.update(measure(layers, layer, variants, shape, device))
        adapter_dtypes[layer[3]] = str(layers.mrg_a.dtype).split(".")[-1]
        del layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # After every layer: a run its time box cuts short still reports the layers it measured.
        run.report({"tokens": shape["tokens"], "layers": [list(v) for v in layers_wanted[:index + 1]],
                    "layers_wanted": len(layers_wanted), "warmup": shape["warmup"], "repeats": shape["repeats"],
                    "lora_alpha": LORA_ALPHA, "bias": False, "dropout_p": DROPOUT_P, "training": True,
                    "adapter_dtypes": adapter_dtypes, "mrgfast_backend": backend, "ablations": list(ablations(backend)),
                    "ablated_layers": shape["ablated_layers"],
                    "step": "y = layer(x); y.backward(g); x requires grad, base weight frozen",
                    "headline": "least favourable case: lowest PEFT/mrgfast time, highest mrgfast/PEFT peak memory"},
                   results)


if __name__ == "__main__":
    main()
