"""Seeded dropout masks that a backend can regenerate in backward instead of storing them."""

import torch


def new_seed() -> int:
    """A fresh dropout seed drawn from torch's default CPU generator (reproducible under manual_seed)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def torch_keep_mask(rows: int, cols: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The boolean keep mask [rows, cols] the torch backends (cpu, reference) draw for `seed`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand((rows, cols), generator=generator, device=device) >= p
