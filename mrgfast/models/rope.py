"""Rotary position embeddings: RoPE with HF's rope_scaling variants, and Qwen2-VL's 3-axis M-RoPE."""

import math

import torch
from torch import Tensor, nn

from mrgfast.models.config import DecoderConfig
from mrgfast.ops.rope import reference_rope


def base_inv_freq(theta, head_dim: int, device=None) -> Tensor:
    """The unscaled inverse frequencies theta^(-2i/d), i < d/2, in fp32 (computed as HF computes them)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponents)


def llama3_inv_freq(inv_freq: Tensor, rope: dict) -> Tensor:
    """Llama 3.1's scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


def inv_frequencies(config: DecoderConfig, seq_len=None, device=None) -> Tensor:
    """The inverse frequencies [head_dim/2] for `config`'s RoPE; "dynamic" needs the sequence length seen."""
    rope = config.rope_scaling or {"rope_type": "default"}
    kind, dim = rope["rope_type"], config.head_dim
    if kind == "dynamic":
        # Dynamic NTK: once sequences outgrow max_position_embeddings, raise the base with the length.
        limit = config.max_position_embeddings
        seq_len = limit if seq_len is None else max(seq_len, limit)
        factor = rope["factor"]
        theta = config.rope_theta * ((factor * seq_len / limit) - (factor - 1)) ** (dim / (dim - 2))
        return base_inv_freq(theta, dim, device)
    inv_freq = base_inv_freq(config.rope_theta, dim, device)
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, rope)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables [T, head_dim] for flat position ids [T] (or [3, T] for M-RoPE), in fp32."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        # A plain attribute, not a buffer: it stays fp32 under model.to(bf16) and needs no meta-device handling.
        self.inv_freq_by_device = {}

    def inv_freq(self, position_ids: Tensor) -> Tensor:
        """The inverse frequencies on position_ids' device (recomputed per call only for dynamic scaling)."""
        rope = self.config.rope_scaling
        if rope is not None and rope["rope_type"] == "dynamic":
            # As HF: the length seen is the largest position + 1 (one host sync; dynamic scaling only).
            return inv_frequencies(self.config, int(position_ids.max()) + 1).to(position_ids.device)
        device = position_ids.device
        if device not in self.inv_freq_by_device:
            # Computed on the CPU as HF computes its buffer, so values match bit for bit on every device.
            self.inv_freq_by_device[device] = inv_frequencies(self.config).to(device)
        return self.inv_freq_by_device[device]

    def forward(self, position_ids: Tensor):
        """(cos, sin), each [T, head_dim] fp32, for position ids [T] or 3-axis ids [3, T] (M-RoPE)."""
        section = self.config.mrope_section
        if position_ids.dim() == 2 and section is None:
            raise ValueError(f"3-axis position_ids {tuple(position_ids.shape)} need an M-RoPE model (mrope_section)")
        if section is not None and position_ids.dim() == 1:
            position_ids = position_ids.expand(3, -1)  # text only: all three axes share the position
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids)
        if section is not None:
            # Frequency band i follows axis i % 3 (temporal, height, width), as Qwen2-VL assigns them.
            freqs = torch.cat([band[i % 3] for i, band in enumerate(freqs.split(list(section), dim=-1))], dim=-1)
        freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos(), freqs.sin()


# HF's eager rotation of x [T, heads, head_dim] by the tables [T, head_dim], in x's dtype: the decoder's default.
apply_rope = reference_rope
