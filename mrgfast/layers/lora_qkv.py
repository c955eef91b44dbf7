"""LoRAQKV: q, k and v LoRA projections that share an input, computed by one fused kernel pass."""

import torch
from torch import Tensor, nn

from mrgfast.layers.lora_linear import LoRALinear
from mrgfast.ops.lora_qkv import lora_qkv_linear


def check_fusable(projections) -> None:
    """Raise ValueError unless the projections can share one input, one base buffer and one dropout."""
    if len(projections) < 2 or not all(isinstance(p, LoRALinear) for p in projections):
        raise ValueError(f"LoRAQKV fuses two or more LoRALinear modules, got {[type(p).__name__ for p in projections]}")
    first = projections[0]
    for index, p in enumerate(projections[1:], start=1):
        if p.in_features != first.in_features:
            raise ValueError(f"projection {index} reads {p.in_features} features, projection 0 reads {first.in_features}")
        if (p.weight.dtype, p.weight.device) != (first.weight.dtype, first.weight.device):
            raise ValueError(f"projection {index} is {p.weight.dtype} on {p.weight.device}, projection 0 is "
                             f"{first.weight.dtype} on {first.weight.device}")
        if p.lora_dropout != first.lora_dropout:
            raise ValueError(f"fused projections share one dropout mask: lora_dropout {p.lora_dropout} "
                             f"(projection {index}) != {first.lora_dropout} (projection 0)")
        if (p.bias is None) != (first.bias is None):
            raise ValueError("fused projections must all have a bias or all have none")


class LoRAQKV(nn.Module):
    """Runs q_proj, k_proj, v_proj (LoRALinear) as one fused op; their parameters and names stay their own.

    The base weights (and biases) are moved into one contiguous buffer of which each projection's
    Parameter becomes a view, so the fused kernel reads them without a per-call concatenation and the
    state dict, saved adapters and merge() work on the projections unchanged.
    """

    def __init__(self, *projections: LoRALinear):
        super().__init__()
        check_fusable(projections)
        # A plain tuple: registering the projections here would give their parameters a second name.
        self._projections = tuple(projections)
        self._fused_weight = self._fused_bias = None
        self._fuse()

    @property
    def projections(self) -> tuple:
        """The fused LoRALinear modules, in output order."""
        return self._projections

    @torch.no_grad()
    def _fuse(self) -> None:
        """(Re)build the shared base buffers and point each projection's Parameters at views of them."""
        projections = self._projections
        sizes = [p.out_features for p in projections]
        self._fused_weight = torch.cat([p.weight.detach() for p in projections])
        for p, view in zip(projections, self._fused_weight.split(sizes)):
            p.weight.data = view  # keeps the Parameter object: optimizers and hooks still hold it
        if projections[0].bias is not None:
            self._fused_bias = torch.cat([p.bias.detach() for p in projections])
            for p, view in zip(projections, self._fused_bias.split(sizes)):
                p.bias.data = view
        else:
            self._fused_bias = None

    def _is_fused(self) -> bool:
        """Whether every projection's weight is still a view of the shared buffer (.to() or loads may move them)."""
        offset = 0
        base = self._fused_weight
        for p in self._projections:
            expected = base.data_ptr() + offset * base.stride(0) * base.element_size()
            if p.weight.data_ptr() != expected or p.weight.device != base.device or p.weight.dtype != base.dtype:
                return False
            offset += p.out_features
        return True

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """(q, k, v): views into one output buffer; exact separate calls when an adapter is merged or disabled."""
        projections = self._projections
        if any(p.merged or p.disable_adapters for p in projections):
            return tuple(p(x) for p in projections)
        if not self._is_fused():
            self._fuse()
        return lora_qkv_linear(
            x, self._fused_weight, self._fused_bias,
            [p.lora_A.weight for p in projections], [p.lora_B.weight for p in projections],
            [p.scaling for p in projections], dropout_p=projections[0].lora_dropout,
            training=projections[0].training)

    def extra_repr(self) -> str:
        """Output sizes of the fused projections."""
        return f"out_features={[p.out_features for p in self._projections]}"
