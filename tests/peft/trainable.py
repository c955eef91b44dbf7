"""Shared test helper for the peft tests."""

import torch


def randomize_trainable(model, seed=5, scale=0.2):
    """Give every trainable parameter random values (B included), so a wrong load or restore cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
