"""A tiny untrained MultimodalLM (ViT -> GroupedProjection -> decoder) over 16x16 grayscale images, for tests that
generate from a real model path in milliseconds."""

from pathlib import Path

import torch

from mrgfast.data import PromptBuilder, build_demo_tokenizer
from mrgfast.data.images import ImageConfig
from mrgfast.layers.grouped_projection import GroupedProjection
from mrgfast.models import Decoder, DecoderConfig, ViT
from mrgfast.models.multimodal import MultimodalLM

IMAGE = ImageConfig(size=16, mean=(0.5,), std=(0.25,), channels=1)


def tiny_multimodal_lm(vocab_size: int, seed: int = 0) -> MultimodalLM:
    """The model in eval mode, its weights drawn from `seed`."""
    torch.manual_seed(seed)
    decoder = Decoder(DecoderConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    vit = ViT(16, 4, in_channels=1, dim=16, depth=1, heads=2).requires_grad_(False)
    return MultimodalLM(decoder, vision=vit, adapters={"image": GroupedProjection(16, 32, 4)}).eval()


def tiny_lm_with_tokenizer(texts: list, tokenizer_dir: Path, views: int = 2) -> tuple:
    """(demo tokenizer trained on `texts`, the tiny model over its vocabulary, a PeFoMed prompt builder for `views`)."""
    tokenizer = build_demo_tokenizer(texts, tokenizer_dir, vocab_size=300)
    model = tiny_multimodal_lm(tokenizer.vocab_size)
    return tokenizer, model, PromptBuilder(tokenizer, "pefomed", **model.builder_kwargs("pefomed", views=views))
