"""LoRALinear: a frozen nn.Linear plus a trainable low-rank update, computed by the fused lora_linear op."""

import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from mrgfast.ops.lora_linear import lora_linear

HALF_DTYPES = (torch.float16, torch.bfloat16)


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def check_lora_hparams(r, lora_alpha, lora_dropout) -> None:
    """Raise ValueError naming the LoRA hyper-parameter that is out of range."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int (the LoRA rank), got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) \
            or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) \
            or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be a probability in [0, 1), got {lora_dropout!r}")


class LoRALinear(nn.Module):
    """A frozen nn.Linear with PEFT-compatible LoRA adapters: y = x W^T + b + scaling * drop(x) A^T B^T."""

    def __init__(self, base: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, adapter_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        check_lora_hparams(r, lora_alpha, lora_dropout)
        # The base's own Parameters are re-registered (not copied, not wrapped in a submodule) so the
        # parent model's state-dict keys for them stay `<path>.weight` / `<path>.bias`.
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.merged = False
        self._disable_adapters = False
        # Built on the default device in fp32 and initialised in the same order as PEFT (nn.Linear's own
        # init of A then B, then A re-drawn, B zeroed), so the same seed gives PEFT's exact A.
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        self.reset_lora_parameters()
        if adapter_dtype is None:
            # PEFT's autocast_adapter_dtype: half-precision bases get fp32 adapters (stable optimizer state).
            adapter_dtype = torch.float32 if self.weight.dtype in HALF_DTYPES else self.weight.dtype
        self.lora_A.to(device=self.weight.device, dtype=adapter_dtype)
        self.lora_B.to(device=self.weight.device, dtype=adapter_dtype)

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform(a=sqrt(5)), B zeros, so the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def disable_adapters(self) -> bool:
        """Whether the adapter is switched off (forward computes the base layer only)."""
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the adapter on or off; a merged adapter is unmerged on the next disabled forward, as in PEFT."""
        self._disable_adapters = not enabled

    def delta_weight(self) -> Tensor:
        """scaling * B @ A in fp32, the update that merge() adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (W += scaling * B @ A, summed in fp32); forward is then base-only."""
        if self.merged:
            warnings.warn("LoRALinear.merge: the adapter is already merged, nothing to do.", stacklevel=2)
            return
        # copy_ keeps the Parameter's storage, so optimizers and tied references still see the same tensor.
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapter back out of the base weight (exact up to rounding of the base dtype)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge: the adapter is not merged, nothing to do.", stacklevel=2)
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        """Base linear plus the LoRA update; base only when the adapter is merged or disabled."""
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return nn.functional.linear(x, self.weight, self.bias)
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training)

    def extra_repr(self) -> str:
        """Sizes and LoRA settings shown by print(model)."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}")
