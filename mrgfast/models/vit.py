"""Small ViTs defined in mrgfast: a 2D ViT for images and a 3D ViT for volumes (synthetic data, training from scratch).

Both are the same pre-norm transformer over patch tokens: Conv patch embedding (kernel = stride = patch), an
optional CLS token, learnable or fixed sin-cos position embeddings, blocks of LayerNorm -> SDPA attention and
LayerNorm -> GELU MLP, a final LayerNorm. Tokens are in row-major order over the patch grid.
"""

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mrgfast.models.vision import VisionFeatures

POS_EMBEDS = ("learnable", "sincos")
POOLS = ("mean", "cls")


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask) with torch's scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, dim] -> [B, T, dim]."""
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, dim] -> [B, T, dim]."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_position_embedding(grid: Sequence[int], dim: int) -> Tensor:
    """Fixed [prod(grid), dim] embedding of a row-major patch grid (MAE style): each axis gets dim / len(grid)
    channels, half sin and half cos of its coordinate at frequencies 1 / 10000^(i / quarter)."""
    axes = len(grid)
    if dim % (2 * axes):
        raise ValueError(f"pos_embed='sincos' on a {axes}-axis grid needs dim divisible by {2 * axes}, got {dim}")
    half = dim // axes // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
    parts = []
    for coord in coords:
        angles = coord.reshape(-1, 1) * omega
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class PatchTransformer(nn.Module):
    """The shared ViT body: patch embedding over a fixed 2D/3D input size, CLS, positions, blocks, final norm."""

    def __init__(self, input_size: Sequence[int], patch_size: Sequence[int], in_channels: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float, cls_token: bool, pos_embed: str, gradient_checkpointing: bool):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("in_channels", in_channels), ("dim", dim), ("depth", depth), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive integer, got {value!r}")
        if len(input_size) != len(patch_size) or any(p < 1 for p in patch_size):
            raise ValueError(f"{name}: patch_size {tuple(patch_size)} must give one positive size per axis of "
                             f"{tuple(input_size)}")
        if any(n % p for n, p in zip(input_size, patch_size)) or any(n < 1 for n in input_size):
            raise ValueError(f"{name}: input size {tuple(input_size)} is not divisible by patch_size "
                             f"{tuple(patch_size)}")
        if dim % heads:
            raise ValueError(f"{name}: dim={dim} must be divisible by heads={heads}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"{name}: pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if mlp_ratio <= 0:
            raise ValueError(f"{name}: mlp_ratio must be positive, got {mlp_ratio}")
        self.input_size, self.patch_size = tuple(input_size), tuple(patch_size)
        self.in_channels, self.dim = in_channels, dim
        self.grid = tuple(n // p for n, p in zip(input_size, patch_size))
        self.gradient_checkpointing = gradient_checkpointing
        conv = nn.Conv2d if len(self.grid) == 2 else nn.Conv3d
        self.patch_embed = conv(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        positions = math.prod(self.grid)
        if pos_embed == "learnable":
            # Positions for the CLS token too (as in ViT); sincos leaves CLS without one (as in MAE).
            self.pos_embed = nn.Parameter(torch.zeros(1, positions + int(cls_token), dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_buffer("pos_embed", sincos_position_embedding(self.grid, dim)[None], persistent=False)
        if cls_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def encode(self, x: Tensor) -> Tensor:
        """x [B, C, *input_size] -> tokens [B, (1 +) prod(grid), dim], CLS first when the model has one."""
        expected = (self.in_channels, *self.input_size)
        if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__}: input must be [batch, {', '.join(map(str, expected))}], got "
                             f"shape {tuple(x.shape)}")
        tokens = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        pos = self.pos_embed.to(tokens.dtype)
        if self.cls_token is None:
            tokens = tokens + pos
        elif pos.shape[1] == tokens.shape[1] + 1:
            tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1).to(tokens.dtype), tokens], 1) + pos
        else:
            tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1).to(tokens.dtype), tokens + pos], 1)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # Recompute each block in backward instead of keeping its activations.
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        return self.norm(tokens)


class ViT(PatchTransformer):
    """A small 2D ViT: images [B, C, H, W] -> VisionFeatures(features [B, (1 +) h*w, dim], grid (h, w), pooled)."""

    def __init__(self, image_size: Union[int, Sequence[int]], patch_size: Union[int, Sequence[int]],
                 in_channels: int = 3, dim: int = 192, depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0,
                 cls_token: bool = True, pos_embed: str = "learnable", gradient_checkpointing: bool = False):
        super().__init__(_pair(image_size, 2, "image_size"), _pair(patch_size, 2, "patch_size"), in_channels, dim,
                         depth, heads, mlp_ratio, cls_token, pos_embed, gradient_checkpointing)

    def forward(self, images: Tensor) -> VisionFeatures:
        """Features with the CLS token first (when cls_token=True); pooled is the CLS output, else the patch mean."""
        tokens = self.encode(images)
        cls = self.cls_token is not None
        pooled = tokens[:, 0] if cls else tokens.mean(1)
        return VisionFeatures(tokens, self.grid, cls=cls, pooled=pooled)


class ViT3D(PatchTransformer):
    """A small 3D ViT: volumes [B, C, D, H, W] -> VisionFeatures(features [B, (1 +) d*h*w, dim], grid (d, h, w),
    pooled [B, dim]); pooled is the mean of the patch tokens or the CLS output (`pool`), the volume embedding
    DiagnosticPrefix takes."""

    def __init__(self, volume_size: Sequence[int], patch_size: Union[int, Sequence[int]], in_channels: int = 1,
                 dim: int = 192, depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0, pool: str = "mean",
                 cls_token: Optional[bool] = None, pos_embed: str = "learnable", gradient_checkpointing: bool = False):
        if pool not in POOLS:
            raise ValueError(f"ViT3D: pool must be one of {POOLS}, got {pool!r}")
        cls_token = pool == "cls" if cls_token is None else cls_token
        if pool == "cls" and not cls_token:
            raise ValueError("ViT3D: pool='cls' needs cls_token=True")
        super().__init__(_pair(volume_size, 3, "volume_size"), _pair(patch_size, 3, "patch_size"), in_channels, dim,
                         depth, heads, mlp_ratio, cls_token, pos_embed, gradient_checkpointing)
        self.pool = pool

    def forward(self, volumes: Tensor) -> VisionFeatures:
        """Features (CLS first when the model has one) and the pooled volume embedding."""
        tokens = self.encode(volumes)
        cls = self.cls_token is not None
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, int(cls):].mean(1)
        return VisionFeatures(tokens, self.grid, cls=cls, pooled=pooled)


def _pair(value, axes: int, name: str) -> tuple:
    """An int repeated `axes` times, or a sequence of exactly `axes` ints; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * axes
    if isinstance(value, (tuple, list)) and len(value) == axes and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ValueError(f"{name} must be an int or {axes} ints, got {value!r}")
