"""GroupedProjection: per-token LayerNorm -> visual-token grouping -> Linear, computed by one fused op."""

from typing import Optional

from torch import Tensor, nn

from mrgfast.ops.group_tokens import MODES, group_layout
from mrgfast.ops.grouped_projection import grouped_projection

NORMS = ("layernorm", None)


class GroupedProjection(nn.Module):
    """LayerNorm(in_dim) per token, concatenate `group` tokens (1d or s x s 2d), then Linear(group*in_dim, out_dim).

    PeFoMed: GroupedProjection(1408, 4096, 4) with the frozen EVA `ln_vision` as `norm` (nn.LayerNorm, eps 1e-5)
    and `llama_proj` as `proj`. Qwen2-VL's merger front: GroupedProjection(1280, d, 4, mode="2d"), grid at call.
    Submodules `norm` (an nn.LayerNorm, or None) and `proj` (an nn.Linear) keep the usual state-dict keys; freeze
    `norm` (requires_grad_(False)) and its gradients are skipped, as is x's gradient when x does not require it.
    """

    def __init__(self, in_dim: int, out_dim: int, group: int, mode: str = "1d", norm: Optional[str] = "layernorm",
                 bias: bool = True, grid: Optional[tuple[int, int]] = None, pad: bool = False, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("group", group)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be '1d' or '2d', got {mode!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be 'layernorm' or None, got {norm!r}")
        if grid is not None:  # validated now (against its own token count) so a bad grid fails at construction
            group_layout((1, grid[0] * grid[1], in_dim), group, mode, grid, pad)
        elif mode == "2d":
            group_layout((1, 4, in_dim), group, mode, (2, 2), pad=True)  # group must be a square
        self.in_dim, self.out_dim, self.group, self.mode = in_dim, out_dim, group, mode
        self.grid, self.pad, self.eps = (tuple(grid) if grid is not None else None), bool(pad), float(eps)
        factory = dict(device=device, dtype=dtype)
        self.norm = nn.LayerNorm(in_dim, eps=eps, **factory) if norm == "layernorm" else None
        self.proj = nn.Linear(group * in_dim, out_dim, bias=bias, **factory)

    def forward(self, x: Tensor, grid: Optional[tuple[int, int]] = None) -> Tensor:
        """x [B, N, in_dim] -> [B, groups, out_dim]; `grid` (2d) overrides the one given at construction."""
        grid = grid if grid is not None else self.grid
        if self.mode == "2d" and grid is None:
            raise ValueError("GroupedProjection(mode='2d') needs grid=(h, w): at construction or in forward")
        norm = self.norm
        return grouped_projection(x, self.proj.weight, self.proj.bias, self.group, self.mode,
                                  grid if self.mode == "2d" else None, self.pad, normalize=norm is not None,
                                  norm_weight=norm.weight if norm is not None else None,
                                  norm_bias=norm.bias if norm is not None else None, eps=self.eps)

    def extra_repr(self) -> str:
        """Grouping settings shown by print(module)."""
        return f"group={self.group}, mode={self.mode!r}, grid={self.grid}, pad={self.pad}"
