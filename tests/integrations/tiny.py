"""Tiny random HF models of every class mrgfast.patch knows, their inputs, and PEFT LoRA on them (no download)."""

import torch
import transformers
from peft import LoraConfig, get_peft_model

from tests.models.tiny_hf import SIZES, VISION, VL_TOKENS, llama, qwen2, qwen2_vl, random_ids, vl_inputs

# Qwen2.5-VL's tower: windowed attention in block 0, full attention in block 1; its merger outputs the text width.
VISION_25 = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                 temporal_patch_size=2, in_channels=3, window_size=56, out_hidden_size=SIZES["hidden_size"],
                 fullatt_block_indexes=[1])


def qwen2_5_vl():
    """A tiny Qwen2_5_VLForConditionalGeneration (M-RoPE like Qwen2-VL's tiny one)."""
    text = dict(SIZES, initializer_range=0.2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                bos_token_id=1, eos_token_id=2)
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=VISION_25, **VL_TOKENS)
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


BUILDERS = {"llama": llama, "qwen2": qwen2, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl}
VISION_MODELS = ("qwen2_vl", "qwen2_5_vl")


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model of `arch` with fixed random weights, in eval mode (dropout off)."""
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


def batch(arch: str, seed: int = 0) -> dict:
    """One batch with labels: two rows of text (the first 3 labels of each ignored), or one image prompt."""
    if arch in VISION_MODELS:
        inputs = vl_inputs(3, 6, seed=seed)
        labels = inputs["input_ids"].clone()
        labels[:, :8] = -100  # the prompt and the image are not predicted
        return dict(inputs, labels=labels)
    ids = torch.stack([random_ids(9, seed=seed), random_ids(9, seed=seed + 1)])
    labels = ids.clone()
    labels[:, :3] = -100
    return dict(input_ids=ids, labels=labels)


def with_lora(model, seed: int = 1, **overrides):
    """The model in a PeftModel with LoRA on every attention projection (q/k/v carry a bias on Qwen2), no dropout,
    and a non-zero lora_B (PEFT zeroes it, which would hide adapter-path bugs)."""
    settings = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                    task_type="CAUSAL_LM")
    settings.update(overrides)
    peft_model = get_peft_model(model, LoraConfig(**settings))
    randomize_lora_b(peft_model, seed)
    return peft_model


def randomize_lora_b(model, seed: int) -> None:
    """Fill every lora_B with small random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
