"""Benchmark: LoRA linear forward+backward, mrgfast vs PEFT's lora.Linear and the frozen nn.Linear floor."""

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
FULL = dict(tokens=2048, in_features=4096, out_features=4096, r=16, warmup=1, repeats=11)
QUICK = dict(tokens=512, in_features=1024, out_features=1024, r=16, warmup=3, repeats=31)
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


def build_peft(base: nn.Linear, r: int, dropout_p: float, adapter: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    """PEFT's lora.Linear around `base` (frozen, shared), built the way users build it, adapter set to `adapter`."""
    config = LoraConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=dropout_p, target_modules=["proj"])
    layer = get_peft_model(OneLinear(base), config).base_model.model.proj
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


def build_layers(shape: dict, device: torch.device, dtype: torch.dtype) -> Layers:
    """Frozen base, PEFT layers without and with dropout, and mrgfast adapter leaves with PEFT's values."""
    torch.manual_seed(0)
    n_in, n_out, r = shape["in_features"], shape["out_features"], shape["r"]
    base = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    adapter = random_adapter(r, n_in, n_out, dtype, device)
    peft = {p: build_peft(base, r, p, adapter) for p in (0.0, DROPOUT_P)}
    # Own leaves with PEFT's values and dtype (PEFT may keep adapters in fp32 beside a bf16 base).
    mrg_a = peft[0.0].lora_A["default"].weight.detach().clone().requires_grad_(True)
    mrg_b = peft[0.0].lora_B["default"].weight.detach().clone().requires_grad_(True)
    x = torch.randn(shape["tokens"], n_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(shape["tokens"], n_out, device=device, dtype=dtype)
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


def measure(layers: Layers, shape: dict, device: torch.device) -> dict[str, dict]:
    """Floor / PEFT / mrgfast time and memory, without dropout and with PeFoMed's dropout."""
    results = {}
    x, g = layers.x, layers.g
    for case, p in (("no_dropout", 0.0), (f"dropout_{DROPOUT_P}", DROPOUT_P)):
        fns = {"floor": training_step(layers.base, x, g), "peft": training_step(layers.peft[p], x, g),
               "mrgfast": training_step(layers.mrgfast(p), x, g)}
        reset = clear_grads([x, layers.mrg_a, layers.mrg_b] + layers.peft_params(p))
        result = harness.measure_case(fns, device, shape["warmup"], shape["repeats"], baseline="peft",
                                      candidate="mrgfast", reset=reset)
        floor_ms = result["variants"]["floor"]["median_ms"]
        result["lora_over_frozen"] = result["variants"]["mrgfast"]["median_ms"] / floor_ms
        result["peft_over_frozen"] = result["variants"]["peft"]["median_ms"] / floor_ms
        results[case] = result
    return results


def main() -> None:
    """Check mrgfast against PEFT, then time and memory-profile floor / PEFT / mrgfast in both dropout cases."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL)
    shape, device, dtype = run.shape, run.device, run.dtype
    layers = build_layers(shape, device, dtype)
    backend = select_backend("lora_linear", layers.x, IMPLEMENTED)
    check_agreement(layers, backend, dtype)
    results = measure(layers, shape, device)
    run.report({**{k: shape[k] for k in ("tokens", "in_features", "out_features", "r", "warmup", "repeats")},
                "lora_alpha": LORA_ALPHA, "scaling": layers.scaling, "bias": False, "dropout_p": DROPOUT_P,
                "training": True, "adapter_dtype": str(layers.mrg_a.dtype).split(".")[-1], "mrgfast_backend": backend,
                "step": "y = layer(x); y.backward(g); x requires grad, base weight frozen",
                "headline": "least favourable case: lowest PEFT/mrgfast time, highest mrgfast/PEFT peak memory"},
               results)


if __name__ == "__main__":
    main()
